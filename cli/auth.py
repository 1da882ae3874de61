"""``mabeam auth create|list|revoke|whoami|init``: the mesh's credentials from the command line.

``create`` prints the new token on stdout and nothing else there, so that it
can be captured (``TOKEN=$(mabeam auth create ci --role reader)``); the mesh
keeps only its digest, so it is shown this once. ``init`` needs no running
service: it writes the first admin and service tokens (files of mode 0600)
straight through etcd, for compose and Kubernetes, where no ``mabeam up`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from mabeam import auth, errors
from mabeam.cli import flags
from mabeam.cli.flags import connection_flags, one_line
from mabeam.client import MeshClient, list_all
from mabeam.v1 import auth_pb2

# Roles people may create (service tokens come from `mabeam auth init` only).
CREATABLE = ("admin", "operator", "agent", "reader")
AGENT_TOKEN_FILE = "agent.token"


def add_auth_parser(sub: Any) -> None:
    """The ``auth`` subcommand of ``mabeam``."""
    p = sub.add_parser(
        "auth",
        help="create, list, revoke and inspect the mesh's tokens; init credentials for compose/Kubernetes",
        parents=[connection_flags()],
    )
    asub = p.add_subparsers(dest="auth_command", required=True)
    nested = [connection_flags()]
    c = asub.add_parser("create", help="create a token (printed once, alone on stdout)", parents=nested)
    c.add_argument("name", help="a name for people: 1-128 characters of [A-Za-z0-9._:@-]")
    c.add_argument("--role", required=True, choices=CREATABLE)
    c.add_argument(
        "--agent-pattern", default="", metavar="GLOB", help="role agent: the agent ids it may act for"
    )
    c.add_argument(
        "--certificate-subject",
        default="",
        metavar="CN",
        help="grant the role to the client certificate with this common name instead of minting a token",
    )
    lst = asub.add_parser("list", help="the mesh's principals (never their tokens)", parents=nested)
    lst.add_argument("--json", action="store_true", help="JSON for scripts")
    r = asub.add_parser("revoke", help="revoke a token (or a certificate's role) by id", parents=nested)
    r.add_argument("id", help="the principal id (mbt_<id>_...), or the whole token")
    w = asub.add_parser("whoami", help="who the mesh takes this command's token for", parents=nested)
    w.add_argument("--json", action="store_true", help="JSON for scripts")
    i = asub.add_parser(
        "init",
        help="write the first admin and service tokens into DIR through etcd (no service needed)",
        description="Bootstrap a mesh's credentials against etcd directly (compose, Kubernetes): "
        "DIR/admin.token and DIR/service.token, mode 0600, registered by digest. "
        "Tokens still valid are kept, so it is safe to run on every start.",
    )
    # Its own --etcd/--prefix (default None: `mabeam --etcd URL auth init` and MABEAM_ETCD fill them).
    i.add_argument("--etcd", default=None, metavar="URL[,URL]", help="etcd endpoints (env MABEAM_ETCD)")
    i.add_argument(
        "--prefix", default=None, help="the mesh's etcd key prefix (env MABEAM_PREFIX, default /mabeam)"
    )
    i.add_argument("--dir", required=True, type=Path, help="where to write the token files")
    i.add_argument("--etcd-ca", help="CA of etcd's certificate (env MABEAM_ETCD_CA)")
    i.add_argument("--etcd-cert", help="client certificate for etcd (env MABEAM_ETCD_CERT)")
    i.add_argument("--etcd-key", help="client key for etcd (env MABEAM_ETCD_KEY)")
    i.add_argument(
        "--agent-token",
        action="store_true",
        help=f"also write DIR/{AGENT_TOKEN_FILE}: a token of role agent (any agent id) for the agents",
    )
    p.set_defaults(func=main)


async def _client(args: argparse.Namespace) -> MeshClient:
    if args.etcd and not args.registry:
        return await flags.connect(args)  # discovery, with the command's TLS for etcd and the services
    return await flags.connect(args, registry=args.registry or "127.0.0.1:50051")


def _describe(p: auth_pb2.Principal) -> str:
    scope = p.certificate_subject and f" certificate {p.certificate_subject}"
    scope += p.agent_pattern and f" agents {p.agent_pattern}"
    return f"{p.id} {p.name} {auth.role_name(p.role)}{scope}"


async def _create(args: argparse.Namespace) -> int:
    request = auth_pb2.CreateTokenRequest(
        name=args.name,
        role=auth.ROLES_BY_NAME[args.role],  # type: ignore[arg-type]
        agent_pattern=args.agent_pattern,
        certificate_subject=args.certificate_subject,
    )
    async with await _client(args) as mesh:
        reply = await mesh.auth.CreateToken(request)
    if reply.token:
        print(reply.token, flush=True)  # alone on stdout: `TOKEN=$(mabeam auth create ...)`
        print(f"created {_describe(reply.principal)}: the token above is shown only once", file=sys.stderr)
    else:
        print(f"granted {_describe(reply.principal)}")
    return 0


async def _list(args: argparse.Namespace) -> int:
    async with await _client(args) as mesh:
        principals = await list_all(
            mesh.auth.ListTokens, auth_pb2.ListTokensRequest(page_size=1000), "principals"
        )
    if args.json:
        doc = [json_format.MessageToDict(p, preserving_proto_field_name=True) for p in principals]
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    print(f"{'ID':<18} {'NAME':<24} {'ROLE':<9} SCOPE")
    for p in principals:
        scope = p.certificate_subject and f"certificate {p.certificate_subject}"
        scope = scope or (p.agent_pattern and f"agents {p.agent_pattern}") or "-"
        print(f"{p.id:<18} {p.name:<24} {auth.role_name(p.role):<9} {scope}")
    return 0


async def _revoke(args: argparse.Namespace) -> int:
    async with await _client(args) as mesh:
        reply = await mesh.auth.RevokeToken(auth_pb2.RevokeTokenRequest(id=args.id))
    print(f"revoked {_describe(reply.principal)}")
    return 0


async def _whoami(args: argparse.Namespace) -> int:
    async with await _client(args) as mesh:
        reply = await mesh.auth.WhoAmI(auth_pb2.WhoAmIRequest())
    if args.json:
        print(
            json.dumps(
                json_format.MessageToDict(reply.principal, preserving_proto_field_name=True), sort_keys=True
            )
        )
    else:
        print(_describe(reply.principal))
    return 0


async def _init(args: argparse.Namespace) -> int:
    from mabeam import config as mesh_config
    from mabeam.runtime import auth as runtime_auth
    from mabeam.runtime import etcd as etcd_layer

    if not args.etcd:
        raise ValueError("init talks to etcd directly: pass --etcd URL (or set MABEAM_ETCD)")
    # Only the etcd settings: this process presents no token of its own.
    settings = argparse.Namespace(
        etcd=args.etcd,
        prefix=args.prefix,
        etcd_ca=args.etcd_ca,
        etcd_cert=args.etcd_cert,
        etcd_key=args.etcd_key,
    )
    config = mesh_config.load(settings, env={})
    client = None
    try:
        client = await etcd_layer.connect(config.etcd_endpoints, tls=config.etcd_tls, timeout=10)
        credentials = await runtime_auth.bootstrap(client, config, args.dir)
        files = [("admin", credentials.admin_file), ("service", credentials.service_file)]
        created = list(credentials.created)
        if args.agent_token:
            store = runtime_auth.PrincipalStore(client, config)
            path = args.dir / AGENT_TOKEN_FILE
            if not await _still_valid(store, path, auth.AGENT):
                _, minted = await store.mint("agent-bootstrap", auth.AGENT)
                auth.write_token_file(path, minted)
                created.append("agent")
            files.append(("agent", path))
    except (errors.MabeamError, OSError):
        raise
    except Exception as exc:
        if isinstance(etcd_layer.to_mabeam_error(exc), errors.Unavailable):
            raise errors.Unavailable(
                f"etcd at {','.join(config.etcd_endpoints)} is not reachable: start it, or check --etcd"
            ) from None
        raise
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
    for what, path in files:
        print(f"{what} token: {path} ({'created' if what in created else 'kept: still valid'})")
    return 0


async def _still_valid(store: Any, path: Path, role: int) -> bool:
    """True when ``path`` holds a token the mesh knows, of ``role``."""
    try:
        held = auth.read_token_file(path)
    except errors.MabeamError:
        return False
    record = await store.get(auth.token_id(held) or "")
    return bool(record is not None and record.identity.role == role and record.digest == auth.digest(held))


def main(args: argparse.Namespace) -> int:
    """Entry point of ``mabeam auth``."""
    commands = {"create": _create, "list": _list, "revoke": _revoke, "whoami": _whoami, "init": _init}
    try:
        return asyncio.run(commands[args.auth_command](args))
    except ValueError as exc:
        print(f"mabeam auth: {exc}", file=sys.stderr)
        return 2
    except errors.MabeamError as exc:
        print(f"mabeam: {one_line(exc, args)}", file=sys.stderr)
        return 1
    except OSError as exc:  # the token directory
        print(f"mabeam auth: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
