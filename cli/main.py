"""The ``mabeam`` command: ``up`` runs a mesh on this machine, ``bench`` measures it.

``up`` takes the mesh flags of :mod:`mabeam.config` (and their ``MABEAM_*``
variables); the client subcommands take the connection flags of
:mod:`mabeam.cli.flags`, before or after their names, and present a token
(``--token-file``, ``$MABEAM_TOKEN``, ``$MABEAM_TOKEN_FILE``, or the admin
token ``mabeam up`` wrote) without being asked.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from mabeam import config as mesh_config
from mabeam.config import SERVICE_NAMES, SERVICES


def _up_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "up",
        help="run etcd and the four services until interrupted",
        description="Start an embedded etcd (or use --etcd) and the four services, "
        "wait until every health check passes, print the endpoints, run until Ctrl-C/SIGTERM.",
    )
    mesh_config.add_mesh_arguments(p)
    p.add_argument(
        "--etcd-port",
        type=int,
        default=None,
        help="client port of the embedded etcd (env MABEAM_ETCD_PORT, default 2379)",
    )
    p.add_argument(
        "--etcd-peer-port",
        type=int,
        default=None,
        help="peer port of the embedded etcd (env MABEAM_ETCD_PEER_PORT, default 2380)",
    )
    p.add_argument(
        "--etcd-quota-bytes",
        default=None,
        metavar="BYTES",
        help="space quota of the embedded etcd: past it etcd refuses writes (NOSPACE); "
        "a number, or with KiB/MiB/GiB (env MABEAM_ETCD_QUOTA_BYTES, default 2GiB)",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="the production topology on this machine: --etcd-members 3 --replicas 2",
    )
    p.add_argument(
        "--etcd-members",
        type=int,
        default=None,
        help="members of the embedded etcd cluster (default 1; 3 with --cluster); "
        "member i listens on the etcd ports + 10*i",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="replicas of each service (default 1; 2 with --cluster); replica i listens on its port + 100*i",
    )
    p.add_argument(
        "--agent-catalog",
        metavar="FILE",
        default=None,
        help="YAML catalog of the agent kinds the registry may launch (env MABEAM_AGENT_CATALOG)",
    )
    p.add_argument(
        "--allow-argv",
        action="store_true",
        help="let the registry also launch free-form commands and entry points: ANY program; "
        "development only (env MABEAM_ALLOW_ARGV=1)",
    )
    p.set_defaults(func=_cmd_up)


def _launch_settings(args: argparse.Namespace) -> tuple[str | None, bool]:
    """``--agent-catalog`` (absolute, its file checked now) and ``--allow-argv``, over their variables."""
    from pathlib import Path

    from mabeam.services.registry import catalog

    raw = args.agent_catalog or os.environ.get(catalog.CATALOG_ENV) or None
    path = str(Path(raw).expanduser().resolve()) if raw else None
    if path is not None:
        catalog.load(path)
    return path, bool(args.allow_argv) or catalog.truthy(os.environ.get(catalog.ALLOW_ARGV_ENV))


def _cmd_up(args: argparse.Namespace) -> int:
    import time

    from mabeam.runtime.mesh import LocalMesh, MeshStartError
    from mabeam.server import port_is_free

    started = time.monotonic()
    try:
        config = mesh_config.load(args)
        etcd_port = args.etcd_port or int(os.environ.get("MABEAM_ETCD_PORT") or 2379)
        peer_port = args.etcd_peer_port or int(os.environ.get("MABEAM_ETCD_PEER_PORT") or 2380)
        quota = parse_bytes(args.etcd_quota_bytes or os.environ.get("MABEAM_ETCD_QUOTA_BYTES") or "2GiB")
        members = args.etcd_members or (3 if args.cluster else 1)
        replicas = args.replicas or (2 if args.cluster else 1)
        if members < 1 or replicas < 1:
            raise ValueError(f"--etcd-members {members}, --replicas {replicas}: each is at least 1")
        if members > 1 and config.etcd_endpoints:
            raise ValueError("--etcd-members starts an embedded cluster: not with --etcd (an external one)")
        # Beyond loopback only with TLS and auth (or --insecure): one line, before anything starts.
        config.check_exposure("the mesh")
        # What the registry may launch, checked now (a bad catalog is one line naming file, kind, problem).
        agent_catalog, allow_argv = _launch_settings(args)
    except (mesh_config.ConfigError, ValueError) as exc:
        print(f"mabeam up: {exc}", file=sys.stderr)
        return 2
    if allow_argv:
        print(
            "mabeam up: WARNING: --allow-argv: any caller allowed to StartAgent can run ANY program on this "
            "machine; use --agent-catalog FILE instead outside development",
            file=sys.stderr,
            flush=True,
        )
    for warning in _risks(config):
        print(f"mabeam up: WARNING: {warning}", file=sys.stderr, flush=True)
    log_dir = config.data_dir.parent / "logs"
    mesh = LocalMesh(
        config,
        replicas=replicas,
        etcd_members=members,
        etcd_client_port=etcd_port,
        etcd_peer_port=peer_port,
        etcd_quota_bytes=quota,
        log_dir=log_dir,
        agent_catalog=agent_catalog,
        allow_argv=allow_argv,
    )
    # Check every port before starting anything: one clear line, no traceback.
    wanted = [
        (port, f"--{s}-port", f"MABEAM_{s.upper()}_PORT") for s in SERVICES for port in mesh.service_ports(s)
    ]
    if not config.etcd_endpoints:
        wanted += [(port, "--etcd-port", "MABEAM_ETCD_PORT") for port in mesh.etcd_ports(etcd_port)]
        wanted += [(port, "--etcd-peer-port", "MABEAM_ETCD_PEER_PORT") for port in mesh.etcd_ports(peer_port)]
    for port, flag, var in wanted:
        if port and not port_is_free(config.host, port):
            print(
                f"mabeam up: port {port} is already in use: choose another with {flag} (or {var})",
                file=sys.stderr,
            )
            return 2

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        starting = asyncio.create_task(mesh.start())
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if starting not in done:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await mesh.stop()
            return 130
        try:
            starting.result()
        except (MeshStartError, mesh_config.ConfigError, OSError, RuntimeError) as exc:
            stopper.cancel()
            print(f"mabeam up: {_one_line(exc)}", file=sys.stderr)
            return 1
        except Exception as exc:
            # Anything else is a bug: one line here, the traceback in the log folder.
            stopper.cancel()
            print(f"mabeam up: {_one_line(exc)} (traceback: {_log_traceback(log_dir, exc)})", file=sys.stderr)
            return 1
        elapsed = time.monotonic() - started
        if mesh.etcd_cluster is not None:
            rows = [(f"etcd-{i}", "embedded etcd member", e) for i, e in enumerate(mesh.etcd_endpoints)]
        else:
            etcd_kind = "embedded" if mesh.etcd is not None else "external"
            rows = [("etcd", f"{etcd_kind} etcd", ",".join(mesh.etcd_endpoints))]
        for s in SERVICES:
            addresses = mesh.addresses(s)
            names = [s] if len(addresses) == 1 else [f"{s}-{i}" for i in range(len(addresses))]
            rows += [(name, SERVICE_NAMES[s], a) for name, a in zip(names, addresses, strict=True)]
        width = max(len(r[1]) for r in rows)
        part_width = max(13, *(len(r[0]) for r in rows))
        print(f"{'PART':<{part_width}} {'SERVICE':<{width}} ENDPOINT")
        for part, name, endpoint in rows:
            print(f"{part:<{part_width}} {name:<{width}} {endpoint}")
        if mesh.credentials is not None:
            print(_token_line(mesh.credentials.admin_file, config.data_dir), flush=True)
        print(f"mesh healthy in {elapsed:.2f} s (logs: {log_dir}); Ctrl-C to stop", flush=True)
        # A service or etcd that dies is started again, and a line says so.
        mesh.watch(lambda line: print(line, flush=True))
        await stopper
        print("mabeam up: stopping", flush=True)
        await mesh.stop()
        print("mabeam up: stopped", flush=True)
        return 0

    return asyncio.run(run())


_UNITS = {
    "": 1,
    "B": 1,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_bytes(text: str) -> int:
    """``2GiB``, ``512MiB``, ``100MB``, ``2147483648`` as a positive number of bytes; ValueError otherwise."""
    raw = text.strip().replace(" ", "")
    digits = raw.rstrip("KMGiBkmgIb")
    unit = raw[len(digits) :].upper()
    try:
        value = int(float(digits) * _UNITS[unit])
    except (KeyError, ValueError):
        raise ValueError(f"--etcd-quota-bytes {text!r}: a number of bytes, e.g. 2GiB or 2147483648") from None
    if value <= 0:
        raise ValueError(f"--etcd-quota-bytes {text!r}: the quota is a positive number of bytes")
    return value


def _risks(config: mesh_config.MeshConfig) -> list[str]:
    """What ``config`` leaves open, one sentence each, for people to read before anything starts."""
    risks = []
    if not config.auth:
        risks.append(
            "authentication is OFF (--no-auth / MABEAM_AUTH=off): any process that reaches "
            f"{config.host} may call every RPC, StartAgent (which runs commands as you) included"
        )
    if config.insecure and not config.loopback_only and (config.tls is None or not config.auth):
        missing = " and ".join(
            n for n, on in (("TLS", config.tls is not None), ("auth", config.auth)) if not on
        )
        risks.append(
            f"--insecure: listening on {config.host} beyond loopback without {missing}: "
            "whoever reaches these ports can read the tokens on the wire"
            + ("" if config.auth else " and call everything")
        )
    return risks


def _token_line(admin_file: os.PathLike[str] | str, data_dir: os.PathLike[str] | str) -> str:
    """Where the admin token is and how to use it, in one line; never the token itself."""
    import shlex
    from pathlib import Path

    quoted = shlex.quote(str(admin_file))
    found = os.environ.get("MABEAM_DATA_DIR") or str(Path.home() / ".mabeam" / "etcd")
    if Path(found).expanduser().resolve() == Path(data_dir).resolve():
        clients = "the mabeam CLI and SDK present it by themselves"
    else:  # another --data-dir: default_token() would look in the default one
        clients = f"for the mabeam CLI and SDK: export MABEAM_TOKEN_FILE={quoted}"
    return f"admin token in {quoted} (mode 0600): {clients}; for grpcurl: export MABEAM_TOKEN=$(cat {quoted})"


def _one_line(exc: BaseException) -> str:
    """An error for people: its first line (a child's log holds the rest)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _log_traceback(log_dir: os.PathLike[str] | str, exc: BaseException) -> str:
    """Append ``exc``'s traceback to ``<log_dir>/up.log``; the file's path."""
    import traceback
    from pathlib import Path

    path = Path(log_dir) / "up.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(traceback.format_exception(exc)))
    return str(path)


def _bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="run benchmarks against a mesh started for the run; JSON on stdout")
    p.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions: under two minutes")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    soak = p.add_argument_group("soak (mabeam bench soak; defaults: 30m, 12m, 1000; with --quick 90s, 20s)")
    soak.add_argument("--duration", help="how long the soak runs: 600s, 30m, 2h")
    soak.add_argument("--retention", help="the retention of sessions, goals and stopped supervised records")
    soak.add_argument("--agents", type=int, help="agents on the soak's AgentHost")
    soak.add_argument("--sample-every", help="seconds between samples (default: a sixtieth of the duration)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from mabeam.bench import runner
    from mabeam.bench.soak import SoakSettings

    options: dict[str, SoakSettings] = {}
    given = (args.duration, args.retention, args.agents, args.sample_every)
    if any(v is not None for v in given):
        if "soak" not in args.names:
            print(
                "mabeam bench: --duration, --retention, --agents, --sample-every are the soak's",
                file=sys.stderr,
            )
            return 2
    try:
        options["soak"] = SoakSettings.parse(*given, quick=args.quick)
    except mesh_config.ConfigError as exc:
        print(f"mabeam bench soak: {exc}", file=sys.stderr)
        return 2
    return runner.main(args.names, quick=args.quick, list_only=args.list, options=options)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mabeam`` command."""
    from mabeam.cli.flags import connection_flags

    parser = argparse.ArgumentParser(
        prog="mabeam",
        description="mabeam: a multi-agent coordination mesh",
        # Before the subcommand too: `mabeam --planner HOST:PORT goal run FILE`.
        parents=[connection_flags(top=True)],
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _up_parser(sub)
    _bench_parser(sub)
    from mabeam.cli.auth import add_auth_parser
    from mabeam.cli.goal import add_goal_parser
    from mabeam.cli.maintenance import add_maintenance_parser
    from mabeam.cli.ops import add_ops_parsers
    from mabeam.runtime.backup import add_backup_parsers

    add_goal_parser(sub)
    add_ops_parsers(sub)
    add_auth_parser(sub)
    add_backup_parsers(sub)
    add_maintenance_parser(sub)
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``argv`` parsed, the connection flags merged wherever they were given (:func:`mabeam.cli.flags.resolve`)."""
    from mabeam.cli.flags import resolve

    return resolve(build_parser().parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mabeam`` console script."""
    # Before grpc loads: `up` forks etcd and the services from a process that
    # may run grpc threads; grpc's fork handlers only log noise there, and the
    # children exec at once.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    args = parse(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
