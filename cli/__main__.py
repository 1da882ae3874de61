"""``python -m mabeam.cli``: the ``mabeam`` command without its console script."""

import sys

from mabeam.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
