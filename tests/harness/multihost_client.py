"""Test-side clients of the multi-host mesh, run inside a lab namespace (``python tests/harness/multihost_client.py``).

tests/test_multihost.py runs this script with ``ip netns exec`` in the
``client`` namespace (or in a host's, for clients on every host): the test
process itself is not on the lab's bridge. TLS from ``MABEAM_TLS_CA`` /
``MABEAM_TLS_CERT`` / ``MABEAM_TLS_KEY`` (a client certificate of the mesh's
CA), the token from ``MABEAM_TOKEN_FILE``. Each command prints one JSON
document on stdout, except the long-running ones, which write one JSON line
per observation to ``--out`` until ``--stop`` (a file) exists:

``discover --etcd URLS``
    the live replicas of every service from discovery (``<prefix>/services/``)
    and the agents listed by each registry replica.
``auction --etcd URLS --capability C``
    a sealed-bid (Vickrey) auction among the agents offering ``C``.
``goal --etcd URLS --file F --id ID`` (or ``--planner ADDR``: that replica)
    submit the goal file (``mabeam goal run``'s format) and follow it to its
    end; the goal's state and each step's agent, attempts and output.
``cas --orchestrator ADDR --name V --client ID``
    compare-and-set increments of the integer variable ``V`` through one
    orchestrator replica: read (strong; relaxed when a strong read is refused),
    write value + 1 on that version with a ``request_id``. A write whose outcome is unknown (a timeout, an
    unavailable replica) is sent again with the same ``request_id`` until the
    mesh answers it (the first outcome is kept 10 minutes), so a write is
    counted once: ``{"op": "ack"}`` lines are the acknowledged increments,
    ``{"op": "refused"}`` lines say what the mesh answered meanwhile (code and
    message), and the last line ``{"op": "done"}`` has the counts, with
    ``indeterminate`` the writes still unanswered when the client stopped.
``listing --registry ADDR``
    the ids ``ListAgents`` of one registry replica lists, every ``--interval``
    seconds (``{"t": ..., "ids": [...]}`` or ``{"t": ..., "error": ...}``).
``read --orchestrator ADDR --name V --consistency strong|relaxed``
    one read of ``V``: its value, version and ``possibly_stale``, or the error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

from google.protobuf import json_format

from mabeam import errors
from mabeam.client import MeshClient, list_all
from mabeam.config import SERVICES
from mabeam.tls import TLS
from mabeam.v1 import common_pb2, coordination_pb2, orchestrator_pb2, planner_pb2, registry_pb2

CALL_TIMEOUT = 10.0  # long enough for the mesh's own answer (not the client's deadline) to come back


def client_tls() -> TLS:
    return TLS(
        ca_file=os.environ["MABEAM_TLS_CA"],
        cert_file=os.environ["MABEAM_TLS_CERT"],
        key_file=os.environ["MABEAM_TLS_KEY"],
    )


def _error(exc: errors.MabeamError) -> dict[str, Any]:
    return {"code": exc.code.name, "reason": exc.reason, "message": exc.message}


async def discover(args: argparse.Namespace) -> dict[str, Any]:
    from mabeam import discovery

    services: dict[str, list[str]] = {}
    for kind in SERVICES:
        resolver = discovery.EndpointResolver(args.etcd.split(","), args.prefix, kind)
        await resolver.start()
        try:
            services[kind] = sorted(resolver.addresses())
        finally:
            await resolver.stop()
    agents: dict[str, Any] = {}
    for address in services.get("registry", []):
        try:
            async with await MeshClient.connect(registry=address, tls=client_tls()) as mesh:
                listed = await list_all(mesh.registry.ListAgents, registry_pb2.ListAgentsRequest(), "agents")
            agents[address] = {a.agent_id: a.endpoint for a in listed}
        except errors.MabeamError as exc:
            agents[address] = _error(exc)
    return {"services": services, "agents": agents}


async def auction(args: argparse.Namespace) -> dict[str, Any]:
    async with await MeshClient.connect(
        etcd=args.etcd.split(","), prefix=args.prefix, tls=client_tls()
    ) as mesh:
        session = (
            await mesh.coordination.RunAuction(
                coordination_pb2.RunAuctionRequest(
                    settings=coordination_pb2.SessionSettings(
                        participants=common_pb2.AgentSelector(capability=args.capability)
                    ),
                    type=coordination_pb2.AUCTION_TYPE_SECOND_PRICE,
                    item=args.item,
                ),
                timeout=30,
            )
        ).session
    return {
        "session_id": session.session_id,
        "state": coordination_pb2.SessionState.Name(session.state),
        "decided": session.outcome.decided,
        "winners": list(session.outcome.winners),
        "price": session.outcome.price,
        "participants": sorted(session.participants),
        "excluded": {e.agent_id: e.detail for e in session.excluded},
    }


async def goal(args: argparse.Namespace) -> dict[str, Any]:
    from mabeam.cli.goal import load_goal

    spec = load_goal(Path(args.file))
    where: dict[str, Any] = (
        {"planner": args.planner} if args.planner else {"etcd": args.etcd.split(","), "prefix": args.prefix}
    )
    async with await MeshClient.connect(**where, tls=client_tls()) as mesh:
        submitted = await mesh.planner.SubmitGoal(planner_pb2.SubmitGoalRequest(goal=spec, goal_id=args.id))
        goal_id = submitted.goal.goal_id
        async for _ in mesh.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal_id=goal_id), timeout=150):
            pass
        final = (await mesh.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=goal_id))).goal
    return {
        "goal_id": goal_id,
        "state": planner_pb2.GoalState.Name(final.state),
        "error": final.error,
        "steps": {
            s.step_id: {
                "agent": s.agent_id,
                "state": planner_pb2.StepState.Name(s.state),
                "attempts": len(s.attempts),
                "output": json_format.MessageToDict(s.output) if s.HasField("output") else None,
            }
            for s in final.steps
        },
    }


def _stopped(path: str) -> bool:
    return Path(path).exists()


def _append(path: str) -> IO[str]:
    return open(path, "a")  # closed by the caller's with


def _line(out: Any, doc: dict[str, Any]) -> None:
    out.write(json.dumps({"t": time.time(), **doc}) + "\n")
    out.flush()


async def _current(orchestrator: Any, name: str, consistency: int) -> tuple[int, int]:
    """The variable's value and version (0, 0 when it does not exist yet)."""
    try:
        got = await orchestrator.GetVariable(
            orchestrator_pb2.GetVariableRequest(name=name, consistency=consistency), timeout=CALL_TIMEOUT
        )
    except errors.NotFound:
        return 0, 0
    return got.variable.value.int_value, got.variable.version


