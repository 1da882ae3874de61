"""`python -m mabeam.services.coordination`: run one coordination replica until SIGTERM/SIGINT."""

import sys

from mabeam.server import run_service
from mabeam.services.coordination.server import build

if __name__ == "__main__":
    sys.exit(run_service("coordination", build))
