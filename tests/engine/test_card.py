"""Reading a checkpoint's licence: its model card's front matter, the authors' statements that
override a card, and what a hostile or careless card does."""

from __future__ import annotations

import fsspec
import pytest

from seglabel.core.license import UNKNOWN
from seglabel.engine.card import MAX_CARD_BYTES, card_license, checkpoint_license


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("---\nlicense: MIT\n---\n# model", "mit"),
        ("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n", "apache-2.0"),
        ("---\nlicense: other\nlicense_name: dinov3-license\n---\n", "other"),
        ("# a card without front matter\nlicense: mit\n", None),
        ("---\nlicense: [mit\n---\n", None),  # YAML that does not parse
        ("---\nlicense:\n- mit\n- apache-2.0\n---\n", None),  # not one licence
        ("---\nlicense: 7\n---\n", None),
        ("---\n- just\n- a list\n---\n", None),
        ("", None),
        # Issue 35: licences as their own texts write them, recorded as the SPDX ids they are.
        ("---\nlicense: CC BY-NC-SA 4.0\n---\n", "cc-by-nc-sa-4.0"),
        ("---\nlicense: CC_BY_NC_4.0\n---\n", "cc-by-nc-4.0"),
        ("---\nlicense: Apache-2\n---\n", "apache-2.0"),
        # The review: ids that are ids as they are, names for ids, typographic dashes.
        ("---\nlicense: MIT-0\n---\n", "mit-0"),
        ("---\nlicense: bsd-2-clause\n---\n", "bsd-2-clause"),
        ("---\nlicense: Apache License 2.0\n---\n", "apache-2.0"),
        ("---\nlicense: CC\u2010BY\u2010NC\u20104.0\n---\n", "cc-by-nc-4.0"),
    ],
)
def test_card_license(text, expected):
    assert card_license(text) == expected


def folder(tmp_path, card: str | bytes | None):
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "config.json").write_text("{}")
    if card is not None:
        (path / "README.md").write_bytes(card.encode() if isinstance(card, str) else card)
    return str(path)


def test_a_card_naming_its_license_twice_is_unknown(tmp_path):
    """Issue 35: read as its last one, it passed --require-license apache-2.0."""
    from seglabel.core.errors import ConfigError
    from seglabel.core.license import check_allowed

    card = "---\nlicense: cc-by-nc-4.0\ntags: [x]\nlicense: apache-2.0\n---\n"
    lic = checkpoint_license(folder(tmp_path, card), None, "mask2former")
    assert lic.id == UNKNOWN and "ambiguous" in lic.source and "'license' is mapped twice" in lic.source
    with pytest.raises(ConfigError):
        check_allowed(lic, ("apache-2.0",), "m")


def test_a_licence_written_in_words_is_noncommercial_and_compared_as_its_id(tmp_path):
    """Issue 35: 'CC BY-NC-SA 4.0' was recorded as 'cc by-nc-sa 4.0', with no warning."""
    from seglabel.core.license import check_allowed

    lic = checkpoint_license(folder(tmp_path, "---\nlicense: CC BY-NC-SA 4.0\n---\n"), None, "eomt")
    assert lic.id == "cc-by-nc-sa-4.0" and lic.noncommercial
    check_allowed(lic, ("CC-BY-NC-SA-4.0",), "m")  # as a user may write the flag


def test_local_card_and_its_absence(tmp_path):
    lic = checkpoint_license(folder(tmp_path, "---\nlicense: Apache-2.0\n---\n"), None, "eomt")
    assert (lic.id, lic.card, lic.noncommercial) == ("apache-2.0", "apache-2.0", False)
    none = checkpoint_license(str(tmp_path / "nowhere"), None, "eomt")
    assert none.id == UNKNOWN and "no model card" in none.source


def test_an_oversized_card_is_not_read(tmp_path):
    huge = "---\nlicense: mit\n---\n" + "x" * (MAX_CARD_BYTES + 10)
    lic = checkpoint_license(folder(tmp_path, huge), None, "mask2former")
    assert lic.id == UNKNOWN and "over" in lic.source


def test_card_that_is_not_utf8_or_not_text(tmp_path):
    lic = checkpoint_license(folder(tmp_path, b"---\nlicense: mit\n---\n\xff\xfe\x00junk"), None, "eomt")
    assert lic.id == "mit"
    (tmp_path / "b").mkdir()
    lic = checkpoint_license(folder(tmp_path / "b", b"\x00\x01\x02" * 100), None, "eomt")
    assert lic.id == UNKNOWN


def test_url_checkpoint_card():
    fs = fsspec.filesystem("memory")
    fs.pipe("memory://models/m/config.json", b"{}")
    fs.pipe("memory://models/m/README.md", b"---\nlicense: cc-by-nc-sa-4.0\n---\n")
    lic = checkpoint_license("memory://models/m", None, "eomt")
    assert lic.id == "cc-by-nc-sa-4.0" and lic.noncommercial


def test_the_authors_statement_overrides_the_hub_card_without_asking_the_hub(monkeypatch):
    """The event, not a time: the Hub is never asked for the card (a 5 s limit said so on an
    idle machine); the same lookup for a checkpoint with no statement does ask."""
    import huggingface_hub

    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    lic = checkpoint_license("facebook/mask2former-swin-large-coco-panoptic", None, "mask2former")
    assert lic.id == "cc-by-nc-4.0" and lic.noncommercial and "MODEL_ZOO" in lic.source
    assert asked == []
    checkpoint_license("tue-mps/coco_panoptic_eomt_large_640", None, "eomt")
    assert asked == [("tue-mps/coco_panoptic_eomt_large_640", "README.md")]  # the probe sees a request


def test_an_unreachable_hub_card_is_unknown_never_guessed():
    lic = checkpoint_license("tue-mps/coco_panoptic_eomt_large_640", None, "eomt")  # offline here
    assert lic.id == UNKNOWN and "Hub model card could not be read" in lic.source


def test_a_link_to_an_authors_release_in_a_cache_carries_its_statement(tmp_path):
    """Issue 35: the cache's snapshot folder read as cc-by-nc-4.0, a symlink to it as the card's
    'other' (accepted by --require-license other, no non-commercial warning)."""
    repo = "models--facebook--mask2former-swin-base-coco-panoptic"
    snapshot = tmp_path / "hf" / "hub" / repo / "snapshots" / "c0"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "README.md").write_text("---\nlicense: other\n---\n")
    link = tmp_path / "m2f"
    link.symlink_to(snapshot)
    linked_files = tmp_path / "m2f-files"  # a --local-dir download made with links
    linked_files.mkdir()
    for name in ("config.json", "README.md"):
        (linked_files / name).symlink_to(snapshot / name)
    for model in (str(snapshot), str(link), f"file://{link}", str(linked_files)):
        lic = checkpoint_license(model, None, "mask2former")
        assert lic.id == "cc-by-nc-4.0" and lic.noncommercial, (model, lic)
    (tmp_path / "fair").mkdir()
    fair = folder(tmp_path / "fair", "---\nlicense: fair-noncommercial-research-license\n---\n")
    assert checkpoint_license(fair, None, "eomt").noncommercial