async def cas(args: argparse.Namespace) -> None:
    acked = lost_races = indeterminate = 0
    with _append(args.out) as out:
        async with await MeshClient.connect(orchestrator=args.orchestrator, tls=client_tls()) as mesh:
            orchestrator = mesh.orchestrator
            while not _stopped(args.stop):
                try:
                    value, version = await _current(
                        orchestrator, args.name, orchestrator_pb2.CONSISTENCY_STRONG
                    )
                except errors.MabeamError as exc:
                    # A strong read refused (a minority, say): write on what a relaxed read gives;
                    # compare-and-set keeps a stale version from applying.
                    _line(out, {"op": "refused", "call": "GetVariable", **_error(exc)})
                    try:
                        value, version = await _current(
                            orchestrator, args.name, orchestrator_pb2.CONSISTENCY_RELAXED
                        )
                    except errors.MabeamError as exc:
                        _line(out, {"op": "refused", "call": "GetVariable(relaxed)", **_error(exc)})
                        await asyncio.sleep(args.pause)
                        continue
                request = orchestrator_pb2.SetVariableRequest(
                    name=args.name,
                    value=common_pb2.Value(int_value=value + 1),
                    expected_version=version,
                    writer=args.client,
                    request_id=f"{args.client}-{uuid.uuid4().hex}",
                )
                # Until the mesh answers this write (OK or a lost race), send it again as it is.
                stopped_at: float | None = None
                while True:
                    try:
                        reply = await orchestrator.SetVariable(request, timeout=CALL_TIMEOUT)
                    except errors.Aborted:
                        lost_races += 1
                        break
                    except errors.MabeamError as exc:
                        _line(out, {"op": "refused", "call": "SetVariable", **_error(exc)})
                        if _stopped(args.stop):
                            stopped_at = stopped_at or time.monotonic()
                            if time.monotonic() - stopped_at > args.settle:
                                indeterminate += 1
                                _line(out, {"op": "indeterminate", "request_id": request.request_id})
                                break
                        await asyncio.sleep(args.pause)
                        continue
                    acked += 1
                    _line(
                        out,
                        {
                            "op": "ack",
                            "value": reply.variable.value.int_value,
                            "version": reply.variable.version,
                            "request_id": request.request_id,
                        },
                    )
                    await asyncio.sleep(args.every)
                    break
        _line(out, {"op": "done", "acked": acked, "lost_races": lost_races, "indeterminate": indeterminate})


