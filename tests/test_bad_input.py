"""Garbage at every RPC of the four services (hypothesis): no crash, always a proper status.

Requests are random messages of the right type: empty, odd, huge and
malformed values in every field (NaN, negative sizes, unicode, nested junk).
Each answer must be a success or a gRPC status other than UNKNOWN/INTERNAL
(and never a hang), and after every refused call the service's durable etcd
keys are as they were.

* unary RPCs: random requests, each answered or refused;
* server streams (WatchAgents, WatchVariables, WatchSession, ExecuteGoal):
  read with a bound; what each must do (end with a status, send its first
  response, or stay open as a watch does) is :func:`stream_expectation`;
* Heartbeat (bidirectional): streams of valid beats of registered agents mixed
  with garbage; the registered agents' leases survive;
* StartAgent, RestartAgent, MigrateAgent, RegisterProtocol: random requests
  whose launch specs and endpoints are kept safe (a missing file, ``python -c
  'raise SystemExit(n)'``, loopback ports nothing listens on); no process is
  left behind.

Every service still answers its health check and a real RPC afterwards. The
last tests are focused regressions for what the fuzzing found.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import math
import os
import sys
import types
from collections.abc import Awaitable, Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as D
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.channels import mesh_channel
from harness.ports import closed_port
from harness.wait import eventually
from mabeam import auth, errors
from mabeam.agent import Agent, AgentHost
from mabeam.config import MeshConfig
from mabeam.runtime import validate
from mabeam.runtime.etcd import EtcdClient, LeaseKeeper, snapshot
from mabeam.runtime.process import pid_alive
from mabeam.server import MeshServer
from mabeam.services.registry.store import RegistryStore
from mabeam.v1 import (
    common_pb2,
    coordination_pb2,
    coordination_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    planner_pb2,
    planner_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# RPCs that start processes or dial the addresses they are given: fuzzed by
# test_process_and_dialing_rpcs_with_safe_targets, with safe launch specs and endpoints.
SKIP = {"StartAgent", "MigrateAgent", "RestartAgent", "RegisterProtocol"}
SERVICES = {
    "registry": (registry_pb2, registry_pb2_grpc.RegistryServiceStub, "RegistryService"),
    "orchestrator": (orchestrator_pb2, orchestrator_pb2_grpc.OrchestratorServiceStub, "OrchestratorService"),
    "coordination": (coordination_pb2, coordination_pb2_grpc.CoordinationServiceStub, "CoordinationService"),
    "planner": (planner_pb2, planner_pb2_grpc.PlannerServiceStub, "PlannerService"),
}
WORDS = st.sampled_from(
    ["", "a", "x" * 300, "bad id!", "/", "é\u0000", "127.0.0.1:1", "-1", "nan", "vickrey", "consensus"]
)
NUMBERS = st.one_of(
    st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf, 1e308]), st.floats(allow_nan=True)
)
INTS = st.one_of(
    st.sampled_from([0, -1, 1, 2**31 - 1, -(2**31)]), st.integers(min_value=-(2**31), max_value=2**31 - 1)
)


def messages(descriptor: D.Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Random values for a message's fields, as keyword arguments (nested up to depth 2)."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    field: Any  # protobuf's descriptor stubs type nested descriptors as optional
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            fields[field.name] = st.dictionaries(
                st.text(max_size=5), _scalar(field.message_type.fields_by_name["value"]), max_size=3
            )
            continue
        if field.type == D.FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2 or field.message_type.full_name.startswith("google.protobuf."):
                continue
            value: st.SearchStrategy[Any] = messages(field.message_type, depth + 1).map(
                functools.partial(_build, field.message_type)
            )
        else:
            value = _scalar(field)
        if field.is_repeated:
            value = st.lists(value, max_size=3)
        fields[field.name] = value
    return st.fixed_dictionaries({}, optional=fields)


def _scalar(field: Any) -> st.SearchStrategy[Any]:
    t = field.type
    if t == D.FieldDescriptor.TYPE_STRING:
        return WORDS | st.text(max_size=20)
    if t == D.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=20)
    if t == D.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (D.FieldDescriptor.TYPE_DOUBLE, D.FieldDescriptor.TYPE_FLOAT):
        return NUMBERS
    if t == D.FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values] + [99])
    if t in (
        D.FieldDescriptor.TYPE_UINT32,
        D.FieldDescriptor.TYPE_UINT64,
        D.FieldDescriptor.TYPE_FIXED32,
        D.FieldDescriptor.TYPE_FIXED64,
    ):
        return st.integers(min_value=0, max_value=2**32 - 1)
    if t == D.FieldDescriptor.TYPE_MESSAGE:
        return st.just(None)
    return INTS


def _build(descriptor: D.Descriptor, kwargs: dict[str, Any]) -> Message:
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(descriptor)
    message = cls()
    for name, value in kwargs.items():
        field = descriptor.fields_by_name[name]
        try:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                getattr(message, name).update({k: v for k, v in value.items() if v is not None})
            elif field.is_repeated:
                if field.type == D.FieldDescriptor.TYPE_MESSAGE:
                    for item in value:
                        getattr(message, name).add().CopyFrom(item)
                else:
                    getattr(message, name).extend(value)
            elif field.type == D.FieldDescriptor.TYPE_MESSAGE:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        except (TypeError, ValueError):
            continue  # a value protobuf itself refuses (e.g. a bad enum in a closed enum) is not sent
    return message


def draw(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """``n`` examples of ``strategy``, shrinking-free (the calls are made afterwards, asynchronously)."""
    found: list[Any] = []

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value: Any) -> None:
        found.append(value)

    collect()
    return found


async def durable_keys(client: EtcdClient, prefix: str) -> dict[bytes, bytes]:
    kvs, _ = await snapshot(client, prefix.encode() + b"/")
    return {bytes(kv.key): bytes(kv.value) for kv in kvs if not int(kv.lease)}


# -- one way to send a request, read the answer and judge it -----------------------------

BAD_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED)
BOUND = 5.0  # seconds within which a call that must answer (or end) does so, even on a loaded machine
QUIET = 0.3  # how long a stream that may legitimately stay open is watched before it is cancelled
IA, NF, PD = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED
FP, OOR = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE


@dataclasses.dataclass
class Outcome:
    """How a call ended: a status (``code``), or answers and a normal end, or still open when we stopped."""

    responses: list[Any] = dataclasses.field(default_factory=list)
    code: grpc.StatusCode | None = None
    error: errors.MabeamError | None = None
    open: bool = False

    @classmethod
    def failed(cls, exc: grpc.RpcError, responses: list[Message] | None = None) -> Outcome:
        return cls(list(responses or ()), exc.code(), errors.from_rpc_error(exc))


@dataclasses.dataclass(frozen=True)
class Expect:
    """What a request may get. ``codes`` None: any proper status (unary calls)."""

    codes: frozenset[grpc.StatusCode] | None = None
    ends: bool = True  # may end normally (answers, then OK)
    first: bool = False  # must send a response within BOUND
    open: bool = False  # may still be open (no error) at the bound: a watch

    @staticmethod
    def of(*codes: grpc.StatusCode, ends: bool = False, first: bool = False, open: bool = False) -> Expect:
        return Expect(frozenset(codes), ends, first, open)


ANY = Expect()


def any_status(request: Any) -> Expect:
    return ANY


async def unary(call: Any, request: Message) -> Outcome:
    try:
        return Outcome([await call(request, timeout=20)])
    except grpc.RpcError as exc:
        return Outcome.failed(exc)


async def read_stream(stream: Any, expect: Expect) -> Outcome:
    """Read a response stream with a bound: until it ends, fails, or (if it may stay open) goes quiet."""
    loop = asyncio.get_running_loop()
    responses: list[Message] = []
    deadline = loop.time() + (QUIET if expect.open and not expect.first else BOUND)
    try:
        while True:
            try:
                response = await asyncio.wait_for(stream.read(), max(0.01, deadline - loop.time()))
            except TimeoutError:
                return Outcome(responses, open=True)
            if response is aio.EOF:  # type: ignore[attr-defined]
                return Outcome(responses)
            responses.append(response)
            if expect.open:  # after a response, a watch need only be watched a little longer
                deadline = min(deadline, loop.time() + QUIET)
    except grpc.RpcError as exc:
        return Outcome.failed(exc, responses)
    finally:
        stream.cancel()


async def server_stream(call: Any, expect: Callable[[Any], Expect], request: Message) -> Outcome:
    return await read_stream(call(request), expect(request))


def judge(what: str, outcome: Outcome, expect: Expect) -> None:
    """A proper status or a proper answer; never UNKNOWN/INTERNAL, never a hang."""
    if outcome.code is not None:
        message = outcome.error.message if outcome.error else ""
        assert outcome.code not in BAD_CODES, f"{what} -> {outcome.code.name}: {message}"
        assert expect.codes is None or outcome.code in expect.codes, (
            f"{what} -> {outcome.code.name} ({message}); expected one of "
            f"{sorted(c.name for c in expect.codes or ())}{' or an answer' if expect.ends or expect.open else ''}"
        )
    elif outcome.open:
        assert expect.open, f"{what} hung: no end within {BOUND} s ({len(outcome.responses)} responses)"
    else:
        assert expect.ends, (
            f"{what} ended normally; expected one of {sorted(c.name for c in expect.codes or ())}"
        )
    if expect.first and outcome.code is None:
        assert outcome.responses, f"{what}: no first response within {BOUND} s"


async def exercise(
    name: str,
    requests: Iterable[Any],
    send: Callable[[Any], Awaitable[Outcome]],
    etcd_client: EtcdClient,
    prefix: str,
    *,
    expect: Callable[[Any], Expect] = any_status,
    may_change: Callable[[Any, Outcome], Collection[bytes] | None] | None = None,
    verify: Callable[[Any, Outcome], Awaitable[None]] | None = None,
) -> int:
    """Send each request, judge the answer, and check etcd: a refused call leaves the durable keys as
    they were. ``may_change`` names the keys a call may change (None: any); by default a refused
    call changes none and an accepted one may change anything. ``verify`` adds RPC-specific checks."""
    count = 0
    for request in requests:
        count += 1
        before = await durable_keys(etcd_client, prefix)
        outcome = await send(request)
        what = f"{name}({str(request)[:600]!r})"
        judge(what, outcome, expect(request))
        if verify is not None:
            await verify(request, outcome)
        allowed = may_change(request, outcome) if may_change else (() if outcome.code is not None else None)
        if allowed is not None:
            after = await durable_keys(etcd_client, prefix)
            changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
            # An allowed key ending in "/" allows what is under it.
            unexpected = {
                k
                for k in changed
                if not any(k == a or (a.endswith(b"/") and k.startswith(a)) for a in allowed)
            }
            assert not unexpected, f"{what} -> {outcome.code} but changed etcd: {sorted(changed)}"
    return count


async def healthy(address: str, check: Callable[[aio.Channel], Awaitable[Any]]) -> None:
    """The server still serves: its health check says SERVING and a real RPC succeeds."""
    async with mesh_channel(address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        await check(channel)


REAL_CALLS: dict[str, Callable[[aio.Channel], Awaitable[Any]]] = {
    "registry": lambda ch: registry_pb2_grpc.RegistryServiceStub(ch).ListAgents(
        registry_pb2.ListAgentsRequest(), timeout=10
    ),
    "orchestrator": lambda ch: orchestrator_pb2_grpc.OrchestratorServiceStub(ch).ListVariables(
        orchestrator_pb2.ListVariablesRequest(), timeout=10
    ),
    "coordination": lambda ch: coordination_pb2_grpc.CoordinationServiceStub(ch).ListProtocols(
        coordination_pb2.ListProtocolsRequest(), timeout=10
    ),
    "planner": lambda ch: planner_pb2_grpc.PlannerServiceStub(ch).ListGoals(
        planner_pb2.ListGoalsRequest(), timeout=10
    ),
}


def stream_expectation(name: str, request: Any) -> Expect:
    """The right answer of each server-streaming RPC to a request of the test (no sessions, goals,
    agents or variables exist under its prefix but what the fuzzing itself makes)."""
    if name == "WatchAgents":
        if request.after_revision < 0:
            return Expect.of(IA)
        if request.after_revision == 0:  # the snapshot (SNAPSHOT_DONE at least), then live changes
            return Expect.of(first=True, open=True)
        return Expect.of(OOR, open=True)  # history after that revision; OUT_OF_RANGE once compacted
    if name == "WatchVariables":
        if request.after_revision < 0:
            return Expect.of(IA)
        return Expect.of(IA, OOR, open=True)  # INVALID_ARGUMENT for a malformed prefix
    if name == "WatchSession":
        return Expect.of(IA, NF)
    if name == "ExecuteGoal":
        target = request.WhichOneof("target")
        if target is None:
            return Expect.of(IA)
        if target == "goal_id":
            return Expect.of(IA, NF)
        # A goal is validated first (no agent offers any capability here); a valid one is followed.
        return Expect.of(IA, FP, ends=True, first=True, open=True)
    raise AssertionError(f"no expectation for the stream {name}: add one")


# Requests sent besides the random ones, so that every branch of stream_expectation is taken.
FIXED: dict[str, list[Message]] = {
    "WatchAgents": [
        registry_pb2.WatchAgentsRequest(),
        registry_pb2.WatchAgentsRequest(after_revision=-1),
        registry_pb2.WatchAgentsRequest(after_revision=2**40),
    ],
    "WatchVariables": [
        orchestrator_pb2.WatchVariablesRequest(),
        orchestrator_pb2.WatchVariablesRequest(prefix="/bad"),
        orchestrator_pb2.WatchVariablesRequest(prefix="fz", after_revision=1),
    ],
    "WatchSession": [
        coordination_pb2.WatchSessionRequest(session_id="no-such-session"),
        coordination_pb2.WatchSessionRequest(),
    ],
    "ExecuteGoal": [
        planner_pb2.ExecuteGoalRequest(),
        planner_pb2.ExecuteGoalRequest(goal_id="no-such-goal"),
        planner_pb2.ExecuteGoalRequest(  # valid, but no agent has the capability
            goal=planner_pb2.GoalSpec(steps=[planner_pb2.StepSpec(step_id="s1", capability="fz-nobody")])
        ),
        planner_pb2.ExecuteGoalRequest(  # a cycle
            goal=planner_pb2.GoalSpec(
                steps=[
                    planner_pb2.StepSpec(step_id="s1", capability="c", depends_on=["s2"]),
                    planner_pb2.StepSpec(step_id="s2", capability="c", depends_on=["s1"]),
                ]
            )
        ),
    ],
}

# Refused calls of these may still have written (a coordination that ran, a cancel marker).
WRITES_WHEN_REFUSED = {"CoordinateVariable", "CoordinateSystem", "CancelGoal"}


def may_change_of(name: str) -> Callable[[Any, Outcome], Collection[bytes] | None] | None:
    """Reads (Get*, List*, Watch*) never write a durable key, answered or refused."""
    if name in WRITES_WHEN_REFUSED:
        return lambda request, outcome: None
    if name.startswith(("Get", "List", "Watch")):
        return lambda request, outcome: ()
    return None  # the default: refused calls write nothing


@pytest.mark.parametrize("kind", list(SERVICES))
async def test_garbage_never_breaks_a_service(
    kind: str,
    service: Callable[..., Awaitable[MeshServer]],
    mesh_config: MeshConfig,
    etcd_client: EtcdClient,
) -> None:
    """Every unary and server-streaming RPC (Heartbeat: its own test below)."""
    servers = {"registry": await service("registry")}
    if kind != "registry":
        servers["coordination"] = await service("coordination")
        if kind != "coordination":
            servers[kind] = await service(kind)
    module, stub_class, service_name = SERVICES[kind]
    descriptor = module.DESCRIPTOR.services_by_name[service_name]
    codes: dict[str, int] = {}
    async with mesh_channel(servers[kind].address) as channel:
        stub = stub_class(channel)
        for method in descriptor.methods:
            if method.name in SKIP or method.client_streaming:
                continue
            call, name = getattr(stub, method.name), method.name
            expect: Callable[[Any], Expect] = any_status
            send: Callable[[Any], Awaitable[Outcome]] = functools.partial(unary, call)
            n = 25
            if method.server_streaming:
                expect = functools.partial(stream_expectation, name)
                send = functools.partial(server_stream, call, expect)
                n = 30
            drawn = [_build(method.input_type, kwargs) for kwargs in draw(messages(method.input_type), n)]
            codes[name] = await exercise(
                name,
                FIXED.get(name, []) + drawn,
                send,
                etcd_client,
                mesh_config.prefix,
                expect=expect,
                may_change=may_change_of(name),
            )
    for server_kind, server in servers.items():
        await healthy(server.address, REAL_CALLS[server_kind])
    # Every RPC of the service but Heartbeat (below) and SKIP (further below) had many requests.
    tried = {m.name for m in descriptor.methods if not (m.name in SKIP or m.client_streaming)}
    assert set(codes) == tried and min(codes.values()) >= 10, codes


# -- Heartbeat: a stream of beats from registered agents, mixed with garbage -------------


def beat_verdict(beat: registry_pb2.HeartbeatRequest, tokens: dict[str, str]) -> tuple[Any, str] | None:
    """None for a beat the registry must answer; else the status that ends the stream and what it must
    name (the field of an INVALID_ARGUMENT, the agent of a NOT_FOUND / PERMISSION_DENIED)."""
    if not validate.ID_RE.match(beat.agent_id):
        return IA, "agent_id"
    if not math.isfinite(beat.load.load) or beat.load.load < 0:
        return IA, "load.load"
    if beat.agent_id not in tokens:
        return NF, beat.agent_id
    if beat.token != tokens[beat.agent_id]:
        return PD, beat.agent_id
    return None


def beats(tokens: dict[str, str]) -> st.SearchStrategy[list[registry_pb2.HeartbeatRequest]]:
    """Streams of 1-6 beats: valid ones of the registered agents (``tokens``: id -> token), with good
    or garbage loads, mixed with unknown agents, wrong tokens, empty and random beats."""
    ids = st.sampled_from(sorted(tokens))
    good_load = st.builds(
        common_pb2.AgentLoad,
        load=st.floats(min_value=0, max_value=4),
        queue_length=st.integers(0, 2**32 - 1),
        memory_bytes=st.integers(0, 2**64 - 1),
    )
    any_load = messages(common_pb2.AgentLoad.DESCRIPTOR).map(
        functools.partial(_build, common_pb2.AgentLoad.DESCRIPTOR)
    )
    good = st.builds(
        lambda a, load: registry_pb2.HeartbeatRequest(agent_id=a, token=tokens[a], load=load), ids, good_load
    )
    beat = st.one_of(
        good,
        good,
        good,
        st.builds(
            lambda a, load: registry_pb2.HeartbeatRequest(agent_id=a, token=tokens[a], load=load),
            ids,
            any_load,
        ),
        st.builds(
            lambda a, token: registry_pb2.HeartbeatRequest(agent_id=a, token=token),
            ids,
            st.sampled_from(sorted(tokens.values())) | WORDS,
        ),
        st.builds(
            lambda a, token: registry_pb2.HeartbeatRequest(agent_id=a, token=token),
            st.from_regex(validate.ID_RE, fullmatch=True).filter(lambda a: a not in tokens),
            st.sampled_from(sorted(tokens.values())),
        ),
        st.just(registry_pb2.HeartbeatRequest()),
        messages(registry_pb2.HeartbeatRequest.DESCRIPTOR).map(
            functools.partial(_build, registry_pb2.HeartbeatRequest.DESCRIPTOR)
        ),
    )
    return st.lists(beat, min_size=1, max_size=6)


async def heartbeat(stub: registry_pb2_grpc.RegistryServiceStub, stream: list[Any]) -> Outcome:
    """One Heartbeat stream carrying ``stream``, through a blocking client (``stub``) in a thread.

    When a server ends a stream while the client still writes, grpc.aio's client may replace the
    server's status with "INTERNAL: Internal error from Core" (grpc/grpc#36066, the write that
    failed overwrites it); the blocking client reports what the server said, which is what is
    judged here.
    """

    def run() -> Outcome:
        responses: list[Any] = []
        try:
            for response in stub.Heartbeat(
                iter(stream), timeout=BOUND, metadata=auth.call_metadata(os.environ.get(auth.TOKEN_ENV))
            ):
                responses.append(response)
        except grpc.RpcError as exc:
            return Outcome.failed(exc, responses)
        return Outcome(responses)

    return await asyncio.to_thread(run)


async def test_heartbeat_garbage_ends_the_stream_cleanly_and_leases_survive(
    service: Callable[..., Awaitable[MeshServer]], mesh_config: MeshConfig, etcd_client: EtcdClient
) -> None:
    """The contract (services/registry/server.py, sdk/agent.py AgentHost): one stream carries the beats
    of many agents, each valid beat answered with its agent's lease and TTL; a bad beat ends the
    stream with INVALID_ARGUMENT naming the field, NOT_FOUND (unknown agent) or PERMISSION_DENIED
    (wrong token) naming the agent, which the SDK uses to register that agent again; a bad beat
    changes nothing, so the other agents keep their registration and lease, and a new stream
    keeps the leases alive."""
    registry = await service("registry")
    dead = f"127.0.0.1:{closed_port()}"
    async with mesh_channel(registry.address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        registered = {}
        for agent_id in ("hb-1", "hb-2"):
            registered[agent_id] = await stub.RegisterAgent(
                registry_pb2.RegisterAgentRequest(
                    agent_id=agent_id, endpoint=dead, lease_ttl=duration_pb2.Duration(seconds=10)
                ),
                timeout=10,
            )
        tokens = {a: r.token for a, r in registered.items()}
        leases = {a: r.agent.lease_id for a, r in registered.items()}

        def expect(stream: list[registry_pb2.HeartbeatRequest]) -> Expect:
            bad = [v for v in (beat_verdict(b, tokens) for b in stream) if v is not None]
            return Expect.of(*(code for code, _ in bad)) if bad else Expect.of(ends=True)

        sync_channel = grpc.insecure_channel(registry.address)
        sync_stub = registry_pb2_grpc.RegistryServiceStub(sync_channel)

        async def send(stream: list[registry_pb2.HeartbeatRequest]) -> Outcome:
            return await heartbeat(sync_stub, stream)

        async def verify(stream: list[registry_pb2.HeartbeatRequest], outcome: Outcome) -> None:
            # Beats are handled concurrently and answered as they finish; the first error
            # (whichever bad beat's) ends the stream, and may overtake answers to valid beats.
            verdicts = [beat_verdict(b, tokens) for b in stream]
            valid = collections.Counter(
                b.agent_id for b, v in zip(stream, verdicts, strict=True) if v is None
            )
            got = collections.Counter(r.agent_id for r in outcome.responses)
            assert not got - valid, f"beats {stream} answered for {got}, valid beats: {valid}"
            for response in outcome.responses:
                assert response.lease_id == leases[response.agent_id] and response.ttl.seconds > 0
            bad = {v for v in verdicts if v is not None}
            if not bad:
                assert got == valid, f"beats {stream} answered for {got}, valid beats: {valid}"
            else:
                assert outcome.error is not None
                # INVALID_ARGUMENT names the field; NOT_FOUND / PERMISSION_DENIED the agent,
                # which the SDK's AgentHost registers again (sdk/agent.py).
                named = outcome.error.field if outcome.code == IA else outcome.error.metadata.get("agent_id")
                assert (outcome.code, named) in bad, f"{outcome.error} names {named!r}, not one of {bad}"
            # Garbage changed nothing: both agents keep their registration and lease, and a
            # new stream of valid beats keeps the leases alive.
            fresh = await send(
                [registry_pb2.HeartbeatRequest(agent_id=a, token=t) for a, t in tokens.items()]
            )
            assert fresh.code is None and not fresh.open, fresh
            assert sorted((r.agent_id, r.lease_id) for r in fresh.responses) == sorted(leases.items())
            for agent_id, lease in leases.items():
                agent = (
                    await stub.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id), timeout=10)
                ).agent
                assert agent.lease_id == lease and agent.generation == 1

        H, (a, ta), (b, tb) = registry_pb2.HeartbeatRequest, *sorted(tokens.items())
        fixed = [  # one agent's garbage amid good beats of both
            [H(agent_id=a, token=ta), H(agent_id=b, token=tb), H(agent_id=a, token=ta)],
            [H(agent_id=a, token=ta), H(agent_id=b, token=ta), H(agent_id=a, token=ta)],
            [H(agent_id=a, token=ta), H(agent_id="hb-unknown", token=ta)],
            [H(agent_id=a, token=ta), H(), H(agent_id=b, token=tb)],
            [H(agent_id=a, token=ta), H(agent_id=b, token=tb, load=common_pb2.AgentLoad(load=math.nan))],
        ]
        try:
            n = await exercise(
                "Heartbeat",
                fixed + draw(beats(tokens), 60),
                send,
                etcd_client,
                mesh_config.prefix,
                expect=expect,
                may_change=lambda r, o: (),  # a beat never writes a durable key
                verify=verify,
            )
        finally:
            sync_channel.close()
        assert n == len(fixed) + 60
    await healthy(registry.address, REAL_CALLS["registry"])


# -- RPCs that start processes or dial: random requests, dangerous fields kept safe ------


def constrained(
    descriptor: D.Descriptor, **safe: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    """Random values for ``descriptor``'s fields, but those named in ``safe`` are drawn only from their
    strategies (None leaves the field unset)."""
    return st.tuples(messages(descriptor), st.fixed_dictionaries(safe)).map(
        lambda pair: {
            **{k: v for k, v in pair[0].items() if k not in safe},
            **{k: v for k, v in pair[1].items() if v is not None},
        }
    )


def durations(*seconds: float) -> st.SearchStrategy[duration_pb2.Duration | None]:
    def make(s: float) -> duration_pb2.Duration:
        d = duration_pb2.Duration()
        d.FromNanoseconds(int(s * 1e9))
        return d

    return st.none() | st.sampled_from(seconds).map(make)


def built(descriptor: D.Descriptor, kwargs: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[Message]:
    return kwargs.map(functools.partial(_build, descriptor))


def children() -> set[int]:
    """Live (not zombie) child processes of this test process."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            except (OSError, ValueError):
                continue
            if int(ppid) == os.getpid() and state != "Z":
                found.add(int(entry))
    return found


