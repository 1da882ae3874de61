"""`python -m mabeam.services.planner`: run one planner replica until SIGTERM/SIGINT."""

import sys

from mabeam.server import run_service
from mabeam.services.planner.server import build

if __name__ == "__main__":
    sys.exit(run_service("planner", build))
