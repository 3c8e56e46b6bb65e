"""``python -m seglabel.cli ...``: the same as the ``seglabel`` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
