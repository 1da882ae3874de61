"""`python -m mabeam.services.orchestrator`: run one orchestrator replica until SIGTERM/SIGINT."""

import sys

from mabeam.server import run_service
from mabeam.services.orchestrator.server import build

if __name__ == "__main__":
    sys.exit(run_service("orchestrator", build))
