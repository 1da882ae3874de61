"""`python -m mabeam.services.registry`: run one registry replica until SIGTERM/SIGINT.

Beyond the mesh's flags, the registry takes what it may launch:
``--agent-catalog FILE`` (env ``MABEAM_AGENT_CATALOG``), the agent kinds
StartAgent and MigrateAgent may start, and ``--allow-argv`` (env
``MABEAM_ALLOW_ARGV=1``), which also allows free-form commands and entry
points: development only (see :mod:`mabeam.services.registry.catalog`).

And how long stopped and failed supervised records are kept:
``--supervised-retention`` (env ``MABEAM_SUPERVISED_RETENTION``, e.g. 7d, 36h,
0 = for good; default 7 days) and ``--supervised-retention-count`` (env
``MABEAM_SUPERVISED_RETENTION_COUNT``, a cap on how many, 0 = none), see
:mod:`mabeam.runtime.retention`.

And the node it runs on (:mod:`mabeam.services.registry.nodes`):
``--node-name NAME`` (env ``MABEAM_NODE_NAME``; default the host name) and
``--node-label KEY=VALUE``, repeatable (env ``MABEAM_NODE_LABELS=zone=a,rack=3``).
StartAgent's placement chooses among the nodes of the live replicas.
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
from mabeam.services.registry import catalog, nodes
from mabeam.services.registry.server import build, builder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("launching agents")
    g.add_argument(
        "--agent-catalog",
        metavar="FILE",
        help=f"YAML catalog of the agent kinds StartAgent may launch (env {catalog.CATALOG_ENV})",
    )
    g.add_argument(
        "--allow-argv",
        action="store_true",
        default=None,
        help=f"also launch free-form commands and entry points: ANY program; development only "
        f"(env {catalog.ALLOW_ARGV_ENV}=1)",
    )
    n = parser.add_argument_group("node")
    n.add_argument(
        "--node-name",
        metavar="NAME",
        help=f"the node this replica runs on (env {nodes.NODE_NAME_ENV}; default the host name)",
    )
    n.add_argument(
        "--node-label",
        metavar="KEY=VALUE",
        action="append",
        help=f"a label of the node, e.g. zone=a; repeatable (env {nodes.NODE_LABELS_ENV}=zone=a,rack=3)",
    )
    retention.add_flags(parser, "supervised")


def configure(args: argparse.Namespace) -> BuildFn:
    """The build function of a registry with these flags over the environment (the catalog checked now)."""
    env = os.environ
    catalog_file = args.agent_catalog or env.get(catalog.CATALOG_ENV) or None
    allow_argv = bool(args.allow_argv) or catalog.truthy(env.get(catalog.ALLOW_ARGV_ENV))
    kept = retention.from_flags("supervised", args, env)
    node = nodes.NodeSpec.load(env, args.node_name, args.node_label)
    return builder(catalog.policy(catalog_file, allow_argv), kept, node)


if __name__ == "__main__":
    sys.exit(run_service("registry", build, add_arguments=add_arguments, configure=configure))
