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

TLS, for the calls to the services and to etcd (``docs/operations.md``):

=====================  ================================  =============================================
flag                   environment                       meaning
=====================  ================================  =============================================
``--tls-ca FILE``      ``MABEAM_CLIENT_TLS_CA``          CA the services' certificates must chain to:
                                                         TLS on
``--tls-cert FILE``    ``MABEAM_CLIENT_TLS_CERT``        client certificate (mutual TLS), with
``--tls-key FILE``     ``MABEAM_CLIENT_TLS_KEY``         its key
``--tls-server-name``  ``MABEAM_CLIENT_TLS_SERVER_NAME`` name checked in the services' certificates
                                                         instead of the address's host
``--etcd-ca/-cert/``   ``MABEAM_ETCD_CA/CERT/KEY``       TLS to etcd (discovery, ``maintenance``)
``-key``
=====================  ================================  =============================================

Any of the four ``--tls-*`` switches TLS on (without ``--tls-ca``: the
system's roots). The client's variables are not the services' ``MABEAM_TLS_*``:
for a service those name its own certificate and the CA of *client*
certificates (``docs/decisions.md``). A client flag's dest is
``client_tls_*``, not ``tls_*``: ``mabeam up`` has ``--tls-*`` flags of its
own, for the services it serves.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mabeam import auth, errors
from mabeam.config import DEFAULT_PORTS
from mabeam.tls import TLS

if TYPE_CHECKING:
    from mabeam.client import MeshClient

# The connection flags' dests, and the environment variable each falls back on.
CONNECTION: dict[str, str] = {
    **{service: f"MABEAM_{service.upper()}" for service in DEFAULT_PORTS},
    "etcd": "MABEAM_ETCD",
    "prefix": "MABEAM_PREFIX",
    "token_file": auth.TOKEN_FILE_ENV,
}
# TLS for the calls to the services and to etcd: dest -> environment variable (None when unset).
TLS_FLAGS: dict[str, str] = {
    "client_tls_ca": "MABEAM_CLIENT_TLS_CA",
    "client_tls_cert": "MABEAM_CLIENT_TLS_CERT",
    "client_tls_key": "MABEAM_CLIENT_TLS_KEY",
    "client_tls_server_name": "MABEAM_CLIENT_TLS_SERVER_NAME",
    "etcd_ca": "MABEAM_ETCD_CA",
    "etcd_cert": "MABEAM_ETCD_CERT",
    "etcd_key": "MABEAM_ETCD_KEY",
}
_TOP = "top_"  # dest prefix of the copies on the ``mabeam`` parser itself


def connection_flags(*, nested: bool = True, top: bool = False) -> argparse.ArgumentParser:
    """A parent parser with ``--registry`` … ``--planner``, ``--etcd``, ``--prefix``, ``--token-file``
    and the TLS flags (``--tls-ca/--tls-cert/--tls-key/--tls-server-name``, ``--etcd-ca/-cert/-key``).

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
    add(
        "--tls-ca",
        "client_tls_ca",
        metavar="FILE",
        help="CA the services' certificates must chain to: TLS on (env MABEAM_CLIENT_TLS_CA)",
    )
    add(
        "--tls-cert",
        "client_tls_cert",
        metavar="FILE",
        help="client certificate, for services that require one: mutual TLS (env MABEAM_CLIENT_TLS_CERT)",
    )
    add("--tls-key", "client_tls_key", metavar="FILE", help="its key (env MABEAM_CLIENT_TLS_KEY)")
    add(
        "--tls-server-name",
        "client_tls_server_name",
        metavar="NAME",
        help="name to check in the services' certificates instead of the address's host "
        "(env MABEAM_CLIENT_TLS_SERVER_NAME)",
    )
    add("--etcd-ca", "etcd_ca", metavar="FILE", help="CA of etcd's certificate (env MABEAM_ETCD_CA)")
    add("--etcd-cert", "etcd_cert", metavar="FILE", help="client certificate for etcd (env MABEAM_ETCD_CERT)")
    add("--etcd-key", "etcd_key", metavar="FILE", help="client key for etcd (env MABEAM_ETCD_KEY)")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Merge the copies of the connection flags in ``args`` and fill in the environment and defaults.

    After it, ``args`` has every dest of :data:`CONNECTION`: a service's
    address or "" (the caller picks its default port), ``etcd`` ("" for
    none), ``prefix`` and ``token_file`` (None: :func:`token` finds one).
    A subcommand's own flag of the same name (``mabeam up --etcd``) wins over
    the top-level copy, as does any copy given after the subcommand's name.
    The TLS dests of :data:`TLS_FLAGS` are a path (or name), or None.
    """
    for dest, var in {**CONNECTION, **TLS_FLAGS}.items():
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
        if value is None and dest in CONNECTION and dest != "token_file":
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


def client_tls(args: argparse.Namespace) -> TLS | None:
    """The TLS of a command's calls to the services (:data:`TLS_FLAGS`), None for plaintext.

    A file named that cannot be read, or a certificate without its key, is a
    one-line FAILED_PRECONDITION naming the flag.
    """
    ca, cert, key, name = (getattr(args, dest, None) for dest in list(TLS_FLAGS)[:4])
    if not (ca or cert or key or name):
        return None
    if bool(cert) != bool(key):
        raise errors.FailedPrecondition(
            "--tls-cert and --tls-key go together (MABEAM_CLIENT_TLS_CERT, MABEAM_CLIENT_TLS_KEY)"
        )
    for flag, path in (("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)):
        if path and not os.access(Path(path).expanduser(), os.R_OK):
            raise errors.FailedPrecondition(f"{flag} {path}: no such file, or not readable")

    def expand(path: str | None) -> str | None:
        return str(Path(path).expanduser()) if path else None

    return TLS(ca_file=expand(ca), cert_file=expand(cert), key_file=expand(key), server_name=name or None)


DEFAULT_ETCD = "http://127.0.0.1:2379"


def etcd_settings(args: argparse.Namespace) -> tuple[list[str], TLS | None]:
    """The etcd endpoints and TLS of a command: its flags, else ``MABEAM_ETCD*``, else ``mabeam up``'s etcd."""
    raw = getattr(args, "etcd", "") or os.environ.get("MABEAM_ETCD") or DEFAULT_ETCD
    endpoints = [e.strip() for e in raw.split(",") if e.strip()]
    ca, cert, key = (
        getattr(args, f"etcd_{part}", None) or os.environ.get(f"MABEAM_ETCD_{part.upper()}") or None
        for part in ("ca", "cert", "key")
    )
    tls = TLS(ca_file=ca, cert_file=cert, key_file=key) if (ca or cert or key) else None
    return endpoints, tls


def etcd_tls(args: argparse.Namespace) -> TLS | None:
    """The TLS of a command's calls to etcd (``--etcd-ca/--etcd-cert/--etcd-key``), None for plaintext."""
    return etcd_settings(args)[1]


async def connect(args: argparse.Namespace, **addresses: str) -> MeshClient:
    """A client of the services with this command's token and TLS.

    ``addresses``: the services to reach by address (``registry="host:port"``);
    none: every service through etcd discovery (``--etcd``).
    """
    from mabeam.client import MeshClient

    presented = token(args) or ""  # "": none found; the mesh then says UNAUTHENTICATED
    tls = client_tls(args)
    if addresses:
        return await MeshClient.connect(**addresses, tls=tls, token=presented)  # type: ignore[arg-type]
    try:
        return await MeshClient.connect(
            etcd=args.etcd.split(","), prefix=args.prefix, tls=tls, etcd_tls=etcd_tls(args), token=presented
        )
    except errors.MabeamError:
        raise
    except Exception as exc:  # etcd's own errors (grpc's, not the mesh's): one line, not a traceback
        raise errors.Unavailable(
            f"etcd at {args.etcd} did not list the services ({first_line(exc)}): check --etcd "
            "(and --etcd-ca/--etcd-cert/--etcd-key for TLS to etcd)"
        ) from None


def first_line(exc: BaseException) -> str:
    """The first line of an error that is not the mesh's (grpc's own: its details)."""
    details = getattr(exc, "details", None)
    text = details() if callable(details) else str(exc)
    return (str(text or "").strip().splitlines() or [type(exc).__name__])[0]


def one_line(exc: errors.MabeamError, args: argparse.Namespace | None = None) -> str:
    """A mesh error as the command prints it after ``mabeam:``, with what to do for a credentials problem.

    With the command's ``args``, a connection refused or cut at once says
    what to try about TLS: ``--tls-ca`` when the command spoke plaintext, the
    TLS flags when the handshake failed.
    """
    first = (exc.message.strip().splitlines() or [""])[0]
    if isinstance(exc, errors.Unavailable) and args is not None:
        hint = tls_hint(first, args)
        if hint:
            text = str(exc).strip()
            return f"{text.splitlines()[0] if text else 'UNAVAILABLE'}; {hint}"
    if isinstance(exc, errors.Unauthenticated):
        return f"unauthenticated: {first}; set MABEAM_TOKEN or --token-file"
    if isinstance(exc, errors.PermissionDenied):
        return f"permission denied: {first}; use a token with a role that may do it (mabeam auth whoami)"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def tls_hint(message: str, args: argparse.Namespace) -> str:
    """What to try about TLS for a failed connection's ``message`` ("" when TLS is not the likely cause)."""
    lowered = message.lower()
    if any(word in lowered for word in ("handshake", "certificate", "hostname verification", "ssl")):
        return (
            "TLS failed: check --tls-ca (the CA the services' certificates chain to), "
            "--tls-server-name, and --tls-cert/--tls-key if the services require a client certificate"
        )
    if "socket closed" in lowered or "connection reset" in lowered:
        if client_tls_given(args):
            return "the services may require a client certificate: --tls-cert/--tls-key"
        return "the services may speak TLS: pass --tls-ca FILE (env MABEAM_CLIENT_TLS_CA)"
    return ""


def client_tls_given(args: argparse.Namespace) -> bool:
    """Whether the command was given any ``--tls-*`` (or its variable)."""
    return any(getattr(args, dest, None) for dest in list(TLS_FLAGS)[:4])
