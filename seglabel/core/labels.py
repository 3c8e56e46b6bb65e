"""Thing/stuff tables for the label sets of the public Mask2Former checkpoints.

Hugging Face Mask2Former configs carry ``id2label`` but no ``isthing`` flags, and panoptic
post-processing needs them: only "things" (countable objects) get one segment per instance,
"stuff" segments of one class are fused. So we ship the flags for the three label sets the
public checkpoints use, in their exact id order, and recognise a config's ``id2label`` as one
of them by its names.

Sources:
  * COCO panoptic (133): ``facebook/mask2former-swin-*-coco-panoptic`` id2label, which is
    detectron2's ``COCO_CATEGORIES`` order: the 80 thing classes first, then 53 stuff classes.
  * Cityscapes (19): the train-id order of ``facebook/mask2former-swin-*-cityscapes-*``;
    person..bicycle (ids 11-18) are things, as in cityscapesScripts' ``hasInstances``.
  * ADE20K (150): names as ``facebook/mask2former-swin-*-ade-semantic`` id2label writes them
    (the first synonym of each SceneParsing class); ``isthing`` flags from
    ``ADE20K_150_CATEGORIES`` in facebookresearch/Mask2Former
    ``mask2former/data/datasets/register_ade20k_panoptic.py`` (100 things, 50 stuff). Its names
    differ from the HF ones in places (e.g. "window "/"windowpane", "tub"/"bathtub") but the
    ids are the same 0..149.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping


def _names(text: str) -> tuple[str, ...]:
    # Compact source form: comma-separated names, free line breaks. No name here has a comma.
    return tuple(n.strip() for n in text.split(",") if n.strip())


_COCO_PANOPTIC_NAMES = _names("""
    person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light,
    fire hydrant, stop sign, parking meter, bench, bird, cat, dog, horse, sheep, cow,
    elephant, bear, zebra, giraffe, backpack, umbrella, handbag, tie, suitcase, frisbee,
    skis, snowboard, sports ball, kite, baseball bat, baseball glove, skateboard, surfboard,
    tennis racket, bottle, wine glass, cup, fork, knife, spoon, bowl, banana, apple,
    sandwich, orange, broccoli, carrot, hot dog, pizza, donut, cake, chair, couch,
    potted plant, bed, dining table, toilet, tv, laptop, mouse, remote, keyboard, cell phone,
    microwave, oven, toaster, sink, refrigerator, book, clock, vase, scissors, teddy bear,
    hair drier, toothbrush,
    banner, blanket, bridge, cardboard, counter, curtain, door-stuff, floor-wood, flower,
    fruit, gravel, house, light, mirror-stuff, net, pillow, platform, playingfield, railroad,
    river, road, roof, sand, sea, shelf, snow, stairs, tent, towel, wall-brick, wall-stone,
    wall-tile, wall-wood, water-other, window-blind, window-other, tree-merged, fence-merged,
    ceiling-merged, sky-other-merged, cabinet-merged, table-merged, floor-other-merged,
    pavement-merged, mountain-merged, grass-merged, dirt-merged, paper-merged,
    food-other-merged, building-other-merged, rock-merged, wall-other-merged, rug-merged
""")
_COCO_PANOPTIC_NUM_THINGS = 80  # COCO panoptic lists its 80 thing classes first

_CITYSCAPES_NAMES = _names("""
    road, sidewalk, building, wall, fence, pole, traffic light, traffic sign, vegetation,
    terrain, sky, person, rider, car, truck, bus, train, motorcycle, bicycle
""")
_CITYSCAPES_THINGS = frozenset(range(11, 19))  # person, rider, car, truck, bus, train, motorcycle, bicycle

_ADE20K_NAMES = _names("""
    wall, building, sky, floor, tree, ceiling, road, bed, windowpane, grass,
    cabinet, sidewalk, person, earth, door, table, mountain, plant, curtain, chair,
    car, water, painting, sofa, shelf, house, sea, mirror, rug, field,
    armchair, seat, fence, desk, rock, wardrobe, lamp, bathtub, railing, cushion,
    base, box, column, signboard, chest of drawers, counter, sand, sink, skyscraper, fireplace,
    refrigerator, grandstand, path, stairs, runway, case, pool table, pillow, screen door, stairway,
    river, bridge, bookcase, blind, coffee table, toilet, flower, book, hill, bench,
    countertop, stove, palm, kitchen island, computer, swivel chair, boat, bar, arcade machine, hovel,
    bus, towel, light, truck, tower, chandelier, awning, streetlight, booth, television receiver,
    airplane, dirt track, apparel, pole, land, bannister, escalator, ottoman, bottle, buffet,
    poster, stage, van, ship, fountain, conveyer belt, canopy, washer, plaything, swimming pool,
    stool, barrel, basket, waterfall, tent, bag, minibike, cradle, oven, ball,
    food, step, tank, trade name, microwave, pot, animal, bicycle, lake, dishwasher,
    screen, blanket, sculpture, hood, sconce, vase, traffic light, tray, ashcan, fan,
    pier, crt screen, plate, monitor, bulletin board, shower, radiator, glass, clock, flag
