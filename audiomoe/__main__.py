"""``python -m audiomoe``: the ``audiomoe`` command line (what ``torchrun ... -m audiomoe train ...`` runs on each rank)."""

import sys

from audiomoe.cli import main

if __name__ == "__main__":
    sys.exit(main())
