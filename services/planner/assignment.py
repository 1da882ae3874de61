"""Choosing the agent for a step: first fit, least loaded, or a Contract Net auction.

Candidates are the live agents offering the step's capability (the
registry's list, kept CANDIDATES_TTL_S), less those that already failed the
step; an auction is held through the coordination service and the lowest
cost wins.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import stamina
from google.protobuf import struct_pb2

from mabeam import errors
from mabeam.client import MeshClient, list_all
from mabeam.v1 import common_pb2, coordination_pb2, planner_pb2, registry_pb2

CANDIDATES_TTL_S = 1.0
# Auctions held for a step's assignment while coordination answers UNAVAILABLE.
AUCTION_TRIES = 5


def pressure(agent: registry_pb2.Agent) -> tuple[float, int, int, str]:
    """Least-loaded order, smallest first: the higher of the reported load and the memory in use
    against the memory the agent declared (``resources.memory_bytes``; the supervisor's measure
    ``measured`` when there is one, else what the agent reported), then queue length, then memory
    in use, then id."""
    memory = int(agent.measured.memory_bytes or agent.load.memory_bytes)
    declared = int(agent.resources.memory_bytes)
    used = memory / declared if declared else 0.0
    return (max(agent.load.load, used), agent.load.queue_length, memory, agent.agent_id)


@dataclass
class Assignment:
    agent_id: str
    endpoint: str
    price: float = 0.0
    session_id: str = ""


class Assigner:
    """Assigns the steps of one goal to agents."""

    def __init__(self, mesh: Callable[[], MeshClient], goal_id: str, default_strategy: int) -> None:
        self._mesh = mesh
        self.goal_id = goal_id
        self.default_strategy = default_strategy
        self._candidates: dict[str, tuple[float, list[registry_pb2.Agent]]] = {}

    @property
    def mesh(self) -> MeshClient:
        return self._mesh()

    async def candidates(self, capability: str) -> list[registry_pb2.Agent]:
        cached = self._candidates.get(capability)
        if cached is not None and time.monotonic() - cached[0] < CANDIDATES_TTL_S:
            return cached[1]
        listed = await list_all(  # every page: no silent cut at the first 1,000 capable agents
            self.mesh.registry.ListAgents, registry_pb2.ListAgentsRequest(capability=capability), "agents"
        )
        agents = [a for a in listed if a.status != registry_pb2.AGENT_STATUS_NOT_SERVING]
        self._candidates[capability] = (time.monotonic(), agents)
        return agents

    def forget(self, capability: str) -> None:
        """Drop the cached candidates of ``capability`` (an agent was just started for it)."""
        self._candidates.pop(capability, None)

    async def assign(
        self, spec: planner_pb2.StepSpec, excluded: set[str], in_flight: planner_pb2.StepAttempt | None = None
    ) -> Assignment | None:
        agents = await self.candidates(spec.capability)
        fresh = [a for a in agents if a.agent_id not in excluded]
        if not fresh and agents:
            self._candidates.pop(spec.capability, None)  # maybe new agents came: look again
            agents = await self.candidates(spec.capability)
            fresh = [a for a in agents if a.agent_id not in excluded] or agents  # nobody else: the same again
        if not fresh:
            return None
        if in_flight is not None:
            same = next((a for a in fresh if a.agent_id == in_flight.agent_id), None)
            if same is not None:
                return Assignment(same.agent_id, same.endpoint, in_flight.price, in_flight.session_id)
        strategy = spec.strategy or self.default_strategy or planner_pb2.ASSIGNMENT_STRATEGY_LEAST_LOADED
        if strategy == planner_pb2.ASSIGNMENT_STRATEGY_AUCTION:
            return await self._auction(spec, fresh)
        if strategy == planner_pb2.ASSIGNMENT_STRATEGY_FIRST_FIT:
            chosen = min(fresh, key=lambda a: a.agent_id)
        else:
            chosen = min(fresh, key=pressure)
        return Assignment(chosen.agent_id, chosen.endpoint)

    async def _auction(
        self, spec: planner_pb2.StepSpec, agents: list[registry_pb2.Agent]
    ) -> Assignment | None:
        """Contract Net through the coordination service: the lowest cost wins."""
        task_input = struct_pb2.Struct()
        task_input.update({"goal_id": self.goal_id, "step_id": spec.step_id})
        params = struct_pb2.Struct()
        params.update({"task": spec.capability})
        params["task_input"] = task_input
        run = coordination_pb2.RunRequest(
            settings=coordination_pb2.SessionSettings(
                participants=common_pb2.AgentSelector(agent_ids=[a.agent_id for a in agents])
            ),
            protocol="contract_net",
            parameters=params,
            # One id for every try: an auction that ran is answered from its record.
            request_id=str(uuid.uuid4()),
        )
        # A coordination replica that dies mid-auction answers UNAVAILABLE when the
        # client's one resend fails too: ask again with the same request_id, after
        # 0.1, 0.2, 0.4 ... s (an auction held and recorded is answered, not held again).
        async for attempt in stamina.retry_context(
            on=errors.Unavailable,
            attempts=AUCTION_TRIES,
            timeout=None,
            wait_initial=0.1,
            wait_max=0.1 * 2 ** (AUCTION_TRIES - 2),
            wait_jitter=0,
        ):
            with attempt:
                session = (await self.mesh.coordination.Run(run)).session
        if not session.outcome.winners:
            return None
        winner = session.outcome.winners[0]
        endpoint = next(a.endpoint for a in agents if a.agent_id == winner)
        return Assignment(winner, endpoint, session.outcome.price, session.session_id)
