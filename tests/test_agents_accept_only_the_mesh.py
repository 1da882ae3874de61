"""Agents serve AgentService only to the mesh's own services (docs/decisions.md, "Agents accept only the mesh").

A caller without the mesh's service token, an admin included, is refused
before the handler runs: no step executes, no state is exported (the agent's
calls are not held for a migration). The mesh's own calls (an auction, a
goal, a migration) go through.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.channels import agent_channel, mesh_channel
from harness.wait import eventually
from mabeam import auth
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient
from mabeam.server import MeshServer
from mabeam.v1 import agent_pb2, agent_pb2_grpc, common_pb2, coordination_pb2, planner_pb2, registry_pb2

pytestmark = pytest.mark.timeout(60)

GARBAGE = "mbt_0123456789ab_" + "x" * 43


class Counter(Agent):
    capabilities = ("count", "bid")

    def __init__(self, agent_id: str) -> None:
        super().__init__(agent_id)
        self.counter = 0
        self.exports = 0

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        if request.HasField("bid_request"):
            return agent_pb2.CoordinationResponse(bid=agent_pb2.Bid(amount=10.0 + self.counter))
        return await super().coordinate(request)

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        self.counter += 1
        return {"count": self.counter}

    async def export_state(self) -> bytes:
        self.exports += 1
        return json.dumps({"counter": self.counter}).encode()

    async def import_state(self, state: bytes) -> None:
        self.counter = json.loads(state)["counter"]


@dataclass
class Mesh:
    client: MeshClient
    host: AgentHost
    agent: Counter
    registry: MeshServer


@pytest.fixture
async def mesh(service: Callable[..., Awaitable[MeshServer]]) -> AsyncIterator[Mesh]:
    registry = await service("registry")
    coordination = await service("coordination")
    planner = await service("planner")
    agent = Counter("guarded")
    host = AgentHost([agent], registry=registry.address)
    await host.start()
    client = await MeshClient.connect(
        registry=registry.address, coordination=coordination.address, planner=planner.address
    )
    try:
        yield Mesh(client, host, agent, registry)
    finally:
        await host.stop()
        await client.close()


def _channels(address: str) -> dict[str, aio.Channel]:
    return {
        "no credentials": aio.insecure_channel(address),
        "the admin token": mesh_channel(address),
        "an unknown token": aio.insecure_channel(address, interceptors=auth.client_interceptors(GARBAGE)),
    }


async def _refused(call: Awaitable[Any]) -> grpc.StatusCode:
    with pytest.raises(aio.AioRpcError) as info:
        await call
    return info.value.code()


async def test_the_agent_learned_the_service_digests_at_registration(mesh: Mesh) -> None:
    assert mesh.host.verifier.enabled


async def test_direct_calls_without_the_service_token_are_refused_and_change_nothing(mesh: Mesh) -> None:
    for who, channel in _channels(mesh.host.address).items():
        async with channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            calls = {
                "ExecuteStep": stub.ExecuteStep(
                    agent_pb2.ExecuteStepRequest(agent_id="guarded", step_id="x", capability="count"),
                    timeout=5,
                ),
                "ExportState": stub.ExportState(agent_pb2.ExportStateRequest(agent_id="guarded"), timeout=5),
                "ImportState": stub.ImportState(
                    agent_pb2.ImportStateRequest(
                        agent_id="guarded", state=json.dumps({"counter": 1000}).encode()
                    ),
                    timeout=5,
                ),
                "Coordinate": stub.Coordinate(
                    agent_pb2.CoordinationRequest(agent_id="guarded", bid_request=agent_pb2.BidRequest()),
                    timeout=5,
                ),
                "CoordinateBatch": stub.CoordinateBatch(agent_pb2.CoordinateBatchRequest(), timeout=5),
                "AgentMoved": stub.AgentMoved(
                    agent_pb2.AgentMovedRequest(agent_id="guarded", new_endpoint="127.0.0.1:9"), timeout=5
                ),
            }
            for name, call in calls.items():
                assert await _refused(call) == grpc.StatusCode.UNAUTHENTICATED, f"{name} with {who}"
            # Health stays open to anyone (probes).
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    # Nothing ran: no step, no export (calls are not held), no import, still hosted here.
    assert mesh.agent.counter == 0 and mesh.agent.exports == 0
    assert not mesh.host.servicer.migrations and "guarded" in mesh.host.agents
    # The same call as the mesh makes it, with the service token, is served.
    async with agent_channel(mesh.host.address) as channel:
        reply = await agent_pb2_grpc.AgentServiceStub(channel).ExecuteStep(
            agent_pb2.ExecuteStepRequest(agent_id="guarded", step_id="y", capability="count"), timeout=5
        )
    assert reply.output.struct_value["count"] == 1 and mesh.agent.counter == 1


async def test_an_auction_through_the_coordination_service_reaches_the_agent(mesh: Mesh) -> None:
    reply = await mesh.client.coordination.RunAuction(
        coordination_pb2.RunAuctionRequest(
            settings=coordination_pb2.SessionSettings(
                participants=common_pb2.AgentSelector(capability="bid")
            ),
            type=coordination_pb2.AUCTION_TYPE_FIRST_PRICE,
            item="slot",
        )
    )
    session = reply.session
    assert list(session.participants) == ["guarded"] and not session.excluded
    assert list(session.outcome.winners) == ["guarded"]


async def test_a_goal_through_the_planner_runs_its_step_on_the_agent(mesh: Mesh) -> None:
    spec = planner_pb2.GoalSpec(steps=[planner_pb2.StepSpec(step_id="s", capability="count")])
    events = [e async for e in mesh.client.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal=spec))]
    assert events[-1].goal_state == planner_pb2.GOAL_STATE_SUCCEEDED
    assert mesh.agent.counter == 1


async def test_a_migration_by_the_registry_moves_the_state(mesh: Mesh) -> None:
    mesh.agent.counter = 7
    target = Counter("guarded")
    new_host = AgentHost([], registry=mesh.registry.address)
    new_host.add(target, register=False)
    await new_host.start()
    try:
        reply = await mesh.client.registry.MigrateAgent(
            registry_pb2.MigrateAgentRequest(
                agent_id="guarded", token=mesh.agent.token, target_endpoint=new_host.address
            )
        )
        assert reply.agent.endpoint == new_host.address
        assert target.counter == 7 and mesh.agent.exports == 1
        # A call as the mesh makes it to the old endpoint is forwarded, with its
        # credentials, to the new instance, which checks them as the old one did.
        async with agent_channel(mesh.host.address) as channel:
            step = await agent_pb2_grpc.AgentServiceStub(channel).ExecuteStep(
                agent_pb2.ExecuteStepRequest(agent_id="guarded", step_id="after", capability="count"),
                timeout=5,
            )
        assert step.output.struct_value["count"] == 8 and target.counter == 8
        # The new instance learns the digests from its first heartbeat answer;
        # then the admin may not call the moved agent directly either.
        await eventually(lambda: new_host.verifier.enabled, what="the new instance knows the digests")
        async with mesh_channel(new_host.address) as channel:
            code = await _refused(
                agent_pb2_grpc.AgentServiceStub(channel).ExecuteStep(
                    agent_pb2.ExecuteStepRequest(agent_id="guarded", step_id="admin", capability="count"),
                    timeout=5,
                )
            )
        assert code == grpc.StatusCode.UNAUTHENTICATED and target.counter == 8
    finally:
        await new_host.stop()


def test_without_digests_nothing_is_checked() -> None:
    """A registry without auth hands no digests: the agent's authorizer lets every call through."""

    class Context:
        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return ()

    verifier = auth.ServiceVerifier()
    authorizer = auth.Authorizer(verifier)
    rule = authorizer.rule("/mabeam.v1.AgentService/ExecuteStep")
    assert rule is not None and not verifier.enabled
    assert authorizer.check("/mabeam.v1.AgentService/ExecuteStep", rule, None, Context()) is None
    # An empty update (a registry answering without digests) never switches the checks off.
    token, _ = auth.new_token()
    verifier.update([auth.digest(token)])
    verifier.update([])
    assert verifier.enabled and verifier.by_token(token) is not None and verifier.by_token(GARBAGE) is None
    assert auth.Verifier().enabled
