"""A package's public names, each imported from its module when first asked for (PEP 562).

Every subpackage's ``__init__`` names its public surface this way, so that importing one module
of a subpackage (the driver reading a checkpoint's config, ``seglabel --help``) loads none of
its siblings: torch comes with the engine's Segmenter, Ray with the job's pipeline, pyarrow
with the outputs' store, each only when a name that needs it is used.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping


def public_names(package: str,
                 names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module ``__getattr__`` and ``__dir__`` for ``package`` (its ``__name__``) whose public
    ``names`` map to the module (relative to the package) each comes from."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)  # the next lookup is the module's own
        return value

    def __dir__() -> list[str]:
        return sorted({*names, *vars(sys.modules[package])})

    return __getattr__, __dir__
