"""Operator commands: ``mabeam status``, ``agents``, ``vars``, ``sessions``, ``auction``.

Tables for people, ``--json`` for scripts. Where the services are comes from
``--registry`` / ``--orchestrator`` / ``--coordination`` / ``--planner`` (or
``MABEAM_<SERVICE>``; defaults are ``mabeam up``'s ports), or from ``--etcd``
for discovery. ``--tls-ca`` (and ``--tls-cert/--tls-key`` for mutual TLS,
``--etcd-ca/...`` for etcd) for a mesh on TLS (:mod:`mabeam.cli.flags`).

``status`` lists every replica that discovery knows of when it has etcd
(``--etcd``, ``MABEAM_ETCD``, or ``mabeam up``'s etcd answering when no
address is given), else the one address of each service. Its exit status:

====  =================================================================
0     every replica listed is SERVING and etcd takes writes
1     a service has no SERVING replica, etcd refuses writes (NOSPACE), or
      ``--etcd`` did not answer (status still reports what it can)
3     degraded: every service has a SERVING replica, but one listed is DOWN
====  =================================================================

A replica that crashed stays listed (DOWN) until its lease runs out
(``MABEAM_SERVICE_TTL``, default 5 s); one stopped cleanly leaves discovery at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from google.protobuf import json_format

from mabeam import errors
from mabeam.cli import flags
from mabeam.cli.flags import connection_flags, one_line
from mabeam.client import MeshClient, list_all
from mabeam.config import DEFAULT_PORTS, SERVICE_NAMES
from mabeam.health_check import probe
from mabeam.v1 import common_pb2, coordination_pb2, orchestrator_pb2, planner_pb2, registry_pb2

AUCTIONS = {
    "vickrey": coordination_pb2.AUCTION_TYPE_SECOND_PRICE,
    "first_price": coordination_pb2.AUCTION_TYPE_FIRST_PRICE,
    "english": coordination_pb2.AUCTION_TYPE_ENGLISH,
    "dutch": coordination_pb2.AUCTION_TYPE_DUTCH,
}


def _address(args: argparse.Namespace, service: str) -> str:
    given = getattr(args, service, None) or os.environ.get(f"MABEAM_{service.upper()}")
    return given or f"127.0.0.1:{DEFAULT_PORTS[service]}"


async def _connect(args: argparse.Namespace) -> MeshClient:
    if args.etcd:
        return await flags.connect(args)
    return await flags.connect(args, **{s: _address(args, s) for s in DEFAULT_PORTS})


# Exit statuses of `mabeam status` (the module doc).
HEALTHY, UNHEALTHY, DEGRADED = 0, 1, 3


def _print(args: argparse.Namespace, doc: Any, table: Callable[[], None]) -> None:
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        table()


def _dict(message: Any) -> dict[str, Any]:
    return dict(json_format.MessageToDict(message, preserving_proto_field_name=True))


async def _count(list_call: Any, request: Any, field: str) -> int:
    return len(await list_all(list_call, request, field))


async def _discover(args: argparse.Namespace) -> tuple[dict[str, list[str]] | None, str]:
    """Every replica of every service that etcd discovery lists (None when there is no etcd to ask),
    and why etcd did not answer ("" when it did).

    ``--etcd`` (or ``MABEAM_ETCD``) is asked; without it, and without any
    address given, ``mabeam up``'s etcd is asked if it answers (then
    ``args.etcd`` is set to it, for the counts).
    """
    from mabeam.cli.flags import DEFAULT_ETCD
    from mabeam.discovery import EndpointResolver

    given = bool(args.etcd)
    if not given and any(getattr(args, s, "") for s in DEFAULT_PORTS):
        return None, ""
    endpoints = [e.strip() for e in (args.etcd or DEFAULT_ETCD).split(",") if e.strip()]
    etcd_tls = flags.etcd_tls(args)

    async def replicas(service: str) -> list[str]:
        resolver = EndpointResolver(endpoints, args.prefix, service, tls=etcd_tls)
        await resolver.start()  # lists once (etcd must answer); stopped at once
        try:
            return resolver.addresses()
        finally:
            await resolver.stop()

    try:
        found = await asyncio.gather(*(replicas(s) for s in SERVICE_NAMES))
    except Exception as exc:
        if not given:
            return None, ""  # no `mabeam up` etcd here: the default addresses
        return None, (
            f"etcd at {','.join(endpoints)} did not list the services ({flags.first_line(exc)}): check --etcd "
            "(and --etcd-ca/--etcd-cert/--etcd-key for TLS to etcd)"
        )
    args.etcd = ",".join(endpoints)
    return dict(zip(SERVICE_NAMES, found, strict=True)), ""


def _short(error: str) -> str:
    """The end of a failed health check's error: ``Connection refused``, ``NOT_SERVING``."""
    parts = [p.strip() for p in error.split(": ") if p.strip() and p.strip() != "OK"]
    return parts[-1] if parts else error


