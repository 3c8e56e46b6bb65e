"""The entrypoint a Ray cluster runs for a submitted job: ``python -m seglabel.jobs_entry
--config spec.yaml [flags]``.

Thin on purpose: it reads the spec and takes the same code path as ``seglabel run``, so that a
job behaves the same on a laptop, on a VM cluster and under KubeRay. It lives inside the
package so that it works both when ``jobs/`` travels in a runtime_env's working_dir and when
the cluster only has the installed package from the container image.
"""

from __future__ import annotations

import sys
from typing import Sequence

from .cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``seglabel run`` with these arguments (``--config SPEC`` and any overriding flags)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return cli_main(["run", *args])


if __name__ == "__main__":
    sys.exit(main())