async def listing(args: argparse.Namespace) -> None:
    with _append(args.out) as out:
        async with await MeshClient.connect(registry=args.registry, tls=client_tls()) as mesh:
            while not _stopped(args.stop):
                try:
                    page = await mesh.registry.ListAgents(
                        registry_pb2.ListAgentsRequest(page_size=1000), timeout=CALL_TIMEOUT
                    )
                    _line(out, {"ids": sorted(a.agent_id for a in page.agents)})
                except errors.MabeamError as exc:
                    _line(out, {"error": _error(exc)})
                await asyncio.sleep(args.interval)


async def read(args: argparse.Namespace) -> dict[str, Any]:
    consistency = {
        "strong": orchestrator_pb2.CONSISTENCY_STRONG,
        "relaxed": orchestrator_pb2.CONSISTENCY_RELAXED,
    }[args.consistency]
    async with await MeshClient.connect(orchestrator=args.orchestrator, tls=client_tls()) as mesh:
        try:
            got = await mesh.orchestrator.GetVariable(
                orchestrator_pb2.GetVariableRequest(name=args.name, consistency=consistency),
                timeout=CALL_TIMEOUT,
            )
        except errors.MabeamError as exc:
            return {"error": _error(exc)}
    return {
        "value": got.variable.value.int_value,
        "version": got.variable.version,
        "possibly_stale": got.possibly_stale,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", default=os.environ.get("MABEAM_PREFIX", "/mabeam"))
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("discover")
    d.add_argument("--etcd", required=True)
    a = sub.add_parser("auction")
    a.add_argument("--etcd", required=True)
    a.add_argument("--capability", required=True)
    a.add_argument("--item", default="multihost")
    g = sub.add_parser("goal")
    g.add_argument("--etcd", default="")
    g.add_argument("--planner", default="", help="this planner replica (instead of discovery through --etcd)")
    g.add_argument("--file", required=True)
    g.add_argument("--id", default="")
    c = sub.add_parser("cas")
    c.add_argument("--orchestrator", required=True)
    c.add_argument("--name", required=True)
    c.add_argument("--client", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--stop", required=True)
    c.add_argument("--pause", type=float, default=0.2, help="seconds between tries after a refusal")
    c.add_argument("--every", type=float, default=0.05, help="seconds between increments")
    c.add_argument("--settle", type=float, default=20.0, help="seconds after --stop to get a write answered")
    ls = sub.add_parser("listing")
    ls.add_argument("--registry", required=True)
    ls.add_argument("--out", required=True)
    ls.add_argument("--stop", required=True)
    ls.add_argument("--interval", type=float, default=0.2)
    r = sub.add_parser("read")
    r.add_argument("--orchestrator", required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--consistency", choices=["strong", "relaxed"], default="strong")
    args = parser.parse_args()
    commands = {"discover": discover, "auction": auction, "goal": goal, "read": read}
    if args.command in commands:
        print(json.dumps(asyncio.run(commands[args.command](args)), sort_keys=True))
    else:
        asyncio.run({"cas": cas, "listing": listing}[args.command](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
