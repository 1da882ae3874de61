"""Where the mesh is and who is calling: the connection flags of every client subcommand of ``mabeam``.

They are argparse parent parsers, given to the ``mabeam`` parser itself, to a
subcommand and to each of its own subcommands, so that a person may put them
anywhere: ``mabeam --planner HOST:PORT goal run FILE``, ``mabeam goal
--planner HOST:PORT run FILE`` and ``mabeam goal run FILE --planner
HOST:PORT`` are the same command.

Every copy has no default (``argparse.SUPPRESS``, or a distinct ``dest`` on the
top-level parser): argparse copies a subcommand's defaults over what was
parsed before its name. :func:`resolve` then merges the copies (the one
nearest the end wins) and fills in the environment and the defaults.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from mabeam import auth, errors
from mabeam.config import DEFAULT_PORTS

# The connection flags' dests, and the environment variable each falls back on.
CONNECTION: dict[str, str] = {
    **{service: f"MABEAM_{service.upper()}" for service in DEFAULT_PORTS},
    "etcd": "MABEAM_ETCD",
    "prefix": "MABEAM_PREFIX",
    "token_file": auth.TOKEN_FILE_ENV,
}
_TOP = "top_"  # dest prefix of the copies on the ``mabeam`` parser itself


def connection_flags(*, nested: bool = True, top: bool = False) -> argparse.ArgumentParser:
    """A parent parser with ``--registry`` … ``--planner``, ``--etcd``, ``--prefix`` and ``--token-file``.

    ``top``: the copy of the ``mabeam`` parser (its values go to ``top_<dest>``).
    ``nested`` is kept for callers of the older signature: every copy is without defaults.
    """
    del nested
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("where the mesh is, who calls (anywhere on the command line)")

    def add(flag: str, dest: str, **kw: Any) -> None:
        group.add_argument(flag, dest=(_TOP + dest) if top else dest, default=argparse.SUPPRESS, **kw)

    for service, port in DEFAULT_PORTS.items():
        add(
            f"--{service}",
            service,
            metavar="HOST:PORT",
            help=f"the {service} (env MABEAM_{service.upper()}, default 127.0.0.1:{port})",
        )
    add(
        "--etcd", "etcd", metavar="URL[,URL]", help="find the services through etcd instead (env MABEAM_ETCD)"
    )
    add("--prefix", "prefix", help="the mesh's etcd key prefix (env MABEAM_PREFIX, default /mabeam)")
    add(
        "--token-file",
        "token_file",
        metavar="FILE",
        help="the token to present (env MABEAM_TOKEN_FILE; default $MABEAM_TOKEN, "
        "else the admin.token `mabeam up` wrote in its data directory)",
    )
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Merge the copies of the connection flags in ``args`` and fill in the environment and defaults.

    After it, ``args`` has every dest of :data:`CONNECTION`: a service's
    address or "" (the caller picks its default port), ``etcd`` ("" for
    none), ``prefix`` and ``token_file`` (None: :func:`token` finds one).
    A subcommand's own flag of the same name (``mabeam up --etcd``) wins over
    the top-level copy, as does any copy given after the subcommand's name.
    """
    for dest, var in CONNECTION.items():
        top = getattr(args, _TOP + dest, None)
        if hasattr(args, _TOP + dest):
            delattr(args, _TOP + dest)
        value = getattr(args, dest, None)
        if value is None:
            value = top
        if value is None and dest != "token_file":  # the token file's variable is read by default_token
            value = os.environ.get(var) or None
        if value is None and dest == "prefix":
            value = "/mabeam"
        if value is None and dest != "token_file":
            value = ""
        setattr(args, dest, value)
    return args


def token(args: argparse.Namespace) -> str | None:
    """The token a command presents: ``--token-file``, else :func:`mabeam.auth.default_token`.

    A file that cannot be read, or holds no token, is a one-line
    FAILED_PRECONDITION naming it.
    """
    path = getattr(args, "token_file", None)
    if path:
        return auth.read_token_file(Path(path).expanduser())
    return auth.default_token()


def one_line(exc: errors.MabeamError) -> str:
    """A mesh error as the command prints it after ``mabeam:``, with what to do for a credentials problem."""
    first = (exc.message.strip().splitlines() or [""])[0]
    if isinstance(exc, errors.Unauthenticated):
        return f"unauthenticated: {first}; set MABEAM_TOKEN or --token-file"
    if isinstance(exc, errors.PermissionDenied):
        return f"permission denied: {first}; use a token with a role that may do it (mabeam auth whoami)"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