async def _replica_health(address: str, name: str, tls: Any) -> dict[str, Any]:
    from mabeam.runtime.etcd.maintenance import STORE_HEALTH

    serving, why = await probe(address, name, tls=tls)
    # Whether etcd accepts this replica's writes (NOT_SERVING: etcd's NOSPACE alarm is active).
    writable = (await probe(address, STORE_HEALTH, tls=tls))[0] if serving else None
    row: dict[str, Any] = {"address": address, "serving": serving, "store_writable": writable}
    if why:
        row["error"] = why
    return row


async def _status(args: argparse.Namespace) -> int:
    from mabeam.cli.flags import etcd_settings
    from mabeam.cli.maintenance import etcd_report, print_report

    tls = flags.client_tls(args)
    named = {s: getattr(args, s, "") for s in SERVICE_NAMES}  # addresses given (flags or MABEAM_<SERVICE>)
    discovered, discovery_error = await _discover(args)
    if discovery_error:  # --etcd did not answer: only the addresses given, if any
        listed = {s: [a for a in [named[s]] if a] for s in SERVICE_NAMES}
    elif discovered is None:
        listed = {s: [_address(args, s)] for s in SERVICE_NAMES}
    else:  # every replica discovery lists, and an address given that it does not
        listed = {
            s: discovered[s] + [a for a in [named[s]] if a and a not in discovered[s]] for s in SERVICE_NAMES
        }
    health: dict[str, dict[str, Any]] = {}
    replicas: dict[str, list[dict[str, Any]]] = {}
    for service, name in SERVICE_NAMES.items():
        rows = list(await asyncio.gather(*(_replica_health(a, name, tls) for a in listed[service])))
        up = [r for r in rows if r["serving"]]
        replicas[service] = rows
        health[service] = {
            # The first serving replica's address (the one given, without discovery).
            "address": (up or rows or [{"address": ""}])[0]["address"],
            "serving": bool(up),
            "store_writable": None if not up else all(r["store_writable"] for r in up),
        }
    counts: dict[str, int | None] = {s: None for s in ("agents", "variables", "sessions", "goals")}
    count_errors: dict[str, str] = {}
    if any(h["serving"] for h in health.values()):
        await _counts(args, discovered is not None, health, counts, count_errors)
    # etcd itself: --etcd, else MABEAM_ETCD, else `mabeam up`'s; best effort, it never blocks the rest.
    etcd = await etcd_report(*etcd_settings(args))
    doc = {
        "discovery": "etcd" if discovered is not None else "addresses",
        "services": health,
        "replicas": replicas,
        "counts": counts,
        "etcd": etcd,
    }
    if discovery_error:
        doc["discovery_error"] = discovery_error
    if count_errors:
        doc["count_errors"] = count_errors

    def table() -> None:
        if discovery_error:
            print(f"discovery: {discovery_error}")
        print(f"{'SERVICE':<14} {'ADDRESS':<22} {'STATE':<8} STORE")
        for service, rows in replicas.items():
            if not rows:
                where = (
                    "no replica listed" if discovery_error else f"no replica in discovery under {args.prefix}"
                )
                print(f"{service:<14} {'-':<22} {'DOWN':<8} {where}")
            for r in rows:
                store = {True: "writable", False: "NOSPACE: writes refused", None: "?"}[r["store_writable"]]
                why = ""
                if not r["serving"]:
                    why = f"  ({flags.tls_hint(r.get('error', ''), args) or _short(r.get('error', ''))})"
                state = "SERVING" if r["serving"] else "DOWN"
                print(f"{service:<14} {r['address']:<22} {state:<8} {store}{why}")
        print(" ".join(f"{k}={'?' if v is None else v}" for k, v in counts.items()))
        for what, message in count_errors.items():
            print(f"{what}: {message}")
        print()
        print_report(etcd)

    _print(args, doc, table)
    refused = etcd["nospace"] or any(h["store_writable"] is False for h in health.values())
    if discovery_error or refused or not all(h["serving"] for h in health.values()):
        return UNHEALTHY
    if any(not r["serving"] for rows in replicas.values() for r in rows):
        return DEGRADED
    return HEALTHY


