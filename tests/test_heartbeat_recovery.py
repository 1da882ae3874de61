"""An AgentHost whose heartbeat stream breaks with INTERNAL registers again the agents that lapsed.

grpc.aio replaces a server's status with "INTERNAL: Internal error from Core"
when the stream ends while the client is still writing (grpc/grpc#36066), so
the registry's NOT_FOUND naming the lapsed agent can be lost on a busy host.
The real registry drains pending beats to avoid it, but cannot always; it
cannot be made to fail that way on demand either. So a stand-in registry
speaking the same contract ends the first stream with INTERNAL after one of
the host's agents has lapsed, and the host must find it by listing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from harness.wait import eventually
from mabeam.agent import Agent, AgentHost
from mabeam.v1 import registry_pb2, registry_pb2_grpc

pytestmark = pytest.mark.timeout(60)


class StandInRegistry(registry_pb2_grpc.RegistryServiceServicer):
    """Registers, lists and acknowledges beats; its first Heartbeat stream ends as grpc.aio's bug does."""

    def __init__(self, lapses: str) -> None:
        self.lapses = lapses
        self.registered: dict[str, registry_pb2.Agent] = {}
        self.registrations: Counter[str] = Counter()
        self.streams = 0

    async def RegisterAgent(self, request: registry_pb2.RegisterAgentRequest, context: Any) -> Any:
        self.registrations[request.agent_id] += 1
        agent = registry_pb2.Agent(agent_id=request.agent_id, endpoint=request.endpoint, lease_id=1)
        agent.lease_ttl.CopyFrom(request.lease_ttl)
        self.registered[request.agent_id] = agent
        return registry_pb2.RegisterAgentResponse(agent=agent, token=f"token-{request.agent_id}")

    async def ListAgents(self, request: registry_pb2.ListAgentsRequest, context: Any) -> Any:
        return registry_pb2.ListAgentsResponse(agents=list(self.registered.values()))

    async def DeregisterAgent(self, request: registry_pb2.DeregisterAgentRequest, context: Any) -> Any:
        self.registered.pop(request.agent_id, None)
        return registry_pb2.DeregisterAgentResponse()

    async def Heartbeat(
        self, request_iterator: AsyncIterator[registry_pb2.HeartbeatRequest], context: Any
    ) -> AsyncIterator[registry_pb2.HeartbeatResponse]:
        self.streams += 1
        if self.streams == 1:
            async for _ in request_iterator:
                if len(self.registered) == 3:  # the host beats while it registers: all three are
                    break
            # The agent's lease lapsed; the NOT_FOUND naming it reached the host as INTERNAL.
            self.registered.pop(self.lapses, None)
            await context.abort(grpc.StatusCode.INTERNAL, "Internal error from Core")
        async for beat in request_iterator:
            yield registry_pb2.HeartbeatResponse(agent_id=beat.agent_id, lease_id=1)


async def test_a_host_finds_and_registers_again_an_agent_lost_behind_an_internal_error() -> None:
    registry = StandInRegistry(lapses="b")
    server = aio.server()
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(registry, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    host = AgentHost([Agent("a"), Agent("b"), Agent("c")], registry=f"127.0.0.1:{port}", lease_ttl=1.0)
    await host.start()
    try:
        await eventually(lambda: registry.registrations["b"] == 2, timeout=10, what="b registered again")
        assert set(registry.registered) == {"a", "b", "c"}
        assert registry.registrations == {"a": 1, "b": 2, "c": 1}  # only the lapsed one
        # And beats flow again on a new stream.
        acked = host.heartbeat_stats.acked
        await eventually(lambda: host.heartbeat_stats.acked > acked + 3, timeout=10, what="beats acked again")
    finally:
        await host.stop()
        await server.stop(0)
