"""Agents that tests start through Python entry points (``harness.sample_agents:...``)."""

from __future__ import annotations

from typing import Any

from mabeam.agent import Agent
from mabeam.v1 import agent_pb2


class Sample(Agent):
    capabilities = ("sample",)

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        return {"ran": request.step_id}


def make_sample() -> Agent:
    """Entry point: one agent, its id from MABEAM_AGENT_ID (set by the supervisor)."""
    return Sample()


class SecureBidder(Agent):
    """Bids its value in a sealed-bid auction ("secure": the TLS tests' capability)."""

    capabilities = ("secure",)

    def __init__(self, agent_id: str, value: float) -> None:
        super().__init__(agent_id)
        self.value = value

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        return agent_pb2.CoordinationResponse(bid=agent_pb2.Bid(amount=self.value))
