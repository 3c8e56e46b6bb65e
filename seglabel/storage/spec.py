"""Job specs: a YAML mapping of settings, read from a local path, any fsspec URL or an
environment variable, bounded in size and in what its aliases expand to; and the YAML reader
that every YAML seglabel reads goes through (specs, label maps, model cards' front matter)."""

from __future__ import annotations

import os
from typing import Any

import yaml

from ..core.config import check_expansion
from ..core.errors import ConfigError


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice: YAML and JSON readers keep
    the last one without a word, so what a reader of the file sees first (a label map's first
    line for a label, a card's first ``license:``, a spec's first setting) is not what counts."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                key: Any = "<<"  # once: ``<<: [*a, *b]`` says the order of several, two ``<<`` do not
            else:
                key = self.construct_object(key_node, deep=deep)
            try:
                twice = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: YAML's own constructor refuses it
                continue
            if twice:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is mapped twice",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

# A job spec is a few settings: past this it is not one (and a YAML document is walked whole).
MAX_SPEC_BYTES = 1 << 20


def load_spec(path: str) -> dict[str, Any]:
    """Read a YAML job spec (a mapping of settings) from a local path, an fsspec URL, or
    ``env:NAME`` (an environment variable holding the YAML, as ``seglabel submit`` ships it).

    The text is bounded (``MAX_SPEC_BYTES``), and so is what its aliases expand to
    (:func:`check_expansion`): nested aliases make a few hundred bytes into a document of
    billions of values (a "billion laughs"), which every walk of the settings (the secret
    check, the config) would expand. Anchors and merge keys that share storage options are
    fine."""
    from .filesystem import open_url

    try:
        if path.startswith("env:"):
            if path[4:] not in os.environ:
                raise FileNotFoundError(path)
            text = os.environ[path[4:]]
        else:
            fs, where = open_url(path)  # a local name with '::' is a path, not a chain
            with fs.open(where, "r") as f:
                text = f.read(MAX_SPEC_BYTES + 1)
        if len(text) > MAX_SPEC_BYTES:
            raise ConfigError(f"job spec {path} is over {MAX_SPEC_BYTES >> 20} MiB: not a job spec")
        values = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError as exc:
        raise ConfigError(f"job spec {path} not found") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"job spec {path} is not UTF-8 text") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"job spec {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"job spec {path} must be a mapping of settings, got {type(values).__name__}")
    check_expansion(values, f"job spec {path}")
    return values
