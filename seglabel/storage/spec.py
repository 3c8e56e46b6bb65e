"""Job specs: a YAML mapping of settings, read from a local path, any fsspec URL or an
environment variable, bounded in size and in what its aliases expand to."""

from __future__ import annotations

import os
from typing import Any

from ..core.config import check_expansion
from ..core.errors import ConfigError

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
    import fsspec
    import yaml

    try:
        if path.startswith("env:"):
            if path[4:] not in os.environ:
                raise FileNotFoundError(path)
            text = os.environ[path[4:]]
        else:
            with fsspec.open(path, "r") as f:
                text = f.read(MAX_SPEC_BYTES + 1)
        if len(text) > MAX_SPEC_BYTES:
            raise ConfigError(f"job spec {path} is over {MAX_SPEC_BYTES >> 20} MiB: not a job spec")
        values = yaml.safe_load(text)
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
