"""Entrypoint script for Ray Jobs: ``python jobs/run_job.py --config jobs/coco-instance.yaml``.

Everything happens in the installed package (``seglabel.jobs_entry``), so this script and
``python -m seglabel.jobs_entry`` are the same job.
"""

import sys

from seglabel.jobs_entry import main

if __name__ == "__main__":
    sys.exit(main())