ACTIVE = {
    registry_pb2.SUPERVISION_STATE_STARTING,
    registry_pb2.SUPERVISION_STATE_RUNNING,
    registry_pb2.SUPERVISION_STATE_RESTARTING,
}


async def test_process_and_dialing_rpcs_with_safe_targets(
    service: Callable[..., Awaitable[MeshServer]],
    mesh_config: MeshConfig,
    etcd_client: EtcdClient,
    tmp_path: Path,
) -> None:
    """StartAgent, RestartAgent, MigrateAgent, RegisterProtocol with random requests whose launch specs
    run only a missing file or ``python -c 'raise SystemExit(n)'`` and whose endpoints are only
    loopback ports nothing listens on. A StartAgent that passes validation makes a supervised agent
    (its record and token are the only durable keys it may write) that fails or stops as its restart
    policy says, and is then stopped. A live supervised agent (``fz-live``) is restarted and asked to
    move to dead targets, and keeps running; a registered one (``fz-reg``) is asked to move too. No
    process of the test is left behind."""
    registry = await service("registry")
    coordination = await service("coordination")
    processes_before = children()
    keys = RegistryStore(etcd_client, mesh_config).keys
    dead = [f"127.0.0.1:{closed_port()}", f"localhost:{closed_port('localhost')}"]
    exit3 = [sys.executable, "-c", "raise SystemExit(3)"]
    exit0 = [sys.executable, "-c", "raise SystemExit(0)"]
    missing = str(tmp_path / "missing" / "agent")
    period30 = duration_pb2.Duration(seconds=30)
    async with mesh_channel(registry.address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        # A registered (not supervised) agent at a dead endpoint, and a live supervised one.
        reg = await stub.RegisterAgent(
            registry_pb2.RegisterAgentRequest(
                agent_id="fz-reg", endpoint=dead[0], lease_ttl=duration_pb2.Duration(seconds=60)
            ),
            timeout=10,
        )
        live = await stub.StartAgent(
            registry_pb2.StartAgentRequest(
                agent_id="fz-live",
                launch=registry_pb2.LaunchSpec(
                    command=registry_pb2.Command(argv=[sys.executable, str(EXAMPLES / "worker.py")])
                ),
                restart_policy=registry_pb2.RestartPolicy(max_restarts=3, period=period30),
                start_timeout=duration_pb2.Duration(seconds=30),
            ),
            timeout=60,
        )
        assert live.agent.state == registry_pb2.SUPERVISION_STATE_RUNNING
        ids = st.sampled_from(["fz-1", "fz-2", "fz-3", "fz-reg", "fz-live"]) | WORDS
        tokens = st.sampled_from([reg.token, live.token]) | WORDS
        endpoints = st.none() | st.sampled_from(
            ["", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:x", ":1", "127.0.0.1:1", *dead]
        )
        nul = "a\x00b"
        argv = st.sampled_from(
            [
                *([], [missing], [missing, "--flag", "é"], ["mabeam-fuzz-no-such-command"], [""]),
                *(exit3, exit0, [*exit3, nul], [nul]),
            ]
        )
        launch = st.none() | built(
            registry_pb2.LaunchSpec.DESCRIPTOR,
            constrained(
                registry_pb2.LaunchSpec.DESCRIPTOR,
                command=argv.map(
                    lambda a: registry_pb2.Command(argv=a)
                ),  # python_entry_point, when drawn, wins
                python_entry_point=st.none()
                | st.sampled_from(["", "nope", "mabeam_fuzz_no_such_module:make"]),
                working_dir=st.none() | st.sampled_from(["", str(tmp_path), missing, "/", "a\x00b"]),
            ),
        )
        policy = st.none() | built(
            registry_pb2.RestartPolicy.DESCRIPTOR,
            constrained(
                registry_pb2.RestartPolicy.DESCRIPTOR,
                max_restarts=st.none() | st.integers(0, 2),
                period=durations(-1, 0, 30),
                backoff_initial=durations(-0.5, 0, 0.01),
                backoff_max=durations(0, 0.05, 1),
            ),
        )

        def start(argv: list[str], strategy: int = 0, **launch: Any) -> registry_pb2.StartAgentRequest:
            return registry_pb2.StartAgentRequest(
                agent_id="fz-1",
                launch=registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=argv), **launch)
                if argv
                else registry_pb2.LaunchSpec(**launch),
                restart_policy=registry_pb2.RestartPolicy(strategy=strategy, max_restarts=1, period=period30),  # type: ignore[arg-type]
            )

        # Every path of a start, whatever the draw: stopped or failed per policy, cannot start,
        # and what the OS refuses to exec (NUL bytes, a bad environment variable name).
        T, R, P = (
            registry_pb2.RESTART_STRATEGY_TEMPORARY,
            registry_pb2.RESTART_STRATEGY_TRANSIENT,
            registry_pb2.RESTART_STRATEGY_PERMANENT,
        )
        fixed: dict[str, list[Message]] = {
            "StartAgent": [
                start(exit3, T),
                start(exit0, R),
                start(exit3, R),
                start(exit0, P),
                start([missing], P),
                start(exit3, P, working_dir=missing),
                start([], P, python_entry_point="mabeam_fuzz_no_such_module:make"),
                start([*exit3, "a\x00b"]),
                start(exit3, env={"": "x"}),
                start(exit3, env={"A=B": "x"}),
                start(exit3, env={"A": "x\x00"}),
                start(exit3, working_dir="a\x00b"),
            ],
            "MigrateAgent": [
                registry_pb2.MigrateAgentRequest(agent_id="fz-reg", token=reg.token, target_endpoint=dead[1]),
                registry_pb2.MigrateAgentRequest(
                    agent_id="fz-live", token=live.token, target_endpoint=dead[0]
                ),
                *(
                    registry_pb2.MigrateAgentRequest(
                        agent_id="fz-live", token=live.token, launch=start(argv).launch
                    )
                    for argv in ([missing], exit3, [*exit3, "a\x00b"])
                ),
            ],
            "RestartAgent": [registry_pb2.RestartAgentRequest(agent_id="fz-live")],
            "RegisterProtocol": [coordination_pb2.RegisterProtocolRequest(name="fz_proto", endpoint=dead[0])],
        }
        rpcs: dict[str, tuple[D.Descriptor, st.SearchStrategy[dict[str, Any]]]] = {
            "StartAgent": (
                registry_pb2.StartAgentRequest.DESCRIPTOR,
                constrained(
                    registry_pb2.StartAgentRequest.DESCRIPTOR,
                    agent_id=ids,
                    launch=launch,
                    restart_policy=policy,
                    start_timeout=durations(-1, 0.05, 0.5, 2, 1000),
                ),
            ),
            "RestartAgent": (
                registry_pb2.RestartAgentRequest.DESCRIPTOR,
                constrained(registry_pb2.RestartAgentRequest.DESCRIPTOR, agent_id=ids),
            ),
            "MigrateAgent": (
                registry_pb2.MigrateAgentRequest.DESCRIPTOR,
                constrained(
                    registry_pb2.MigrateAgentRequest.DESCRIPTOR,
                    agent_id=ids,
                    token=tokens,
                    target_endpoint=endpoints,
                    launch=launch,
                ),
            ),
            "RegisterProtocol": (
                coordination_pb2.RegisterProtocolRequest.DESCRIPTOR,
                constrained(
                    coordination_pb2.RegisterProtocolRequest.DESCRIPTOR,
                    name=st.sampled_from(["fz_proto", "vickrey", "Bad Name"]) | WORDS,
                    endpoint=endpoints,
                ),
            ),
        }

        async def record(agent_id: str) -> Any:
            got = await etcd_client.get(keys.supervised_agent(agent_id))
            return registry_pb2.SupervisedAgent.FromString(got.value) if got is not None else None

        def may_change(request: Any, outcome: Outcome) -> Collection[bytes]:
            if outcome.code not in (None, FP):
                return ()
            # A StartAgent that passed validation made a supervised agent: its record, the
            # digests of its caller's token and of its process's, and (auth on) the principal
            # its processes present; a restart gives the new process a token of its own.
            principals = mesh_config.key("auth", "principals") + b"/"
            if isinstance(request, registry_pb2.StartAgentRequest):
                return {
                    keys.supervised_agent(request.agent_id),
                    keys.supervised_token(request.agent_id),
                    keys.process_token(request.agent_id),
                    principals,
                }
            if isinstance(request, registry_pb2.RestartAgentRequest) and request.agent_id == "fz-live":
                if outcome.code is not None:
                    return ()
                return {keys.supervised_agent("fz-live"), keys.process_token("fz-live"), principals}
            if isinstance(request, registry_pb2.MigrateAgentRequest) and request.HasField("launch"):
                # A target process was started (and failed): it had a token of its own, whose
                # digest replaced the previous one's (a dead process's token; docs/decisions.md,
                # "Secrets at rest"). Nothing else moves.
                return {keys.process_token(request.agent_id), principals}
            assert outcome.code is not None, (
                f"{type(request).__name__} succeeded with a dead target: {request}"
            )
            return ()

        async def verify(request: Any, outcome: Outcome) -> None:
            if isinstance(request, registry_pb2.StartAgentRequest) and outcome.code in (None, FP):
                await start_verified(request, outcome)
            # The live agent lives on, whatever was asked.
            current = await record("fz-live")
            assert current.state in ACTIVE and current.launch == live.agent.launch, current

        async def start_verified(request: registry_pb2.StartAgentRequest, outcome: Outcome) -> None:
            # The agent never registers: it failed or stopped, as its policy says, and runs nothing.
            rec = await record(request.agent_id)
            assert rec is not None and rec.state not in ACTIVE and rec.pid == 0, rec
            p = request.restart_policy
            strategy = (
                p.strategy if request.HasField("restart_policy") else registry_pb2.RESTART_STRATEGY_PERMANENT
            )
            if outcome.code is None:
                assert rec.state == registry_pb2.SUPERVISION_STATE_STOPPED, rec
                assert strategy in (
                    registry_pb2.RESTART_STRATEGY_TEMPORARY,
                    registry_pb2.RESTART_STRATEGY_TRANSIENT,
                ), rec
                if strategy == registry_pb2.RESTART_STRATEGY_TRANSIENT:
                    assert rec.last_exit == "exit code 0", rec
            else:
                assert rec.state == registry_pb2.SUPERVISION_STATE_FAILED, rec
                if strategy == registry_pb2.RESTART_STRATEGY_TEMPORARY:
                    assert rec.restart_count == 0, rec
                limit = p.max_restarts if p.HasField("period") or p.max_restarts else 3
                assert rec.restart_count <= limit, rec
            listed = await stub.ListSupervisedAgents(
                registry_pb2.ListSupervisedAgentsRequest(page_size=1000), timeout=10
            )
            assert any(a.agent_id == rec.agent_id and a.state == rec.state for a in listed.agents)
            stopped = await stub.StopAgent(
                registry_pb2.StopAgentRequest(
                    agent_id=request.agent_id, grace=duration_pb2.Duration(seconds=1)
                ),
                timeout=20,
            )
            assert stopped.agent.state == registry_pb2.SUPERVISION_STATE_STOPPED and stopped.agent.pid == 0

        def drawn_count(name: str) -> int:
            return 16 if name == "StartAgent" else 25  # a start runs up to three processes

        counts = {}
        async with mesh_channel(coordination.address) as coordination_channel:
            stubs = {
                "registry": stub,
                "coordination": coordination_pb2_grpc.CoordinationServiceStub(coordination_channel),
            }
            for name, (descriptor, kwargs) in rpcs.items():
                call = getattr(stubs["coordination" if name == "RegisterProtocol" else "registry"], name)
                drawn = [_build(descriptor, k) for k in draw(kwargs, drawn_count(name))]
                counts[name] = await exercise(
                    name,
                    fixed[name] + drawn,
                    functools.partial(unary, call),
                    etcd_client,
                    mesh_config.prefix,
                    may_change=may_change,
                    verify=verify,
                )
        assert counts == {name: len(fixed[name]) + drawn_count(name) for name in rpcs}
        # The registered agent was not moved or harmed; the live one still serves, then stops.
        agent = (await stub.GetAgent(registry_pb2.GetAgentRequest(agent_id="fz-reg"), timeout=10)).agent
        assert agent.endpoint == dead[0] and agent.generation == 1
        await healthy(registry.address, REAL_CALLS["registry"])
        await healthy(coordination.address, REAL_CALLS["coordination"])
        await stub.StopAgent(
            registry_pb2.StopAgentRequest(agent_id="fz-live", grace=duration_pb2.Duration(seconds=2)),
            timeout=30,
        )
    await eventually(lambda: children() <= processes_before, timeout=10, what="the test's processes to end")


