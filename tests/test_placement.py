"""Nodes and placement (issue 16, point 4), on several registry replicas with different node names."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf import struct_pb2

from harness.channels import agent_channel
from harness.cli import mabeam
from harness.wait import eventually
from mabeam import errors
from mabeam.client import MeshClient
from mabeam.config import MeshConfig
from mabeam.runtime.process import pid_alive
from mabeam.runtime.service import start_service
from mabeam.server import MeshServer
from mabeam.services.registry.nodes import NodeSpec
from mabeam.services.registry.server import builder
from mabeam.v1 import agent_pb2, agent_pb2_grpc, common_pb2, registry_pb2

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "examples" / "worker.py")
pytestmark = pytest.mark.timeout(120)

LAUNCH = registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=[sys.executable, WORKER]))


@pytest.fixture
async def replicas(mesh_config: MeshConfig) -> AsyncIterator[dict[str, MeshServer]]:
    """Two registry replicas of one mesh, on node "node-a" (zone a) and node "node-b" (zone b)."""
    started: dict[str, MeshServer] = {}
    for name, zone in (("node-a", "a"), ("node-b", "b")):
        build = builder(node=NodeSpec(name, {"zone": zone}))
        started[name] = await start_service("registry", build, mesh_config, port=0)
    yield started
    for server in reversed(list(started.values())):
        await server.stop(0)


async def start(client: MeshClient, agent_id: str, **placement: object) -> registry_pb2.SupervisedAgent:
    request = registry_pb2.StartAgentRequest(
        agent_id=agent_id,
        launch=LAUNCH,
        placement=registry_pb2.Placement(**placement),  # type: ignore[arg-type]
    )
    return (await client.registry.StartAgent(request)).agent


async def test_nodes_listed_and_agents_started_on_the_node_asked_for(
    replicas: dict[str, MeshServer],
) -> None:
    # Every call goes to the replica on node-a: placement on node-b is that replica's decision to make.
    client = await MeshClient.connect(registry=replicas["node-a"].address)
    try:

        async def both_listed() -> bool:
            nodes = (await client.registry.ListNodes(registry_pb2.ListNodesRequest())).nodes
            return [n.name for n in nodes] == ["node-a", "node-b"]

        await eventually(both_listed, timeout=10, what="both nodes listed")
        nodes = (await client.registry.ListNodes(registry_pb2.ListNodesRequest())).nodes
        assert [dict(n.labels) for n in nodes] == [{"zone": "a"}, {"zone": "b"}]
        assert all(n.capacity.memory_bytes > 0 and n.capacity.cpu >= 1 for n in nodes)
        assert list(nodes[1].replica_ids) == [replicas["node-b"].instance_id]
        zone_b = await client.registry.ListNodes(registry_pb2.ListNodesRequest(node_selector={"zone": "b"}))
        assert [n.name for n in zone_b.nodes] == ["node-b"]

        # By name: the replica on node-b runs it, and the agent's process declares node-b.
        on_b = await start(client, "w-b", node="node-b")
        assert on_b.state == registry_pb2.SUPERVISION_STATE_RUNNING
        assert on_b.node == "node-b" and on_b.supervisor_id == replicas["node-b"].instance_id
        agent = (await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="w-b"))).agent
        assert agent.node == "node-b"

        # By selector.
        on_a = await start(client, "w-a", node_selector={"zone": "a"})
        assert on_a.node == "node-a" and on_a.supervisor_id == replicas["node-a"].instance_id

        # None given: the least-loaded node. Both have one agent: fill node-a to two, then node-b wins.
        await start(client, "w-a2", node="node-a")
        anywhere = await start(client, "w-any")
        assert anywhere.node == "node-b" and anywhere.supervisor_id == replicas["node-b"].instance_id

        nodes = (await client.registry.ListNodes(registry_pb2.ListNodesRequest())).nodes
        assert [n.supervised_agents for n in nodes] == [2, 2]

        # `mabeam agents` shows the node of each agent.
        code, out, err = await mabeam("agents", "--registry", replicas["node-a"].address)
        assert code == 0, err
        assert "NODE" in out.splitlines()[0]
        row = next(line for line in out.splitlines() if line.startswith("w-b "))
        assert "node-b" in row.split()
        code, out, _ = await mabeam("agents", "--registry", replicas["node-a"].address, "--json")
        assert {a["agent_id"]: a["node"] for a in json.loads(out)}["w-a"] == "node-a"

        for agent_id in ("w-b", "w-a", "w-a2", "w-any"):
            await client.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id=agent_id))
    finally:
        await client.close()


async def test_placement_that_fits_no_node_or_is_malformed_is_refused(
    replicas: dict[str, MeshServer],
) -> None:
    client = await MeshClient.connect(registry=replicas["node-b"].address)
    try:

        async def both_listed() -> bool:
            return len((await client.registry.ListNodes(registry_pb2.ListNodesRequest())).nodes) == 2

        await eventually(both_listed, timeout=10, what="both nodes listed")
        with pytest.raises(errors.FailedPrecondition, match="node 'node-c'"):
            await start(client, "nowhere", node="node-c")
        with pytest.raises(errors.FailedPrecondition, match="zone=c"):
            await start(client, "nowhere", node_selector={"zone": "c"})
        with pytest.raises(errors.FailedPrecondition):
            await start(client, "nowhere", node="node-a", node_selector={"zone": "b"})
        with pytest.raises(errors.InvalidArgument, match=r"placement\.node"):
            await start(client, "nowhere", node="not a node!")
        with pytest.raises(errors.InvalidArgument, match="node_selector"):
            await start(client, "nowhere", node_selector={f"k{i}": "v" for i in range(17)})
        # Nothing was written for the refused starts.
        page = await client.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
        assert [a.agent_id for a in page.agents] == []
    finally:
        await client.close()


async def test_agent_placed_anywhere_moves_to_a_live_node_when_its_node_goes(
    replicas: dict[str, MeshServer],
) -> None:
    client = await MeshClient.connect(registry=replicas["node-a"].address)
    try:

        async def both_listed() -> bool:
            return len((await client.registry.ListNodes(registry_pb2.ListNodesRequest())).nodes) == 2

        await eventually(both_listed, timeout=10, what="both nodes listed")
        # node-a gets one agent first, so the least-loaded node for "free" (no placement) is node-b.
        await start(client, "filler", node="node-a")
        free = await start(client, "free")
        pinned = await start(client, "pinned", node="node-b")
        assert free.node == "node-b" and pinned.node == "node-b"

        await replicas.pop("node-b").stop(0)

        async def free_on_a() -> bool:
            page = await client.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
            record = {a.agent_id: a for a in page.agents}["free"]
            return record.node == "node-a" and record.state == registry_pb2.SUPERVISION_STATE_RUNNING

        await eventually(free_on_a, timeout=30, what="the unpinned agent taken over on node-a")
        page = await client.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
        record = {a.agent_id: a for a in page.agents}["pinned"]
        # Pinned to node-b, which has no replica left: nobody runs it.
        assert record.node == "node-b" and record.supervisor_id != replicas["node-a"].instance_id
        nodes = (await client.registry.ListNodes(registry_pb2.ListNodesRequest())).nodes
        assert [n.name for n in nodes] == ["node-a"]
    finally:
        await client.close()


async def test_supervised_agent_migrates_to_another_node_with_its_state(
    replicas: dict[str, MeshServer],
) -> None:
    # Asked of node-a's replica, which runs the agent: node-b's replica starts the new instance.
    client = await MeshClient.connect(registry=replicas["node-a"].address)
    try:
        started = await client.registry.StartAgent(
            registry_pb2.StartAgentRequest(
                agent_id="mover", launch=LAUNCH, placement=registry_pb2.Placement(node="node-a")
            )
        )
        old_pid, token = started.agent.pid, started.token
        assert started.agent.node == "node-a"
        old = (await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="mover"))).agent
        assert old.node == "node-a"
        async with agent_channel(old.endpoint) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            for _ in range(5):
                await stub.ExecuteStep(
                    agent_pb2.ExecuteStepRequest(agent_id="mover", capability="count"), timeout=10
                )

        with pytest.raises(errors.InvalidArgument, match="placement"):
            await client.registry.MigrateAgent(
                registry_pb2.MigrateAgentRequest(
                    agent_id="mover",
                    token=token,
                    target_endpoint="127.0.0.1:1",
                    placement=registry_pb2.Placement(node="node-b"),
                )
            )
        with pytest.raises(errors.FailedPrecondition, match="zone=c"):
            await client.registry.MigrateAgent(
                registry_pb2.MigrateAgentRequest(
                    agent_id="mover",
                    token=token,
                    launch=LAUNCH,
                    placement=registry_pb2.Placement(node_selector={"zone": "c"}),
                )
            )
        moved = await client.registry.MigrateAgent(
            registry_pb2.MigrateAgentRequest(
                agent_id="mover",
                token=token,
                launch=LAUNCH,
                placement=registry_pb2.Placement(node_selector={"zone": "b"}),
            )
        )
        assert moved.agent.generation == 2 and moved.agent.endpoint != old.endpoint
        assert moved.agent.node == "node-b"

        async def on_b() -> bool:
            page = await client.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
            record = {a.agent_id: a for a in page.agents}["mover"]
            return (
                record.node == "node-b"
                and record.supervisor_id == replicas["node-b"].instance_id
                and record.state == registry_pb2.SUPERVISION_STATE_RUNNING
                and record.pid not in (0, old_pid)
                # the caller's placement as given: any node of zone b (not pinned to node-b)
                and record.placement == registry_pb2.Placement(node_selector={"zone": "b"})
            )

        await eventually(on_b, timeout=15, what="node-b's replica supervises the moved agent")
        await eventually(lambda: not pid_alive(old_pid), timeout=15, what="node-a stopped the old process")
        # The state came along: the counter goes on from 5.
        async with agent_channel(moved.agent.endpoint) as channel:
            reply = await agent_pb2_grpc.AgentServiceStub(channel).ExecuteStep(
                agent_pb2.ExecuteStepRequest(agent_id="mover", capability="count", input=_number(0)),
                timeout=10,
            )
        assert reply.output.struct_value["count"] == 5
        # The new process keeps the registration alive (its beats pass) after the old one is gone.
        page = await client.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
        record = {a.agent_id: a for a in page.agents}["mover"]
        got = (await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="mover"))).agent
        assert got.endpoint == moved.agent.endpoint and got.status == registry_pb2.AGENT_STATUS_SERVING

        async def beats_after_the_move() -> bool:
            now = (await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="mover"))).agent
            return now.last_heartbeat_at.ToNanoseconds() > got.last_heartbeat_at.ToNanoseconds()

        await eventually(beats_after_the_move, timeout=10, what="the new process heartbeats")
        # node-b's supervisor restarts it there after a crash.
        os.kill(record.pid, signal.SIGKILL)

        async def restarted_on_b() -> bool:
            page = await client.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
            r = {a.agent_id: a for a in page.agents}["mover"]
            return (
                r.state == registry_pb2.SUPERVISION_STATE_RUNNING
                and r.pid not in (0, record.pid)
                and r.supervisor_id == replicas["node-b"].instance_id
            )

        await eventually(restarted_on_b, timeout=20, what="restarted on node-b after a crash")
        await client.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id="mover"))
    finally:
        await client.close()


def _number(n: float) -> struct_pb2.Value:
    value = struct_pb2.Value()
    value.number_value = n
    return value


async def test_placement_reserves_declared_resources_against_each_nodes_capacity(
    replicas: dict[str, MeshServer],
) -> None:
    """An agent that needs every core of a node takes that node's room: the next one goes to the
    other node, and a third finds no room anywhere (FAILED_PRECONDITION naming the need)."""
    client = await MeshClient.connect(registry=replicas["node-a"].address)
    started: list[str] = []
    try:

        async def both_listed() -> list[registry_pb2.Node] | None:
            nodes = list((await client.registry.ListNodes(registry_pb2.ListNodesRequest())).nodes)
            return nodes if len(nodes) == 2 else None

        nodes = await eventually(both_listed, timeout=10, what="both nodes listed")
        cores = min(n.capacity.cpu for n in nodes)
        need = registry_pb2.Placement(resources=common_pb2.Resources(cpu=cores))
        first = await start(client, "big-1", resources=need.resources)
        started.append("big-1")
        second = await start(client, "big-2", resources=need.resources)
        started.append("big-2")
        assert {first.node, second.node} == {"node-a", "node-b"}  # each took a node's every core

        async def reserved() -> bool:
            listed = (await client.registry.ListNodes(registry_pb2.ListNodesRequest())).nodes
            return all(n.reserved.cpu == cores for n in listed)

        await eventually(reserved, timeout=10, what="each node shows its reservation")
        with pytest.raises(errors.FailedPrecondition) as info:
            await start(client, "big-3", resources=need.resources)
        assert f"room for {cores:g} cpu" in info.value.message
        with pytest.raises(errors.InvalidArgument) as bad:
            await start(client, "bad-1", resources=common_pb2.Resources(cpu=-1))
        assert bad.value.field == "placement.resources.cpu"
        # One that declares nothing goes anywhere.
        small = await start(client, "small-1")
        started.append("small-1")
        assert small.node in {"node-a", "node-b"}
    finally:
        for agent_id in started:
            await client.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id=agent_id))
        await client.close()
