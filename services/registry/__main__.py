"""`python -m mabeam.services.registry`: run one registry replica until SIGTERM/SIGINT."""

import os
import sys

# Set before grpc loads: the registry forks supervised agents from a process
# running grpc threads; grpc's fork handlers only log noise there, and the
# children exec at once.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from mabeam.runtime.service import run_service
from mabeam.services.registry.server import build

if __name__ == "__main__":
    sys.exit(run_service("registry", build))