# -- regressions: what the fuzzing found ----------------------------------------------------


async def register_at_a_dead_endpoint(stub: registry_pb2_grpc.RegistryServiceStub, agent_id: str) -> str:
    """Register ``agent_id`` at a port nothing listens on; its token."""
    request = registry_pb2.RegisterAgentRequest(agent_id=agent_id, endpoint=f"127.0.0.1:{closed_port()}")
    return (await stub.RegisterAgent(request, timeout=10)).token


async def test_heartbeat_refuses_a_nan_or_negative_load(
    service: Callable[..., Awaitable[MeshServer]],
) -> None:
    """A beat's load was stored as sent: NaN or negative loads then misled least-loaded assignment
    and adaptation rules. Now the beat is refused (INVALID_ARGUMENT naming load.load) and the
    stored load stays as it was."""
    registry = await service("registry")
    H = registry_pb2.HeartbeatRequest
    async with mesh_channel(registry.address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        token = await register_at_a_dead_endpoint(stub, "loaded")
        sync_channel = grpc.insecure_channel(registry.address)
        try:
            sync_stub = registry_pb2_grpc.RegistryServiceStub(sync_channel)
            good = await heartbeat(
                sync_stub, [H(agent_id="loaded", token=token, load=common_pb2.AgentLoad(load=0.5))]
            )
            assert good.code is None and len(good.responses) == 1
            for load in (math.nan, -math.inf, math.inf, -0.5):
                outcome = await heartbeat(
                    sync_stub, [H(agent_id="loaded", token=token, load=common_pb2.AgentLoad(load=load))]
                )
                assert outcome.code == IA and outcome.error is not None, outcome
                assert outcome.error.field == "load.load" and not outcome.responses, outcome.error
        finally:
            sync_channel.close()
        agent = (await stub.GetAgent(registry_pb2.GetAgentRequest(agent_id="loaded"), timeout=10)).agent
        assert agent.load.load == 0.5


@pytest.mark.parametrize(
    ("launch", "field"),
    [
        (
            registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=["true", "a\x00b"])),
            "launch.command.argv[1]",
        ),
        (registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=["true"]), env={"": "x"}), "launch.env"),
        (
            registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=["true"]), env={"A=B": "x"}),
            "launch.env",
        ),
        (
            registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=["true"]), env={"A": "x\x00"}),
            "launch.env[A]",
        ),
        (
            registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=["true"]), working_dir="/\x00"),
            "launch.working_dir",
        ),
    ],
)
async def test_a_launch_spec_exec_would_refuse_is_invalid(
    service: Callable[..., Awaitable[MeshServer]], launch: registry_pb2.LaunchSpec, field: str
) -> None:
    """StartAgent stored such a spec; the supervisor's spawn then raised ValueError, its task died,
    the agent stayed STARTING (re-spawned every second) and StartAgent answered DEADLINE_EXCEEDED
    after its timeout. Now StartAgent and MigrateAgent refuse it at once, naming the field."""
    registry = await service("registry")
    async with mesh_channel(registry.address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        for call, request in (
            (stub.StartAgent, registry_pb2.StartAgentRequest(agent_id="nul", launch=launch)),
            (stub.MigrateAgent, registry_pb2.MigrateAgentRequest(agent_id="nul", token="t", launch=launch)),
        ):
            outcome = await unary(call, request)
            assert outcome.code == IA and outcome.error is not None, outcome
            assert outcome.error.field == field, outcome.error
        listed = await stub.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest(), timeout=10)
        assert not listed.agents


