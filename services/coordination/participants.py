"""A session's participants, resolved through the registry: explicit ids or a capability selector."""

from __future__ import annotations

import asyncio
from typing import Any

from mabeam import errors
from mabeam.client import list_all
from mabeam.runtime import validate
from mabeam.services.coordination.engine import Participant
from mabeam.v1 import common_pb2, coordination_pb2, registry_pb2


async def resolve(
    registry: Any, selector: common_pb2.AgentSelector
) -> tuple[list[Participant], list[coordination_pb2.Exclusion]]:
    """The registered agents ``selector`` names, and an exclusion for each named one not registered.

    Explicit ids are looked up one by one (a few) or in the full list (many);
    a capability and labels select from the registry's list. ``registry`` is
    a RegistryService stub.
    """
    missing: list[coordination_pb2.Exclusion] = []
    if selector.agent_ids:
        wanted = list(dict.fromkeys(selector.agent_ids))
        for agent_id in wanted:
            validate.identifier(agent_id, "settings.participants.agent_ids")
        found: dict[str, registry_pb2.Agent] = {}
        if len(wanted) <= 16:
            replies = await asyncio.gather(
                *(registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=a)) for a in wanted),
                return_exceptions=True,
            )
            for agent_id, reply in zip(wanted, replies, strict=True):
                if isinstance(reply, registry_pb2.GetAgentResponse):
                    found[agent_id] = reply.agent
                elif not isinstance(reply, errors.NotFound):
                    raise (
                        reply if isinstance(reply, BaseException) else errors.Internal("bad registry reply")
                    )
        else:
            asked = set(wanted)  # up to 10,000 ids against every agent: a set, not the list
            for agent in await _list(registry, registry_pb2.ListAgentsRequest()):
                if agent.agent_id in asked:
                    found[agent.agent_id] = agent
        agents = [found[a] for a in wanted if a in found]
        missing = [
            coordination_pb2.Exclusion(
                agent_id=a,
                reason=coordination_pb2.EXCLUSION_REASON_NOT_REGISTERED,
                detail="not registered",
                round=0,
            )
            for a in wanted
            if a not in found
        ]
    else:
        agents = await _list(
            registry,
            registry_pb2.ListAgentsRequest(capability=selector.capability, labels=dict(selector.labels)),
        )
    if selector.max_agents:
        agents = agents[: selector.max_agents]
    return [Participant(a.agent_id, a.endpoint) for a in agents], missing


async def _list(registry: Any, request: registry_pb2.ListAgentsRequest) -> list[registry_pb2.Agent]:
    return await list_all(registry.ListAgents, request, "agents")
