"""``python -m seglabel ...``: the same as the ``seglabel`` command."""

import sys

from seglabel.cli import main

if __name__ == "__main__":
    sys.exit(main())
