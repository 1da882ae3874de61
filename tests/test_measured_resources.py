"""Measured resources (issue 16, point 5): the supervisor's RSS and CPU of its agents' processes, the
SDK's own figures on its heartbeats, and least-loaded assignment that weighs memory."""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from google.protobuf import struct_pb2

from harness.node_agent import start_node_agent
from harness.wait import eventually
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient
from mabeam.server import MeshServer
from mabeam.v1 import agent_pb2, common_pb2, planner_pb2, registry_pb2

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent

MiB = 1 << 20

# An agent that holds ~64 MiB and keeps one core busy for a few seconds after it starts.
BURNER = """
import asyncio, threading, time
from mabeam.agent import Agent

ballast = bytearray(64 * 1024 * 1024)
for i in range(0, len(ballast), 4096):
    ballast[i] = 1

def burn(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass

threading.Thread(target=burn, args=(8.0,), daemon=True).start()
asyncio.run(Agent(capabilities=["burn"]).serve())
"""


async def get_agent(client: MeshClient, agent_id: str) -> registry_pb2.Agent:
    return (await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id))).agent


async def test_supervisor_measures_rss_and_cpu_of_its_agents(
    service: Callable[..., Awaitable[MeshServer]], tmp_path: Path
) -> None:
    registry = await service("registry")
    script = tmp_path / "burner.py"
    script.write_text(BURNER)
    client = await MeshClient.connect(registry=registry.address)
    try:
        started = await client.registry.StartAgent(
            registry_pb2.StartAgentRequest(
                agent_id="burner",
                launch=registry_pb2.LaunchSpec(
                    command=registry_pb2.Command(argv=[sys.executable, str(script)])
                ),
            )
        )
        pid = started.agent.pid
        seen: dict[str, Any] = {}

        async def measured() -> bool:
            agent = await get_agent(client, "burner")
            seen["agent"] = agent
            return agent.measured.memory_bytes > 64 * MiB and agent.measured.cpu_fraction > 0.2

        await eventually(measured, timeout=20, what="RSS and CPU of the supervised process measured")
        agent = seen["agent"]
        rss = psutil.Process(pid).memory_info().rss
        # The registry's figure is the process's own, within what moves between two samples.
        assert abs(int(agent.measured.memory_bytes) - rss) < 32 * MiB, (agent.measured, rss)
        assert agent.measured.reported_at.seconds > 0
        # The SDK in that process reports its own RSS in its heartbeats too (one agent: not shared).
        assert agent.load.memory_bytes > 64 * MiB and not agent.load.shared_process
        # ListSupervisedAgents shows the measure with the record.
        page = await client.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
        record = next(a for a in page.agents if a.agent_id == "burner")
        assert record.measured.memory_bytes > 64 * MiB

        # The burn ends after 8 s: the CPU figure comes down (it is sampled, not a lifetime average).
        async def idle() -> bool:
            return (await get_agent(client, "burner")).measured.cpu_fraction < 0.1

        await eventually(idle, timeout=25, what="CPU fraction back near 0 once the burn ended")
        await client.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id="burner"))
    finally:
        await client.close()


async def test_sdk_reports_its_process_memory_flagged_shared_on_a_host_of_many(
    service: Callable[..., Awaitable[MeshServer]],
) -> None:
    registry = await service("registry")
    client = await MeshClient.connect(registry=registry.address)
    alone = AgentHost([Agent("alone", capabilities=["x"])], registry=registry.address, lease_ttl=2.0)
    many = AgentHost(
        [Agent(f"many-{i}", capabilities=["x"]) for i in range(3)], registry=registry.address, lease_ttl=2.0
    )
    await alone.start()
    await many.start()
    try:
        rss = psutil.Process().memory_info().rss

        async def reported() -> bool:
            agents = [await get_agent(client, i) for i in ("alone", "many-0", "many-1", "many-2")]
            return all(a.load.memory_bytes > 0 for a in agents)

        await eventually(reported, timeout=15, what="every agent's beat carries the process's RSS")
        one = await get_agent(client, "alone")
        assert not one.load.shared_process
        # This test's own process: the figure is its RSS (within what moved since).
        assert abs(int(one.load.memory_bytes) - rss) < 64 * MiB
        for i in range(3):
            agent = await get_agent(client, f"many-{i}")
            assert agent.load.shared_process, agent.load
        # Not supervised: nothing measured by a supervisor.
        assert not one.HasField("measured")
        # The node the host declared: the host name by default.
        assert one.node
    finally:
        await many.stop()
        await alone.stop()
        await client.close()


async def test_javascript_agent_reports_process_memory_usage(
    service: Callable[..., Awaitable[MeshServer]],
) -> None:
    registry = await service("registry")
    js = await start_node_agent(
        "--id", "js-mem", registry=registry.address, env={**os.environ, "MABEAM_NODE_NAME": "js-node"}
    )
    client = await MeshClient.connect(registry=registry.address)
    try:

        async def reported() -> bool:
            try:
                agent = await get_agent(client, "js-mem")
            except Exception:
                return False
            return agent.load.memory_bytes > 10 * MiB

        # process.memoryUsage().rss of a node process running grpc-js is tens of MiB.
        await eventually(reported, timeout=20, what="the JavaScript agent's RSS in its beats")
        agent = await get_agent(client, "js-mem")
        assert agent.load.memory_bytes < 2048 * MiB and agent.load.cpu_fraction >= 0
        assert agent.node == "js-node"
    finally:
        js.terminate()
        await js.wait()
        await client.close()


class Light(Agent):
    """An agent that reports a fixed memory use and executes steps, naming itself in the output."""

    capabilities = ("weigh",)

    def __init__(self, agent_id: str, memory: int, declared: int) -> None:
        super().__init__(agent_id, resources=common_pb2.Resources(memory_bytes=declared))
        self.memory = memory

    def load(self) -> common_pb2.AgentLoad:
        return common_pb2.AgentLoad(load=0.0, memory_bytes=self.memory)

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        return {"agent": self.agent_id}


async def test_least_loaded_assignment_weighs_memory_against_declared_capacity(
    planner_mesh: tuple[MeshClient, MeshServer],
) -> None:
    client, registry = planner_mesh
    # Same reported load (0) and queue: only memory tells them apart. "a-full" sorts first by id
    # (the old tie-break) and uses 95 % of the memory it declared; "b-roomy" uses 5 %.
    host = AgentHost(
        [Light("a-full", 95 * MiB, 100 * MiB), Light("b-roomy", 5 * MiB, 100 * MiB)],
        registry=registry.address,
    )
    await host.start()
    try:

        async def reported() -> bool:
            page = await client.registry.ListAgents(registry_pb2.ListAgentsRequest(capability="weigh"))
            return sorted(a.load.memory_bytes for a in page.agents) == [5 * MiB, 95 * MiB]

        await eventually(reported, timeout=15, what="both agents' memory reported")
        for n in range(3):
            spec = planner_pb2.GoalSpec(
                name=f"weigh-{n}",
                steps=[
                    planner_pb2.StepSpec(
                        step_id="s",
                        capability="weigh",
                        input=struct_pb2.Value(number_value=1),
                        strategy=planner_pb2.ASSIGNMENT_STRATEGY_LEAST_LOADED,
                    )
                ],
            )
            events = [e async for e in client.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal=spec))]
            goal = (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=events[0].goal_id))).goal
            assert goal.state == planner_pb2.GOAL_STATE_SUCCEEDED, goal
            output = goal.steps[0].output.struct_value["agent"]
            assert output == "b-roomy", f"goal {n} ran on {output}"
    finally:
        await host.stop()
