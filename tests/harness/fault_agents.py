"""Agents for the fault tests, served in their own process:

    python -m mabeam.run_agent harness.fault_agents:make_host bid:b1:b2 work:w1:w2

Each argument is a kind and the ids of the agents of that kind, all on one
AgentHost (registry from ``MABEAM_REGISTRY``, lease TTL from
``FAULT_LEASE_TTL``, default 3 s):

* ``bid``: bids its value (``bid_value(id)``) in sealed-bid auctions and
  proposes it as its cost in Contract Net; capability ``fault-bid``.
* ``work``: executes ``fault-work`` steps (``{"sleep": s, "n": k}``: waits s
  seconds, outputs ``{"n": k, "sum": k + the dependencies' sums}``), and
  appends ``<goal>/<step> <agent>`` to the file ``FAULT_STEP_LOG`` for every
  execution, so a test can count how many times each step really ran. In
  Contract Net it proposes a cost derived from the step and its own id, so
  steps spread over the workers and an auction repeated for the same step
  has the same winner.
"""

from __future__ import annotations

import asyncio
import os
import zlib
from typing import Any

from mabeam.agent import Agent, AgentHost, from_value
from mabeam.v1 import agent_pb2


def bid_value(agent_id: str) -> float:
    """The private value of bidder ``agent_id`` (distinct for distinct ids, in practice)."""
    return float(zlib.crc32(agent_id.encode()) % 100_000) / 100


def step_cost(agent_id: str, step_id: str) -> float:
    """What worker ``agent_id`` asks for ``step_id`` in Contract Net."""
    return float(zlib.crc32(f"{step_id}/{agent_id}".encode()) % 10_000) / 100


class FaultBidder(Agent):
    capabilities = ("fault-bid",)

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        reply = agent_pb2.CoordinationResponse(agent_id=self.agent_id)
        kind = request.WhichOneof("message")
        if kind == "bid_request":
            reply.bid.amount = bid_value(self.agent_id)
        elif kind == "task_announcement":
            reply.proposal.cost = bid_value(self.agent_id)
        else:
            reply.ack.SetInParent()
        return reply


class FaultWorker(Agent):
    capabilities = ("fault-work",)

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        reply = agent_pb2.CoordinationResponse(agent_id=self.agent_id)
        if request.HasField("task_announcement"):
            task = request.task_announcement.task_input
            step_id = task["step_id"] if "step_id" in task else ""
            reply.proposal.cost = step_cost(self.agent_id, step_id)
        else:
            reply.ack.SetInParent()
        return reply

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        data = from_value(request.input) if request.HasField("input") else {}
        data = data if isinstance(data, dict) else {}
        log_path = os.environ.get("FAULT_STEP_LOG")
        if log_path:
            # One short O_APPEND write per execution: lines of concurrent writers do not mix.
            fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{request.goal_id}/{request.step_id} {self.agent_id}\n".encode())
            finally:
                os.close(fd)
        await asyncio.sleep(float(data.get("sleep", 0)))
        total = float(data.get("n", 0))
        for output in request.dependency_outputs.values():
            dep = from_value(output)
            if isinstance(dep, dict):
                total += float(dep.get("sum", 0))
        return {"n": data.get("n", 0), "sum": total, "agent": self.agent_id}


KINDS: dict[str, type[Agent]] = {"bid": FaultBidder, "work": FaultWorker}


def make_host(*groups: str) -> AgentHost:
    """Entry point: ``kind:id:id...`` per argument, every agent on one host."""
    agents: list[Agent] = []
    for group in groups:
        kind, *ids = group.split(":")
        agents.extend(KINDS[kind](agent_id) for agent_id in ids)
    return AgentHost(agents, lease_ttl=float(os.environ.get("FAULT_LEASE_TTL", "3")))