async def _counts(
    args: argparse.Namespace,
    discovered: bool,
    health: dict[str, dict[str, Any]],
    counts: dict[str, int | None],
    count_errors: dict[str, str],
) -> None:
    """The mesh's counts, from the services that have a serving replica."""
    # Through discovery when it listed the replicas, else straight to each service's address.
    addresses = {s: h["address"] or _address(args, s) for s, h in health.items()}
    async with await (flags.connect(args) if discovered else flags.connect(args, **addresses)) as mesh:
        calls = {
            "agents": (mesh.registry.ListAgents, registry_pb2.ListAgentsRequest(), "agents", "registry"),
            "variables": (
                mesh.orchestrator.ListVariables,
                orchestrator_pb2.ListVariablesRequest(),
                "variables",
                "orchestrator",
            ),
            "sessions": (
                mesh.coordination.ListSessions,
                coordination_pb2.ListSessionsRequest(),
                "sessions",
                "coordination",
            ),
            "goals": (mesh.planner.ListGoals, planner_pb2.ListGoalsRequest(), "goals", "planner"),
        }
        for what, (call, request, field, service) in calls.items():
            counts[what] = None
            if health[service]["serving"]:
                try:
                    counts[what] = await _count(call, request, field)
                except (errors.Unavailable, errors.DeadlineExceeded) as exc:  # a replica gone meanwhile
                    count_errors[what] = one_line(exc, args)


async def _agents(args: argparse.Namespace) -> int:
    async with await _connect(args) as mesh:
        page = await mesh.registry.ListAgents(
            registry_pb2.ListAgentsRequest(capability=args.capability, page_size=1000)
        )
    agents = list(page.agents)

    def table() -> None:
        print(
            f"{'AGENT':<24} {'STATUS':<12} {'NODE':<16} {'ENDPOINT':<22} {'LOAD':>5} {'MEM MiB':>8} CAPABILITIES"
        )
        for a in agents:
            status = registry_pb2.AgentStatus.Name(a.status).removeprefix("AGENT_STATUS_")
            # The supervisor's measure when there is one, else what the agent reported.
            memory = (a.measured.memory_bytes or a.load.memory_bytes) / (1 << 20)
            print(
                f"{a.agent_id:<24} {status:<12} {a.node or '-':<16} {a.endpoint:<22} {a.load.load:>5.2f} "
                f"{memory:>8.1f} {','.join(a.capabilities)}"
            )

    _print(args, [_dict(a) for a in agents], table)
    return 0


def _value(text: str, as_string: bool) -> common_pb2.Value:
    value = common_pb2.Value()
    if as_string:
        value.string_value = text
        return value
    try:
        data = json.loads(text)
    except ValueError:
        data = text
    if isinstance(data, bool):
        value.bool_value = data
    elif isinstance(data, int):
        value.int_value = data
    elif isinstance(data, float):
        value.number_value = data
    elif isinstance(data, str):
        value.string_value = data
    elif isinstance(data, dict):
        value.struct_value.update(data)
    else:
        value.list_value.extend(data)
    return value


def _plain(variable: orchestrator_pb2.Variable) -> Any:
    kind = variable.value.WhichOneof("kind")
    if kind in ("struct_value", "list_value"):
        return json_format.MessageToDict(getattr(variable.value, kind))
    return getattr(variable.value, kind) if kind else None


async def _vars(args: argparse.Namespace) -> int:
    async with await _connect(args) as mesh:
        o = mesh.orchestrator
        if args.vars_command == "get":
            var = (await o.GetVariable(orchestrator_pb2.GetVariableRequest(name=args.name))).variable
            _print(
                args,
                _dict(var),
                lambda: print(f"{var.name} = {json.dumps(_plain(var))} (version {var.version})"),
            )
        elif args.vars_command == "set":
            request = orchestrator_pb2.SetVariableRequest(
                name=args.name, value=_value(args.value, args.string)
            )
            if args.expected_version is not None:
                request.expected_version = args.expected_version
            var = (await o.SetVariable(request)).variable
            _print(
                args,
                _dict(var),
                lambda: print(f"{var.name} = {json.dumps(_plain(var))} (version {var.version})"),
            )
        else:
            count = 0
            async for event in o.WatchVariables(
                orchestrator_pb2.WatchVariablesRequest(prefix=args.var_prefix)
            ):
                if args.json:
                    print(json.dumps(_dict(event), sort_keys=True), flush=True)
                elif event.type == orchestrator_pb2.VARIABLE_EVENT_TYPE_PUT:
                    print(f"{event.variable.name} = {json.dumps(_plain(event.variable))}", flush=True)
                else:
                    print(f"{event.variable.name} deleted", flush=True)
                count += 1
                if args.count and count >= args.count:
                    break
    return 0


async def _sessions(args: argparse.Namespace) -> int:
    async with await _connect(args) as mesh:
        page = await mesh.coordination.ListSessions(
            coordination_pb2.ListSessionsRequest(protocol=args.protocol, page_size=args.limit)
        )
    sessions = list(page.sessions)

    def table() -> None:
        print(f"{'SESSION':<18} {'PROTOCOL':<14} {'STATE':<12} {'WINNERS':<20} PRICE")
        for s in sessions:
            state = coordination_pb2.SessionState.Name(s.state).removeprefix("SESSION_STATE_")
            print(
                f"{s.session_id:<18} {s.protocol:<14} {state:<12} {','.join(s.outcome.winners):<20} {s.outcome.price:g}"
            )

    _print(args, [_dict(s) for s in sessions], table)
    return 0


