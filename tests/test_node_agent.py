"""An agent in JavaScript, built on proto/ and @grpc/grpc-js, beside Python agents."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from harness.channels import agent_channel, mesh_channel
from harness.node_agent import start_node_agent
from harness.wait import eventually
from mabeam import auth, errors
from mabeam.agent import Agent, AgentHost, from_value
from mabeam.client import MeshClient
from mabeam.server import MeshServer
from mabeam.v1 import agent_pb2, agent_pb2_grpc, common_pb2, coordination_pb2, planner_pb2, registry_pb2

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)


class PyBidder(Agent):
    capabilities = ("bid", "compute")

    def __init__(self, agent_id: str, value: float) -> None:
        super().__init__(agent_id)
        self.value = value

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        return agent_pb2.CoordinationResponse(bid=agent_pb2.Bid(amount=self.value))

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        return {"sum": 0, "language": "python"}


@pytest.fixture
async def mesh(service: Callable[..., Awaitable[MeshServer]]) -> AsyncIterator[MeshClient]:
    registry = await service("registry")
    coordination = await service("coordination")
    planner = await service("planner")
    js = await start_node_agent("--id", "a-node", "--value", "99", registry=registry.address)
    host = AgentHost([PyBidder("py-1", 40), PyBidder("py-2", 70)], registry=registry.address)
    await host.start()
    client = await MeshClient.connect(
        registry=registry.address, coordination=coordination.address, planner=planner.address
    )
    try:
        assert js.stdout is not None
        line = await asyncio.wait_for(js.stdout.readline(), 20)
        assert b"serving on" in line, line

        async def registered() -> bool:
            try:
                agent = (
                    await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="a-node"))
                ).agent
            except errors.NotFound:
                return False
            return agent.labels["language"] == "javascript"

        await eventually(registered, what="the JavaScript agent registered")
        yield client
    finally:
        js.terminate()
        await js.wait()
        await host.stop()
        await client.close()


async def test_javascript_agent_wins_an_auction_against_python_agents(mesh: MeshClient) -> None:
    reply = await mesh.coordination.RunAuction(
        coordination_pb2.RunAuctionRequest(
            settings=coordination_pb2.SessionSettings(
                participants=common_pb2.AgentSelector(capability="bid")
            ),
            type=coordination_pb2.AUCTION_TYPE_SECOND_PRICE,
            item="slot",
        )
    )
    session = reply.session
    assert sorted(session.participants) == ["a-node", "py-1", "py-2"] and not session.excluded
    assert list(session.outcome.winners) == ["a-node"] and session.outcome.price == 70


async def test_javascript_agent_runs_a_goal_step(mesh: MeshClient) -> None:
    spec = planner_pb2.GoalSpec(
        steps=[planner_pb2.StepSpec(step_id="js", capability="compute", input=_numbers([1, 2, 3]))],
        strategy=planner_pb2.ASSIGNMENT_STRATEGY_FIRST_FIT,  # "a-node" sorts first
    )
    events = [e async for e in mesh.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal=spec))]
    assert events[-1].goal_state == planner_pb2.GOAL_STATE_SUCCEEDED
    goal = (await mesh.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=events[-1].goal_id))).goal
    output = from_value(goal.steps[0].output)
    assert goal.steps[0].agent_id == "a-node" and output == {
        "sum": 6,
        "agent": "a-node",
        "language": "javascript",
    }


async def test_javascript_agent_serves_only_the_mesh(mesh: MeshClient) -> None:
    """Without the mesh's service token (no credentials, the admin token, garbage): UNAUTHENTICATED."""
    endpoint = (await mesh.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="a-node"))).agent.endpoint
    channels = {
        "no credentials": aio.insecure_channel(endpoint),
        "the admin token": mesh_channel(endpoint),
        "an unknown token": aio.insecure_channel(
            endpoint, interceptors=auth.client_interceptors("mbt_0123456789ab_" + "x" * 43)
        ),
    }
    step = agent_pb2.ExecuteStepRequest(
        agent_id="a-node", step_id="x", capability="compute", input=_numbers([1])
    )
    for who, channel in channels.items():
        async with channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            for name, call in {
                "ExecuteStep": stub.ExecuteStep(step, timeout=5),
                "ExportState": stub.ExportState(agent_pb2.ExportStateRequest(agent_id="a-node"), timeout=5),
            }.items():
                with pytest.raises(aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, f"{name} with {who}"
    # As the mesh calls it (the service token), it answers.
    async with agent_channel(endpoint) as channel:
        reply = await agent_pb2_grpc.AgentServiceStub(channel).ExecuteStep(step, timeout=5)
    assert from_value(reply.output)["sum"] == 1


def test_the_readme_command_is_the_one_tested() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "node examples/node-agent/agent.js --id node-1 --value 99 --registry 127.0.0.1:50051" in readme


async def test_the_heartbeats_keep_its_lease(mesh: MeshClient) -> None:
    before = (await mesh.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="a-node"))).agent
    assert before.status == registry_pb2.AGENT_STATUS_SERVING
    await asyncio.sleep(6)  # time is what is tested: longer than its 5 s lease
    agent = (await mesh.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="a-node"))).agent
    # The same registration, kept by its heartbeats (not a late or a second one).
    assert agent.status == registry_pb2.AGENT_STATUS_SERVING and agent.lease_id == before.lease_id


def _numbers(values: list[float]) -> Any:
    from google.protobuf import struct_pb2

    v = struct_pb2.Value()
    v.list_value.extend(values)
    return v
