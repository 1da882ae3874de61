"""`python -m mabeam.services.planner`: run one planner replica until SIGTERM/SIGINT.

Beyond the mesh's flags, the planner takes how long finished goals are kept:
``--goal-retention`` (env ``MABEAM_GOAL_RETENTION``: 7d, 36h, 90m, 600s; 0 keeps
them for good; default 7 days) and ``--goal-retention-count`` (env
``MABEAM_GOAL_RETENTION_COUNT``: keep at most this many finished goals, the
oldest deleted first; 0, the default, for no cap). See
:mod:`mabeam.runtime.retention`. ``--agent-idle`` (env
``MABEAM_PLANNER_AGENT_IDLE``, seconds, default 60): how long an agent the
planner started for a goal (``may_start_agents``) may run no step before the
planner stops it (:mod:`.launcher`).
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
from mabeam.services.planner.launcher import idle_seconds
from mabeam.services.planner.server import build, builder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    retention.add_flags(parser, "goal")

    a = parser.add_argument_group("agents the planner starts (goals with may_start_agents)")
    a.add_argument(
        "--agent-idle",
        metavar="SECONDS",
        help="stop an agent the planner started once it has run no step for this long "
        "(env MABEAM_PLANNER_AGENT_IDLE; default 60)",
    )


def configure(args: argparse.Namespace) -> BuildFn:
    """The build function of a planner with these flags over the environment (checked now)."""
    return builder(
        retention.from_flags("goal", args, os.environ),
        idle_seconds(os.environ, args.agent_idle),
    )


if __name__ == "__main__":
    sys.exit(run_service("planner", build, add_arguments=add_arguments, configure=configure))
