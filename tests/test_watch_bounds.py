"""Bounded memory per Watch* stream, on real services and a real etcd.

A consumer that stops reading while changes pour in has its stream ended with
RESOURCE_EXHAUSTED (reason WATCH_QUEUE_FULL, the limit named) instead of the
server buffering without end, and resuming from the last revision it saw gives
it every later change exactly once. The limit is lowered to a few events
(``MABEAM_WATCH_QUEUE_LIMIT``) so that a few hundred changes are enough.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from harness.channels import mesh_channel
from harness.wait import eventually
from mabeam import errors
from mabeam.client import MeshClient
from mabeam.runtime.watchqueue import LIMIT_ENV
from mabeam.server import MeshServer
from mabeam.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc, registry_pb2, registry_pb2_grpc

StartService = Callable[..., Awaitable[MeshServer]]

LIMIT = 20
# Changes made while the consumer does not read: far more than the limit plus
# what gRPC's flow-control windows hold (about 64 KiB each way).
BATCH = 50
AGENTS = 200
# About 4 KiB per event, so that a few hundred events outgrow those windows.
PADDING = {f"pad{i}": "x" * 400 for i in range(10)}

VARIABLES = 200
PAD = "x" * 4000


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LIMIT_ENV, str(LIMIT))


# The slow consumer's own channel: without BDP probing its receive window
# stays at 64 KiB, so gRPC stops taking events from the server soon after the
# consumer stops reading.
SLOW_OPTIONS = [("grpc.http2.bdp_probe", 0)]


async def _read_until_cut(stream: AsyncIterator[object], into: list[object]) -> errors.MabeamError:
    """Read the rest of a stream; the error that ended it (fails if it ended without one)."""
    try:
        async for event in stream:
            into.append(event)
    except grpc.RpcError as exc:
        return errors.from_rpc_error(exc)
    raise AssertionError("the stream ended without an error")


def _assert_cut(exc: errors.MabeamError) -> None:
    assert isinstance(exc, errors.ResourceExhausted), exc
    assert exc.reason_value == common_pb2.ERROR_REASON_WATCH_QUEUE_FULL
    assert exc.metadata.get("limit") == str(LIMIT)
    assert f"{LIMIT} events" in exc.message and "after_revision" in exc.message


async def test_a_slow_agent_watcher_is_cut_and_resumes_without_missing_a_change(
    small_limit: None, service: StartService
) -> None:
    registry = await service("registry")
    slow = mesh_channel(registry.address, options=SLOW_OPTIONS)
    async with await MeshClient.connect(registry=registry.address) as client:
        stream = registry_pb2_grpc.RegistryServiceStub(slow).WatchAgents(
            registry_pb2.WatchAgentsRequest(capability="bounded")
        )
        seen: list[registry_pb2.WatchAgentsResponse] = []
        it = stream.__aiter__()
        first = await it.__anext__()
        assert first.type == registry_pb2.AGENT_EVENT_TYPE_SNAPSHOT_DONE
        seen.append(first)

        # The watcher reads nothing now, while agents come and go.
        tokens: dict[str, str] = {}

        async def come_and_go(agent_id: str) -> None:
            reply = await client.registry.RegisterAgent(
                registry_pb2.RegisterAgentRequest(
                    agent_id=agent_id, endpoint="127.0.0.1:1", capabilities=["bounded"], labels=PADDING
                )
            )
            tokens[agent_id] = reply.token
            await client.registry.DeregisterAgent(
                registry_pb2.DeregisterAgentRequest(agent_id=agent_id, token=reply.token)
            )

        ids = [f"b{i:04d}" for i in range(AGENTS)]
        for i in range(0, AGENTS, BATCH):
            await asyncio.gather(*(come_and_go(a) for a in ids[i : i + BATCH]))
        try:
            exc = await asyncio.wait_for(_read_until_cut(it, seen), 10)  # type: ignore[arg-type]
        except TimeoutError:
            raise AssertionError(f"seen {len(seen)}") from None
        _assert_cut(exc)
        # Cut well before the end: the server held at most LIMIT events for it
        # (plus what the flow-control windows carry), not all 400.
        assert len(seen) < 2 * AGENTS

        # Resume after the last revision seen: every later change, once.
        last = max(e.revision for e in seen)
        resumed: list[registry_pb2.WatchAgentsResponse] = []

        async def resume() -> None:
            async for event in client.registry.WatchAgents(
                registry_pb2.WatchAgentsRequest(capability="bounded", after_revision=last)
            ):
                resumed.append(event)

        follower = asyncio.create_task(resume())
        try:
            await eventually(
                lambda: (
                    sum(e.type == registry_pb2.AGENT_EVENT_TYPE_REMOVED for e in seen + resumed) >= AGENTS
                ),
                timeout=20,
                what="every removal seen",
            )
        finally:
            follower.cancel()
        assert all(e.revision > last for e in resumed)
        # (The health prober may also mark an agent, an UPDATED event: not counted.)
        counted = (registry_pb2.AGENT_EVENT_TYPE_ADDED, registry_pb2.AGENT_EVENT_TYPE_REMOVED)
        changes = [(e.agent.agent_id, e.type) for e in seen + resumed if e.type in counted]
        expected = [(a, registry_pb2.AGENT_EVENT_TYPE_ADDED) for a in ids]
        expected += [(a, registry_pb2.AGENT_EVENT_TYPE_REMOVED) for a in ids]
        assert sorted(changes) == sorted(expected)  # none missed, none repeated
        await slow.close(None)


async def test_a_slow_variable_watcher_is_paced_not_cut_and_misses_nothing(
    small_limit: None, service: StartService
) -> None:
    """WatchVariables reads its own etcd watch at the consumer's pace: no queue to outgrow, no cut.

    With the limit at 20 events, 200 changes of 4 KB pile up behind a
    consumer that reads nothing; when it reads again it gets every one, in
    order, and the stream stays open (the backlog stayed in etcd's history).
    """
    orchestrator = await service("orchestrator")
    slow = mesh_channel(orchestrator.address, options=SLOW_OPTIONS)
    async with await MeshClient.connect(orchestrator=orchestrator.address) as client:
        o = client.orchestrator
        marker = await o.SetVariable(
            orchestrator_pb2.SetVariableRequest(name="v/start", value=_text("start"))
        )
        stream = orchestrator_pb2_grpc.OrchestratorServiceStub(slow).WatchVariables(
            orchestrator_pb2.WatchVariablesRequest(prefix="v/", after_revision=marker.variable.mod_revision)
        )
        it = stream.__aiter__()
        await o.SetVariable(orchestrator_pb2.SetVariableRequest(name="v/first", value=_text("first")))
        seen: list[orchestrator_pb2.WatchVariablesResponse] = [await it.__anext__()]
        names = [f"v/{i:04d}" for i in range(VARIABLES)]
        for i in range(0, VARIABLES, BATCH):
            await asyncio.gather(
                *(
                    o.SetVariable(orchestrator_pb2.SetVariableRequest(name=n, value=_text(PAD)))
                    for n in names[i : i + BATCH]
                )
            )

        async def read_all() -> None:
            while len(seen) < VARIABLES + 1:
                seen.append(await it.__anext__())

        await asyncio.wait_for(read_all(), 30)
        assert sorted(e.variable.name for e in seen) == sorted(["v/first", *names])  # each once
        revisions = [e.revision for e in seen]
        assert revisions == sorted(set(revisions))  # in write order
        stream.cancel()
        await slow.close(None)


def _text(value: str) -> common_pb2.Value:
    return common_pb2.Value(string_value=value)
