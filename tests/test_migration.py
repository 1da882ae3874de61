"""MigrateAgent under continuous load: the final count equals the increments acknowledged."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from harness.channels import agent_channel
from harness.wait import eventually
from mabeam import errors
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient
from mabeam.runtime.process import pid_alive
from mabeam.server import MeshServer
from mabeam.v1 import agent_pb2, agent_pb2_grpc, registry_pb2

WORKER = str(Path(__file__).resolve().parent.parent / "examples" / "worker.py")
pytestmark = pytest.mark.timeout(60)


class Counter(Agent):
    capabilities = ("count",)

    def __init__(self, agent_id: str) -> None:
        super().__init__(agent_id)
        self.counter = 0

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        value = self.counter
        await asyncio.sleep(0.001)  # a window in which a lost update would show
        self.counter = value + 1
        return {"count": self.counter}

    async def export_state(self) -> bytes:
        return json.dumps({"counter": self.counter}).encode()

    async def import_state(self, state: bytes) -> None:
        self.counter = json.loads(state)["counter"]


async def test_migration_under_load_loses_no_increment(service: Callable[..., Awaitable[MeshServer]]) -> None:
    registry = await service("registry")
    client = await MeshClient.connect(registry=registry.address)
    old_agent, new_agent = Counter("ctr"), Counter("ctr")
    old_host = AgentHost([old_agent], registry=registry.address, lease_ttl=1.0)
    new_host = AgentHost([], registry=registry.address, lease_ttl=1.0)
    new_host.add(new_agent, register=False)
    await old_host.start()
    await new_host.start()
    acked = 0
    stop = asyncio.Event()

    async def increment(lane: int) -> None:
        nonlocal acked
        # Callers keep using the endpoint they looked up before the move.
        async with agent_channel(old_host.address) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            n = 0
            while not stop.is_set():
                n += 1
                await stub.ExecuteStep(
                    agent_pb2.ExecuteStepRequest(agent_id="ctr", step_id=f"{lane}-{n}", capability="count"),
                    timeout=10,
                )
                acked += 1

    # Counter.execute_step is not safe under concurrency by design, so one lane.
    lanes = [asyncio.create_task(increment(0))]
    try:
        await eventually(lambda: acked > 20, what="increments flowing")
        reply = await client.registry.MigrateAgent(
            registry_pb2.MigrateAgentRequest(
                agent_id="ctr", token=old_agent.token, target_endpoint=new_host.address
            )
        )
        assert reply.agent.endpoint == new_host.address and reply.agent.generation == 2
        # The registry told the old instance (AgentMoved) before it answered: no polling to wait for.
        assert "ctr" not in old_host.agents
        assert old_host.servicer.migrations["ctr"].forward_to == new_host.address
        await eventually(
            lambda: new_agent.counter > old_agent.counter + 10, what="calls reach the new instance"
        )
        stop.set()
        await asyncio.gather(*lanes)
        assert new_agent.counter == acked
        # The new instance keeps the lease: still registered after several TTLs.
        await asyncio.sleep(3)  # time is what is tested
        got = await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="ctr"))
        assert got.agent.endpoint == new_host.address
    finally:
        stop.set()
        for lane in lanes:
            lane.cancel()
        await old_host.stop()
        await new_host.stop()
        await client.close()


async def test_migrate_needs_the_token_and_a_target(service: Callable[..., Awaitable[MeshServer]]) -> None:
    registry = await service("registry")
    client = await MeshClient.connect(registry=registry.address)
    host = AgentHost([Counter("m1")], registry=registry.address)
    await host.start()
    try:
        with pytest.raises(errors.PermissionDenied):
            await client.registry.MigrateAgent(
                registry_pb2.MigrateAgentRequest(agent_id="m1", token="wrong", target_endpoint="127.0.0.1:9")
            )
        with pytest.raises(errors.InvalidArgument) as info:
            await client.registry.MigrateAgent(
                registry_pb2.MigrateAgentRequest(agent_id="m1", token=host.agents["m1"].token)
            )
        assert info.value.field == "target_endpoint"
        with pytest.raises(errors.NotFound):
            await client.registry.MigrateAgent(
                registry_pb2.MigrateAgentRequest(agent_id="ghost", token="x", target_endpoint="127.0.0.1:9")
            )
        # A target that is not there: the move is rolled back and the agent keeps serving.
        with pytest.raises(errors.FailedPrecondition, match="importing"):
            await client.registry.MigrateAgent(
                registry_pb2.MigrateAgentRequest(
                    agent_id="m1", token=host.agents["m1"].token, target_endpoint="127.0.0.1:9"
                )
            )
        got = await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="m1"))
        assert got.agent.endpoint == host.address and got.agent.generation == 1
        async with agent_channel(host.address) as channel:
            reply = await agent_pb2_grpc.AgentServiceStub(channel).ExecuteStep(
                agent_pb2.ExecuteStepRequest(agent_id="m1", capability="count"), timeout=5
            )
        assert reply.output.struct_value["count"] == 1
    finally:
        await host.stop()
        await client.close()


async def test_an_old_instance_never_told_looks_at_the_registration_once(
    service: Callable[..., Awaitable[MeshServer]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry died after the export: the held calls wait for the fallback, then run here."""
    registry = await service("registry")
    host = AgentHost([Counter("held")], registry=registry.address)
    watch = host.servicer.watch_migration
    monkeypatch.setattr(host.servicer, "watch_migration", functools.partial(watch, timeout=0.5))
    await host.start()
    try:
        async with agent_channel(host.address) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            await stub.ExportState(agent_pb2.ExportStateRequest(agent_id="held"), timeout=5)
            held = asyncio.ensure_future(
                stub.ExecuteStep(
                    agent_pb2.ExecuteStepRequest(agent_id="held", capability="count"), timeout=10
                )
            )
            await asyncio.sleep(0.2)  # time is what is tested: nothing answers the call meanwhile
            assert not held.done(), "calls are held from the export on"
            reply = await held  # the registration still names this host: it serves again
            assert reply.output.struct_value["count"] == 1
        assert "held" in host.agents and "held" not in host.servicer.migrations
    finally:
        await host.stop()


