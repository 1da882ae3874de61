"""`python -m mabeam.services.coordination`: run one coordination replica until SIGTERM/SIGINT.

Beyond the mesh's flags, how long finished sessions are kept:
``--session-retention`` (env ``MABEAM_SESSION_RETENTION``: ``7d``, ``36h``,
``90m``, ``600s``; ``0`` keeps them for good; default 7 days) and
``--session-retention-count`` (env ``MABEAM_SESSION_RETENTION_COUNT``: keep at
most this many, the oldest finished deleted first; 0, the default: no cap).
See :mod:`mabeam.services.coordination.store` and docs/operations.md.
"""

import argparse
import os
import sys

# Set before grpc loads: the registry forks supervised agents from a process
# running grpc threads; grpc's fork handlers only log noise there, and the
# children exec at once.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from mabeam.runtime import retention
from mabeam.runtime.service import BuildFn, run_service
from mabeam.services.coordination.server import build, builder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    retention.add_flags(parser, "session")


def configure(args: argparse.Namespace) -> BuildFn:
    """The build function of a coordination service with these flags over the environment."""
    return builder(retention.from_flags("session", args, os.environ))


if __name__ == "__main__":
    sys.exit(run_service("coordination", build, add_arguments=add_arguments, configure=configure))
