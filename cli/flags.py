"""Where the mesh is: the connection flags every client subcommand of ``mabeam`` takes.

They are argparse parent parsers, given to a subcommand and to each of its own
subcommands, so that a person may put them anywhere after the subcommand's
name: ``mabeam goal --planner HOST:PORT run FILE`` and ``mabeam goal run FILE
--planner HOST:PORT`` are the same command. A nested subcommand's copy has no
defaults (``argparse.SUPPRESS``): otherwise its defaults would overwrite what
was given before its name.
"""

from __future__ import annotations

import argparse
import os

from mabeam.config import DEFAULT_PORTS


def connection_flags(*, nested: bool = False) -> argparse.ArgumentParser:
    """A parent parser with ``--registry`` … ``--planner``, ``--etcd`` and ``--prefix``.

    ``nested``: for a subcommand of a subcommand (no defaults, see the module's docstring).
    """
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("where the mesh is (anywhere after the subcommand)")

    def default(value: str | None) -> str | None:
        return argparse.SUPPRESS if nested else value

    for service, port in DEFAULT_PORTS.items():
        group.add_argument(
            f"--{service}",
            default=default(None),
            metavar="HOST:PORT",
            help=f"the {service} (env MABEAM_{service.upper()}, default 127.0.0.1:{port})",
        )
    group.add_argument(
        "--etcd",
        default=default(os.environ.get("MABEAM_ETCD", "")),
        metavar="URL[,URL]",
        help="find the services through etcd instead (env MABEAM_ETCD)",
    )
    group.add_argument(
        "--prefix",
        default=default(os.environ.get("MABEAM_PREFIX", "/mabeam")),
        help="the mesh's etcd key prefix (env MABEAM_PREFIX, default /mabeam)",
    )
    return parser