async def test_a_stored_launch_spec_exec_refuses_fails_the_agent(
    service: Callable[..., Awaitable[MeshServer]], mesh_config: MeshConfig, etcd_client: EtcdClient
) -> None:
    """A supervised record written before that check (or restored from a backup) no longer kills
    the supervision task over and over: the agent is FAILED, "cannot start"."""
    registry = await service("registry")
    keys = RegistryStore(etcd_client, mesh_config).keys
    record = registry_pb2.SupervisedAgent(
        agent_id="old-nul",
        launch=registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=["true", "a\x00b"])),
        state=registry_pb2.SUPERVISION_STATE_STARTING,
    )
    await etcd_client.put(keys.supervised_agent("old-nul"), record.SerializeToString())

    async def failed() -> Any:
        got = await etcd_client.get(keys.supervised_agent("old-nul"))
        found = registry_pb2.SupervisedAgent.FromString(got.value)
        return found if found.state == registry_pb2.SUPERVISION_STATE_FAILED else None

    found = await eventually(failed, timeout=15, what="the agent to be FAILED")
    assert found.reason.startswith("cannot start") and found.pid == 0, found
    await healthy(registry.address, REAL_CALLS["registry"])


async def test_migrating_to_a_launch_that_cannot_start_keeps_the_agent(
    service: Callable[..., Awaitable[MeshServer]], tmp_path: Path
) -> None:
    """MigrateAgent with a launch spec whose command does not exist: the spawn raised outside the
    migration's error handling, the supervision task died and took the running agent with it,
    and the call hung until its deadline. Now it is FAILED_PRECONDITION and the agent runs on."""
    registry = await service("registry")
    async with mesh_channel(registry.address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        started = await stub.StartAgent(
            registry_pb2.StartAgentRequest(
                agent_id="stay",
                launch=registry_pb2.LaunchSpec(
                    command=registry_pb2.Command(argv=[sys.executable, str(EXAMPLES / "worker.py")])
                ),
                start_timeout=duration_pb2.Duration(seconds=30),
            ),
            timeout=60,
        )
        before = (await stub.GetAgent(registry_pb2.GetAgentRequest(agent_id="stay"), timeout=10)).agent
        missing = registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=[str(tmp_path / "missing")]))
        outcome = await unary(
            stub.MigrateAgent,
            registry_pb2.MigrateAgentRequest(agent_id="stay", token=started.token, launch=missing),
        )
        assert outcome.code == FP and outcome.error is not None, outcome
        assert "cannot start" in outcome.error.message, outcome.error
        listed = await stub.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest(), timeout=10)
        (record,) = [a for a in listed.agents if a.agent_id == "stay"]
        assert record.state == registry_pb2.SUPERVISION_STATE_RUNNING and record.pid == started.agent.pid, (
            record
        )
        assert pid_alive(record.pid)
        after = (await stub.GetAgent(registry_pb2.GetAgentRequest(agent_id="stay"), timeout=10)).agent
        assert after.endpoint == before.endpoint and after.generation == before.generation
        await stub.StopAgent(
            registry_pb2.StopAgentRequest(agent_id="stay", grace=duration_pb2.Duration(seconds=2)), timeout=30
        )