""")
# The 50 ids with isthing=0 in Mask2Former's ADE20K_150_CATEGORIES (the shorter list to
# write down); every other id is a thing. Some flags are surprising ("fence", "column",
# "stairs" are things; "rug", "blanket", "poster" are stuff) but they are what the
# ADE20K-panoptic Mask2Former checkpoints were trained with, so we keep them as is.
_ADE20K_STUFF = frozenset({
    0, 1, 2, 3, 4, 5, 6, 9, 11, 13, 16, 17, 21, 25, 26, 28, 29, 34, 40, 46,
    48, 51, 52, 54, 59, 60, 61, 63, 68, 77, 79, 84, 91, 94, 96, 99, 100, 101, 105, 106,
    109, 113, 114, 117, 122, 128, 131, 140, 141, 145,
})

LABEL_SETS: dict[str, tuple[tuple[str, bool], ...]] = {
    "coco-panoptic": tuple(
        (name, i < _COCO_PANOPTIC_NUM_THINGS) for i, name in enumerate(_COCO_PANOPTIC_NAMES)
    ),
    "cityscapes": tuple((name, i in _CITYSCAPES_THINGS) for i, name in enumerate(_CITYSCAPES_NAMES)),
    "ade20k": tuple((name, i not in _ADE20K_STUFF) for i, name in enumerate(_ADE20K_NAMES)),
}
"""Label set name -> ((name, is_thing), ...) indexed by label id."""

MATCH_FRACTION = 0.9
"""Share of normalised names that must agree, id by id, for an id2label to match a table.
High enough that an unrelated label set of the same size never matches, low enough to
absorb the few names that differ between HF and detectron2 spellings of the same set."""

_SUFFIX = re.compile(r"(?:[-_ ](?:merged|other|stuff))+$")
_SEPARATORS = re.compile(r"[\s_\-]+")


def _normalise(name: str) -> str:
    """Canonical form of a label name, so that spellings of one class compare equal.

    "Bed ", "window, windowpane", "sky-other-merged", "traffic_light" -> "bed", "window",
    "sky", "traffic light".
    """
    name = str(name).strip().lower()
    name = name.split(",", 1)[0]  # "a, b, c" synonym list: HF configs keep only the first
    name = _SUFFIX.sub("", name.strip())
    return _SEPARATORS.sub(" ", name).strip()


_NORMALISED = {key: tuple(_normalise(n) for n, _ in table) for key, table in LABEL_SETS.items()}


def _as_int_keys(id2label: Mapping[int, str]) -> dict[int, str]:
    # A config.json read by hand has string keys ("0": "person"); transformers converts them.
    return {int(k): v for k, v in id2label.items()}


def match_label_set(id2label: Mapping[int, str]) -> str | None:
    """Name of the known label set this id2label is, or None.

    Tolerant to spelling variants that HF configs use (case, surrounding spaces, 'a, b'
    synonym lists where only the first name is kept, '-merged'/'-other' suffixes,
    underscores vs spaces): requires the same number of labels and at least
    ``MATCH_FRACTION`` of the normalised names equal at the same id. If several sets
    qualify, the one with most equal names wins.
    """
    labels = _as_int_keys(id2label)
    best: tuple[float, str] | None = None
    for key, names in _NORMALISED.items():
        if len(labels) != len(names):
            continue
        same = sum(1 for i, n in enumerate(names) if i in labels and _normalise(labels[i]) == n)
        score = same / len(names)
        if score >= MATCH_FRACTION and (best is None or score > best[0]):
            best = (score, key)
    return best[1] if best else None


def thing_ids(
    id2label: Mapping[int, str], explicit: Iterable[int | str] | None = None
) -> frozenset[int] | None:
    """Label ids that are things.

    `explicit` (ids or names from id2label) wins; an unknown name raises ValueError naming it.
    Else the matched table's flags. Else None (unknown: callers leave is_thing null and fuse
    nothing).

    Names are looked up exactly first, then by normalised form (so "Person" or "sky-other"
    find "person" / "sky-other-merged"); a normalised name shared by several ids selects all
    of them. A string of digits that is not a label name is read as an id, so CLI values like
    "0,12" work. An id not in id2label is an error too: it cannot be a thing of this model.
    An empty `explicit` means "no things" and returns an empty set, not None.
    """
    labels = _as_int_keys(id2label)
    if explicit is not None:
        return resolve_labels(labels, explicit, what="thing label")
    key = match_label_set(labels)
    if key is None:
        return None
    # Flags by id: id2label ids are the table's indices (a match compares them id by id).
    table = LABEL_SETS[key]
    return frozenset(i for i in labels if 0 <= i < len(table) and table[i][1])


def resolve_labels(
    id2label: Mapping[int, str], explicit: Iterable[int | str], what: str = "label", owner: str = "this model"
) -> frozenset[int]:
    """Label ids for ids or names of a checkpoint's labels (``owner``'s, in the message: a label
    map's labels are a team's); an unknown one raises ValueError."""
    labels = _as_int_keys(id2label)
    by_name: dict[str, list[int]] = {}
    by_norm: dict[str, list[int]] = {}
    for i, name in labels.items():
        by_name.setdefault(name, []).append(i)
        by_norm.setdefault(_normalise(name), []).append(i)

    out: set[int] = set()
    for item in explicit:
        if isinstance(item, str):
            hits = by_name.get(item) or by_norm.get(_normalise(item))
            if hits:
                out.update(hits)
                continue
            if not item.strip().isdigit():
                raise ValueError(
                    f"unknown {what} {item!r}: not a label of {owner} "
                    f"({len(labels)} labels, e.g. {list(labels.values())[:5]})"
                )
            item = int(item)
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValueError(f"{what} must be an id or a name, got {item!r}")
        if item not in labels:
            raise ValueError(
                f"unknown {what} id {item}: the ids of {owner} are {min(labels, default=None)}"
                f"..{max(labels, default=None)}"
            )
        out.add(item)
    return frozenset(out)


def palette_color(index: int) -> tuple[int, int, int]:
    """A stable, well-spread colour for an index (golden-ratio hue steps)."""
    import colorsys

    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


# A label id as JSON writes it: a row of the class head, plainly (nine digits are far more rows
# than any head has; Python's int() refuses numbers of over 4,300 digits with an error of its own).
LABEL_ID = re.compile(r"0|[1-9][0-9]{0,8}")

# The longest label name seglabel takes (a label map's, a checkpoint's): names are shown in
# annotation tools' menus, and every format repeats them.
MAX_NAME_CHARS = 1000


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a label's name in every format seglabel writes (COCO and Label
    Studio JSON, Label Studio's XML config, CVAT, the review page), or None when it can: a
    non-empty string of at most ``MAX_NAME_CHARS`` characters, with something visible in it,
    encodable as UTF-8 (no lone surrogate, which a JSON file can hold and no writer can), and
    only characters XML 1.0 holds: no control characters (a tab or a newline in a menu item is a
    mistake too) and no non-characters (U+FFFE, U+FFFF, U+FDD0..U+FDEF)."""
    import unicodedata

    if not isinstance(name, str):
        return f"{type(name).__name__}, not text"
    if not name or len(name) > MAX_NAME_CHARS:
        return f"{len(name)} characters, not 1 to {MAX_NAME_CHARS}"
    for char in name:
        code, kind = ord(char), unicodedata.category(char)
        if kind == "Cs":
            return f"a lone surrogate (U+{code:04X}), not text"
        if kind in ("Cc", "Zl", "Zp"):  # a line or paragraph separator is a newline too
            return f"a control character (U+{code:04X})"
        if (code & 0xFFFE) == 0xFFFE or 0xFDD0 <= code <= 0xFDEF:
            return f"a non-character (U+{code:04X}), which XML cannot hold"
    if all(unicodedata.category(c) in ("Zs", "Cf") for c in name):
        return "nothing visible"
    return None
