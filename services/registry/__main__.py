"""`python -m mabeam.services.registry`: run one registry replica until SIGTERM/SIGINT."""

import sys

from mabeam.server import run_service
from mabeam.services.registry.server import build

if __name__ == "__main__":
    sys.exit(run_service("registry", build))