async def test_a_trailing_newline_is_not_part_of_a_valid_name(
    service: Callable[..., Awaitable[MeshServer]], mesh_config: MeshConfig, etcd_client: EtcdClient
) -> None:
    """The name checks matched ``^...$``, and ``$`` also matches before a final newline: "a\\n" was a
    valid agent id, variable, protocol, step id and entry point. Now every one is refused."""
    servers = {kind: await service(kind) for kind in ("registry", "coordination", "orchestrator", "planner")}
    cases: list[tuple[str, str, Message, str]] = [
        (
            "registry",
            "RegisterAgent",
            registry_pb2.RegisterAgentRequest(agent_id="a\n", endpoint="127.0.0.1:1"),
            "agent_id",
        ),
        (
            "registry",
            "StartAgent",
            registry_pb2.StartAgentRequest(
                agent_id="a", launch=registry_pb2.LaunchSpec(python_entry_point="mod:make\n")
            ),
            "launch.python_entry_point",
        ),
        (
            "orchestrator",
            "SetVariable",
            orchestrator_pb2.SetVariableRequest(name="x\n", value=common_pb2.Value(number_value=1)),
            "name",
        ),
        ("coordination", "RegisterProtocol", coordination_pb2.RegisterProtocolRequest(name="p\n"), "name"),
        (
            "planner",
            "SubmitGoal",
            planner_pb2.SubmitGoalRequest(
                goal=planner_pb2.GoalSpec(steps=[planner_pb2.StepSpec(step_id="s\n", capability="c")])
            ),
            "goal.steps",
        ),
    ]
    before = await durable_keys(etcd_client, mesh_config.prefix)
    for kind, method, request, field in cases:
        async with mesh_channel(servers[kind].address) as channel:
            outcome = await unary(getattr(SERVICES[kind][1](channel), method), request)
        assert outcome.code == IA and outcome.error is not None, (method, outcome)
        assert outcome.error.field == field, (method, outcome.error)
    assert await durable_keys(etcd_client, mesh_config.prefix) == before


