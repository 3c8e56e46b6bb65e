"""The licence a checkpoint's weights come under, read from what it carries.

Users label commercially, and a model family's code licence says nothing of its weights:
Mask2Former's code is MIT, but its authors release every trained model under CC BY-NC 4.0, while
the Hub conversions' cards say "other". So seglabel reads what a checkpoint declares (the
``license:`` field of its model card's front matter, ``README.md`` beside ``config.json``), and a
short table of what the authors state otherwise, with its source, takes precedence. Nothing is
guessed: a checkpoint without a readable card is ``unknown``.
"""

from __future__ import annotations

import os
import re

from ..core.errors import one_line
from ..core.license import UNKNOWN, License, spdx_id
from ..core.redaction import get_logger

log = get_logger(__name__)

# A model card larger than this is not read (a README is a few kB; a hostile one could be GBs).
MAX_CARD_BYTES = 1 << 20

# What the authors state where a Hub card says otherwise or nothing: (pattern over the Hub id,
# licence id, source). Checked before the card.
AUTHORS_STATE = (
    (
        # The Hub id, or a copy of it in a Hugging Face cache ("models--facebook--mask2former-…").
        re.compile(r"(^|/)(models--)?facebook(/|--)(mask2former|maskformer)-", re.IGNORECASE),
        "cc-by-nc-4.0",
        "the authors' MODEL_ZOO.md (facebookresearch/Mask2Former, facebookresearch/MaskFormer): "
        "all released models are CC BY-NC 4.0; the Hub card says 'other'",
    ),
)
# A family whose backbone carries a licence of its own, whatever the checkpoint's card says.
BACKBONE_LICENSES = {
    "eomt_dinov3": (
        "dinov3-license",
        "EoMT on a DINOv3 backbone: the backbone's weights are under Meta's DINOv3 License, "
        "not the card's {card!r}",
    ),
}


class AmbiguousCard(ValueError):
    """A model card whose front matter names a key twice (``license:`` and later ``license:``):
    YAML readers keep the last, a person reading it the first."""


def card_license(text: str) -> str | None:
    """The ``license:`` of a model card's YAML front matter as an SPDX-style id (``spdx_id``);
    None without one. Raises :class:`AmbiguousCard` when the front matter names a key twice."""
    import yaml
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    from ..storage.spec import UniqueKeyLoader

    block = REGEX_YAML_BLOCK.search(text)
    if block is None:
        return None
    try:
        data = yaml.load(block.group(2), Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.constructor.ConstructorError as exc:
        if "mapped twice" in str(exc):
            raise AmbiguousCard(one_line(exc)) from exc
        log.debug("model card front matter not readable: %s", one_line(exc))
        return None
    except Exception as exc:  # a card is user data: any parse failure means "no licence read"
        log.debug("model card front matter not readable: %s", one_line(exc))
        return None
    value = data.get("license") if isinstance(data, dict) else None
    return spdx_id(value) if isinstance(value, str) and value.strip() else None


def checkpoint_license(model: str, revision: str | None, family: str) -> License:
    """The licence of the checkpoint ``model`` (a Hub id, a local folder or a folder URL). The
    authors' statements are matched on the name given and, for a local folder, on where its
    links lead (a link to a Hugging Face cache's snapshot is that snapshot's release)."""
    names = [model]
    local = model[len("file://"):] if model.startswith("file://") else model
    if "://" not in local and os.path.isdir(local):
        # The folder, and its files, where their links lead: a --local-dir download made with
        # links, or a folder linked to a cache's snapshot, is that snapshot's release.
        names += [os.path.realpath(local)] + [os.path.realpath(os.path.join(local, name))
                                              for name in ("config.json", "model.safetensors")]
    stated = next(((lic, src) for pattern, lic, src in AUTHORS_STATE for name in names
                   if pattern.search(name)), None)
    if stated is not None and family not in BACKBONE_LICENSES:
        return License(stated[0], stated[1], None)  # the card is not what counts: not fetched
    text, where = _read_card(model, revision)
    try:
        card = card_license(text) if text is not None else None
    except AmbiguousCard as exc:
        return License(UNKNOWN, f"its model card is ambiguous ({exc}; {where})", None)
    if family in BACKBONE_LICENSES:
        lic, source = BACKBONE_LICENSES[family]
        return License(lic, source.format(card=card or UNKNOWN), card)
    if card is None:
        why = "its model card has no license field" if text is not None else where
        return License(UNKNOWN, why, None)
    return License(card, f"the model card's license field ({where})", card)


def _read_card(model: str, revision: str | None) -> tuple[str | None, str]:
    """The model card's text and where it was read, or None and why there is none. Read as any
    input is (``storage.read_bytes``): at most ``MAX_CARD_BYTES``, and on a local disk only from
    a regular file (a FIFO named README.md would block the run for ever)."""
    from ..core.errors import Unreadable
    from ..storage.read import read_bytes
    from .checkpoint import checkpoint_file, is_hub_id

    if not is_hub_id(model):
        path, where = checkpoint_file(model, "README.md"), "README.md"
    else:
        try:
            from huggingface_hub import hf_hub_download

            path, where = hf_hub_download(model, "README.md", revision=revision), "the Hub's README.md"
        except Exception as exc:  # offline, gated, missing: the licence is then unknown, never guessed
            return None, f"the Hub model card could not be read: {one_line(exc)}"
    try:
        return read_bytes(path, None, MAX_CARD_BYTES).decode("utf-8", "replace"), where
    except FileNotFoundError:
        return None, "no model card (README.md) beside the checkpoint"
    except Unreadable as exc:  # not a regular file, or larger than a card can be
        why = "is not a regular file" if "regular" in str(exc) else f"is over {MAX_CARD_BYTES} bytes"
        return None, f"the model card {why}: not read"
    except (OSError, ValueError) as exc:
        return None, f"the model card could not be read: {one_line(exc)}"
