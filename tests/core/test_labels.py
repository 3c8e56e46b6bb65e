"""Thing/stuff tables and recognising a checkpoint's id2label as one of them."""

from __future__ import annotations

import pytest

from seglabel.core.labels import LABEL_SETS, match_label_set, thing_ids


def id2label_of(key: str) -> dict[int, str]:
    return {i: name for i, (name, _) in enumerate(LABEL_SETS[key])}


@pytest.mark.parametrize(
    "key, size, things",
    [("coco-panoptic", 133, 80), ("cityscapes", 19, 8), ("ade20k", 150, 100)],
)
def test_table_sizes_and_thing_counts(key, size, things):
    table = LABEL_SETS[key]
    assert len(table) == size
    assert sum(is_thing for _, is_thing in table) == things
    assert len({name for name, _ in table}) == size  # no duplicated names


def test_coco_anchors():
    coco = LABEL_SETS["coco-panoptic"]
    assert coco[0] == ("person", True)
    assert coco[79] == ("toothbrush", True)
    assert coco[80] == ("banner", False)
    assert coco[-1] == ("rug-merged", False)
    assert all(is_thing for _, is_thing in coco[:80])
    assert not any(is_thing for _, is_thing in coco[80:])


def test_cityscapes_and_ade20k_anchors():
    city = LABEL_SETS["cityscapes"]
    assert [i for i, (_, t) in enumerate(city) if t] == list(range(11, 19))
    assert city[11] == ("person", True) and city[18] == ("bicycle", True)
    ade = dict(LABEL_SETS["ade20k"])
    # A few flags from Mask2Former's ADE20K_150_CATEGORIES, including the surprising ones.
    assert ade["wall"] is False and ade["sky"] is False and ade["rug"] is False
    assert ade["person"] is True and ade["car"] is True and ade["fence"] is True
    assert LABEL_SETS["ade20k"][149] == ("flag", True)


@pytest.mark.parametrize("key", sorted(LABEL_SETS))
def test_matches_table_as_is(key):
    assert match_label_set(id2label_of(key)) == key


# Each variant is applied to every name, so a broken normalisation rule changes enough
# names (well over 10 %) to lose the match instead of hiding under the threshold.
VARIANTS = {
    "case and spaces": lambda n: f"  {n.upper()} ",
    "synonym list": lambda n: f"{n}, some synonym, another",
    "underscores": lambda n: n.replace(" ", "_"),
    "suffixes dropped": lambda n: n.removesuffix("-merged").removesuffix("-other"),
    "suffixes added": lambda n: n if "-" in n else f"{n}-merged",
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("key", sorted(LABEL_SETS))
def test_matches_spelling_variants(key, variant):
    perturbed = {i: VARIANTS[variant](n) for i, n in id2label_of(key).items()}
    assert match_label_set(perturbed) == key


def test_matches_hf_style_config():
    # String keys as in a hand-read config.json, and the HF ADE config's own oddities.
    ade = {str(i): n for i, n in id2label_of("ade20k").items()}
    ade["7"] = "bed "
    ade["8"] = "windowpane, window"
    assert match_label_set(ade) == "ade20k"
    assert thing_ids(ade) == thing_ids(id2label_of("ade20k"))


def test_matches_detectron2_ade_names_below_exact():
    # Mask2Former's own ADE names differ from HF's at ~10 ids; still the same label set.
    ade = id2label_of("ade20k")
    for i, name in {8: "window ", 37: "tub", 38: "rail", 87: "street lamp", 89: "tv",
                    90: "plane", 92: "clothes", 109: "pool", 113: "falls", 138: "trash can"}.items():
        ade[i] = name
    assert match_label_set(ade) == "ade20k"


def test_too_many_differences_or_wrong_size_do_not_match():
    coco = id2label_of("coco-panoptic")
    for i in range(20):  # 20/133 wrong: below 90 %
        coco[i] = f"something{i}"
    assert match_label_set(coco) is None
    shifted = {i + 1: n for i, n in id2label_of("cityscapes").items()}  # ids off by one
    assert match_label_set(shifted) is None
    assert match_label_set(dict(list(id2label_of("cityscapes").items())[:18])) is None


def test_unknown_label_set():
    tiny = {0: "road", 1: "sidewalk", 2: "building", 3: "wall", 4: "fence"}
    assert match_label_set(tiny) is None
    assert thing_ids(tiny) is None
    assert match_label_set({}) is None


def test_thing_ids_from_tables():
    assert thing_ids(id2label_of("coco-panoptic")) == frozenset(range(80))
    assert thing_ids(id2label_of("cityscapes")) == frozenset(range(11, 19))
    ade = thing_ids(id2label_of("ade20k"))
    assert len(ade) == 100 and 12 in ade and 0 not in ade


def test_explicit_ids_and_names_win():
    tiny = {0: "road", 1: "Car", 2: "person", 3: "sky-other-merged"}
    assert thing_ids(tiny, [1, 2]) == frozenset({1, 2})
    assert thing_ids(tiny, ["Car", "person"]) == frozenset({1, 2})
    assert thing_ids(tiny, ["car", " SKY-other "]) == frozenset({1, 3})  # normalised lookup
    assert thing_ids(tiny, ["0", 2]) == frozenset({0, 2})  # CLI-style digit strings
    assert thing_ids(tiny, []) == frozenset()  # explicit "no things", not "unknown"
    # Explicit overrides the table of a known set.
    assert thing_ids(id2label_of("cityscapes"), ["sky"]) == frozenset({10})


def test_explicit_unknown_name_or_id_raises():
    tiny = {0: "road", 1: "car"}
    with pytest.raises(ValueError, match="giraffe"):
        thing_ids(tiny, ["car", "giraffe"])
    with pytest.raises(ValueError, match="7"):
        thing_ids(tiny, [7])