async def test_a_refused_beat_reaches_a_client_that_is_still_sending(
    service: Callable[..., Awaitable[MeshServer]],
) -> None:
    """The fuzzing's aio client saw "INTERNAL: Internal error from Core" instead of the registry's
    NOT_FOUND: the stream ended while the client still had beats to write, and grpc.aio reports
    the failed write instead of the server's status (grpc/grpc#36066). The registry now reads the
    rest of a burst before it ends the stream, so the status arrives with the agent it names."""
    registry = await service("registry")
    H = registry_pb2.HeartbeatRequest
    async with mesh_channel(registry.address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        token = await register_at_a_dead_endpoint(stub, "busy")
        burst = [H(agent_id="gone", token="t")] + [H(agent_id="busy", token=token)] * 300
        for _ in range(5):
            outcome = await read_stream(stub.Heartbeat(iter(burst)), Expect.of(NF))
            assert outcome.code == NF and outcome.error is not None, outcome
            assert outcome.error.metadata.get("agent_id") == "gone", outcome.error


HOST_AGENTS = 300


async def test_a_host_registers_a_lapsed_agent_again_and_keeps_the_others(
    service: Callable[..., Awaitable[MeshServer]],
) -> None:
    """The same race in an AgentHost: once one agent's registration was gone, every stream of the
    host ended in INTERNAL, so the host never registered that agent again, reconnected forever, and
    every other agent's lease lapsed too. Now the host gets NOT_FOUND and registers the agent again."""
    registry = await service("registry")
    host = AgentHost([Agent(f"h{i}") for i in range(HOST_AGENTS)], registry=registry.address, lease_ttl=3)
    await host.start()
    try:
        async with mesh_channel(registry.address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            for victim in ("h0", "h7"):
                await stub.DeregisterAgent(
                    registry_pb2.DeregisterAgentRequest(agent_id=victim, token=host.agents[victim].token),
                    timeout=10,
                )

                async def registered(victim: str = victim) -> bool:
                    return (
                        await unary(stub.GetAgent, registry_pb2.GetAgentRequest(agent_id=victim))
                    ).code is None

                await eventually(registered, timeout=15, interval=0.1, what=f"{victim} registered again")
            listed = await stub.ListAgents(registry_pb2.ListAgentsRequest(page_size=1000), timeout=10)
            assert len(listed.agents) == HOST_AGENTS
    finally:
        await host.stop()


async def test_stopping_a_lease_keeper_as_a_refresh_completes_ends_it() -> None:
    """Found as a hang in this file's teardown under load (a service's stop waited forever on its
    LeaseKeeper): on Python 3.11, asyncio.wait_for returns the result of a refresh that completes
    as the cancellation arrives, the cancellation is lost, and the keeper refreshed on. stop()
    now cancels until the keeper has ended."""

    class Refreshes:
        """An etcd client whose refresh answers when the test says."""

        def __init__(self) -> None:
            self.answer: asyncio.Future[int] | None = None

        async def lease(self, ttl: int) -> Any:
            return types.SimpleNamespace(id=7, ttl=ttl)

        async def keepalive_once(self, lease_id: int) -> int:
            self.answer = asyncio.get_running_loop().create_future()
            return await self.answer

    client = Refreshes()
    keeper = LeaseKeeper(client, 3)  # type: ignore[arg-type]
    await keeper.start()
    task = keeper._task
    await eventually(lambda: client.answer is not None, what="a refresh in flight")
    assert client.answer is not None and task is not None
    client.answer.set_result(3)  # the refresh answers; in the same instant, the keeper is stopped
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(keeper.stop(), 10)
    # Before, stop() waited until the keeper ended by itself: never, with an etcd that answers.
    assert loop.time() - started < 1.0 and task.cancelled()