async def _auction(args: argparse.Namespace) -> int:
    selector = common_pb2.AgentSelector(capability=args.capability, agent_ids=args.agent or [])
    request = coordination_pb2.RunAuctionRequest(
        settings=coordination_pb2.SessionSettings(participants=selector),
        type=AUCTIONS[args.type],
        item=args.item,
        reserve_price=args.reserve,
        start_price=args.start_price,
        increment=args.increment,
        decrement=args.decrement,
    )
    async with await _connect(args) as mesh:
        session = (await mesh.coordination.RunAuction(request)).session

    def table() -> None:
        state = coordination_pb2.SessionState.Name(session.state).removeprefix("SESSION_STATE_")
        winner = ",".join(session.outcome.winners) or "-"
        print(f"session {session.session_id}: {state}; winner {winner} at {session.outcome.price:g}")
        if session.outcome.reason:
            print(f"reason: {session.outcome.reason}")
        for e in session.excluded:
            print(f"left out: {e.agent_id} ({coordination_pb2.ExclusionReason.Name(e.reason)}: {e.detail})")

    _print(args, _dict(session), table)
    return 0 if session.outcome.decided else 1


def add_ops_parsers(sub: Any) -> None:
    """The operator subcommands of ``mabeam``."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="JSON for scripts instead of a table")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=help, parents=[connection_flags()])
        return parser

    p = add(
        "status",
        "each service's health (every replica discovery knows of) and the mesh's counts; "
        "exit 0 healthy, 1 a service without a serving replica or etcd refusing writes, "
        "3 degraded (a replica DOWN, every service still served)",
    )
    p.description = (
        "Each service's health and the mesh's counts. With etcd (--etcd, MABEAM_ETCD, or `mabeam up`'s "
        "etcd answering when no address is given) a row per replica that discovery lists, else one per "
        "address. Exit status: 0 every replica SERVING and etcd taking writes; 1 a service without a "
        "SERVING replica, etcd refusing writes (NOSPACE) or --etcd not answering; 3 degraded: every service served, but a "
        "replica listed is DOWN (a crashed replica stays listed until its lease runs out)."
    )
    common(p)
    p.set_defaults(func=lambda a: _run(_status, a))
    p = add("agents", "list the registered agents")
    common(p)
    p.add_argument("--capability", default="", help="only agents offering it")
    p.set_defaults(func=lambda a: _run(_agents, a))
    p = add("vars", "read, write and watch shared variables")
    common(p)
    vsub = p.add_subparsers(dest="vars_command", required=True)
    nested = [connection_flags(nested=True)]
    g = vsub.add_parser("get", help="read a variable (strong)", parents=nested)
    g.add_argument("name")
    s = vsub.add_parser("set", help="write a variable (a JSON value, or a string)", parents=nested)
    s.add_argument("name")
    s.add_argument("value")
    s.add_argument("--string", action="store_true", help="store VALUE as a string, not as JSON")
    s.add_argument("--expected-version", type=int, default=None, help="compare-and-set on this version")
    w = vsub.add_parser("watch", help="print changes as they happen", parents=nested)
    # Not dest "prefix": that is the mesh's etcd key prefix (--prefix).
    w.add_argument(
        "var_prefix", nargs="?", default="", metavar="PREFIX", help="variables under it (default all)"
    )
    w.add_argument("--count", type=int, default=0, help="stop after this many changes")
    for child in (g, s, w):  # --json also after the subcommand's own arguments
        child.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON for scripts")
    p.set_defaults(func=lambda a: _run(_vars, a))
    p = add("sessions", "list coordination sessions, newest first")
    common(p)
    p.add_argument("--protocol", default="")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=lambda a: _run(_sessions, a))
    p = add("auction", "run an auction among agents")
    common(p)
    p.add_argument("item")
    p.add_argument("--capability", default="", help="bidders: every agent offering it")
    p.add_argument("--agent", action="append", help="a bidder by id (repeat)")
    p.add_argument("--type", choices=sorted(AUCTIONS), default="vickrey")
    p.add_argument("--reserve", type=float, default=0.0)
    p.add_argument("--start-price", type=float, default=0.0)
    p.add_argument("--increment", type=float, default=0.0)
    p.add_argument("--decrement", type=float, default=0.0)
    p.set_defaults(func=lambda a: _run(_auction, a))


def _run(command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]], args: argparse.Namespace) -> int:
    try:
        return asyncio.run(command(args))
    except errors.MabeamError as exc:
        print(f"mabeam: {one_line(exc, args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