async def test_supervised_agent_migrates_to_a_new_process(
    service: Callable[..., Awaitable[MeshServer]],
) -> None:
    registry = await service("registry")
    client = await MeshClient.connect(registry=registry.address)
    launch = registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=[sys.executable, WORKER]))
    reply = await client.registry.StartAgent(registry_pb2.StartAgentRequest(agent_id="mover", launch=launch))
    old_pid, token = reply.agent.pid, reply.token
    old_endpoint = (
        await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="mover"))
    ).agent.endpoint
    acked = 0
    stop = asyncio.Event()

    async def increment() -> None:
        nonlocal acked
        async with agent_channel(old_endpoint) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            while not stop.is_set():
                await stub.ExecuteStep(
                    agent_pb2.ExecuteStepRequest(agent_id="mover", capability="count"), timeout=10
                )
                acked += 1

    lane = asyncio.create_task(increment())
    try:
        await eventually(lambda: acked > 10, what="increments flowing")
        with pytest.raises(errors.PermissionDenied):
            await client.registry.MigrateAgent(
                registry_pb2.MigrateAgentRequest(agent_id="mover", token="x", launch=launch)
            )
        moved = await client.registry.MigrateAgent(
            registry_pb2.MigrateAgentRequest(agent_id="mover", token=token, launch=launch)
        )
        assert moved.agent.endpoint != old_endpoint and moved.agent.generation == 2
        at_move = acked
        await eventually(lambda: acked > at_move + 3, what="increments flowing after the move (forwarded)")
        stop.set()
        await lane
        # The old process was stopped; the supervisor watches the new one.
        await eventually(lambda: not pid_alive(old_pid), timeout=10, what="old process stopped")
        record = next(
            a
            for a in (
                await client.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
            ).agents
            if a.agent_id == "mover"
        )
        assert record.pid not in (0, old_pid) and record.state == registry_pb2.SUPERVISION_STATE_RUNNING
        async with agent_channel(moved.agent.endpoint) as channel:
            final = await agent_pb2_grpc.AgentServiceStub(channel).ExecuteStep(
                agent_pb2.ExecuteStepRequest(agent_id="mover", capability="count", input=_zero()), timeout=10
            )
        # "count" adds its input (0 here) and returns the counter: every acknowledged increment is in it.
        assert final.output.struct_value["count"] == acked
        await asyncio.sleep(2.5)  # time is what is tested: the new process keeps the lease
        got = await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="mover"))
        assert got.agent.endpoint == moved.agent.endpoint
    finally:
        stop.set()
        lane.cancel()
        await client.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id="mover"))
        await client.close()


def _zero() -> Any:
    from google.protobuf import struct_pb2

    value = struct_pb2.Value()
    value.number_value = 0
    return value


async def test_migrate_asked_of_another_replica_is_handed_to_the_owner(
    service: Callable[..., Awaitable[MeshServer]],
) -> None:
    """The replica asked hands the call (same request_id from the caller) to the one running the agent."""
    first, second = await service("registry"), await service("registry")
    clients = {s.instance_id: await MeshClient.connect(registry=s.address) for s in (first, second)}
    launch = registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=[sys.executable, WORKER]))
    try:
        started = await clients[first.instance_id].registry.StartAgent(
            registry_pb2.StartAgentRequest(agent_id="handed", launch=launch)
        )
        page = await clients[first.instance_id].registry.ListSupervisedAgents(
            registry_pb2.ListSupervisedAgentsRequest()
        )
        owner = next(a.supervisor_id for a in page.agents if a.agent_id == "handed")
        other = next(i for i in clients if i != owner)
        moved = await asyncio.wait_for(
            clients[other].registry.MigrateAgent(
                registry_pb2.MigrateAgentRequest(agent_id="handed", token=started.token, launch=launch)
            ),
            45,
        )
        assert moved.agent.generation == 2 and moved.agent.endpoint
        page = await clients[other].registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
        record = next(a for a in page.agents if a.agent_id == "handed")
        assert record.supervisor_id == owner and record.pid not in (0, started.agent.pid)
        await eventually(lambda: not pid_alive(started.agent.pid), timeout=10, what="old process stopped")
    finally:
        await clients[first.instance_id].registry.StopAgent(registry_pb2.StopAgentRequest(agent_id="handed"))
        for client in clients.values():
            await client.close()
