"""Write agents in a few lines: subclass :class:`Agent`, serve it, see it in the mesh.

Example::

    from mabeam.agent import Agent
    from mabeam.v1 import agent_pb2

    class Bidder(Agent):
        capabilities = ("bid",)

        async def coordinate(self, request):
            if request.HasField("bid_request"):
                return agent_pb2.CoordinationResponse(bid=agent_pb2.Bid(amount=10.0))
            return await super().coordinate(request)

        async def execute_step(self, request):
            return {"echo": request.input}

    asyncio.run(Bidder("bidder-1").serve(registry="127.0.0.1:50051"))

``serve()`` starts the agent's gRPC server (health and reflection included),
registers it, keeps its lease alive in the background and registers it again
by itself after a registry replica or etcd restart. An :class:`AgentHost`
serves many agents on one endpoint and one heartbeat stream, routing each call
by its ``agent_id``: a thousand light agents need one port.

Where the mesh is comes from the arguments or the environment:
``MABEAM_REGISTRY`` (host:port, comma-separated), ``MABEAM_ETCD`` (discovery),
``MABEAM_PREFIX``, ``MABEAM_AGENT_ID`` (the id a supervisor gives).

This module is what agent authors import; it holds :class:`Agent` and
re-exports the rest from private modules, one job each:
:mod:`mabeam._agent_host` (:class:`AgentHost`: serving, registration,
heartbeats), :mod:`mabeam._agent_service` (:class:`AgentServicer`: routing,
batches, idempotent steps, migration), :mod:`mabeam._heartbeat_stats`
(:class:`HeartbeatStats`, :func:`percentile`), :mod:`mabeam._eager`
(:func:`run_eagerly`) and :mod:`mabeam._values` (:func:`to_value`,
:func:`from_value`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from mabeam import errors
from mabeam._agent_host import AGENT_SERVICE, AgentHost
from mabeam._agent_service import MIGRATION_CONTENT_TYPE, AgentServicer
from mabeam._eager import run_eagerly
from mabeam._heartbeat_stats import HeartbeatStats, percentile
from mabeam._inbox import INBOX_SIZE, Inbox
from mabeam._values import from_value, to_value
from mabeam.client import MeshClient
from mabeam.v1 import agent_pb2, common_pb2, messaging_pb2

log = logging.getLogger("mabeam.agent")


class Agent:
    """Base class of Python agents.

    Override :meth:`coordinate` (protocol messages: bids, votes, demands, ...),
    :meth:`execute_step` (planner steps), :meth:`plan` (planning agents:
    an objective's steps, an expandable step's sub-steps) and, for migration,
    :meth:`export_state` / :meth:`import_state`. Class attributes
    ``capabilities`` and ``labels`` declare what the agent offers; the
    constructor may override them per instance.
    """

    capabilities: ClassVar[Sequence[str]] = ()
    labels: ClassVar[Mapping[str, str]] = {}
    # Messages the inbox holds before Deliver answers RESOURCE_EXHAUSTED (see mabeam._inbox).
    inbox_size: ClassVar[int] = INBOX_SIZE

    def __init__(
        self,
        agent_id: str | None = None,
        *,
        capabilities: Sequence[str] | None = None,
        labels: Mapping[str, str] | None = None,
        resources: common_pb2.Resources | None = None,
    ) -> None:
        agent_id = agent_id or os.environ.get("MABEAM_AGENT_ID")
        if not agent_id:
            raise ValueError("an agent needs an id (argument, or MABEAM_AGENT_ID)")
        self.agent_id = agent_id
        self.agent_capabilities: tuple[str, ...] = tuple(
            capabilities if capabilities is not None else type(self).capabilities
        )
        self.agent_labels: dict[str, str] = dict(labels if labels is not None else type(self).labels)
        self.resources = resources or common_pb2.Resources()
        self.in_flight = 0
        # A supervised process registers with the token its supervisor chose.
        self.token = (
            os.environ.get("MABEAM_AGENT_TOKEN", "") if os.environ.get("MABEAM_AGENT_ID") == agent_id else ""
        )
        self.host: AgentHost | None = None
        self._inbox: Inbox | None = None
        # Topics subscribed through subscribe(), with the client used: made again by the host when
        # it registers the agent anew (the subscriptions lived on the lease that lapsed).
        self.topics: dict[str, Any] = {}

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        """Answer one protocol message. The default declines every request."""
        return agent_pb2.CoordinationResponse(
            agent_id=self.agent_id,
            decline=agent_pb2.Decline(reason=f"{type(self).__name__} does not coordinate"),
        )

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        """Run one goal step and return its output (anything JSON-able)."""
        raise errors.Unimplemented(f"agent {self.agent_id!r} does not execute steps")

    async def plan(self, request: agent_pb2.PlanRequest) -> Any:
        """Plan an objective (``request.step_id`` empty) or expand a step into sub-steps.

        Return the steps: a list of dicts with ``step_id``, ``capability`` and
        optionally ``input`` (JSON-able), ``depends_on`` (ids in the same
        plan), ``expandable``, ``timeout`` (seconds) and ``max_attempts``; or
        ``agent_pb2.PlannedStep`` messages; or an ``agent_pb2.PlanResponse``.
        At most ``request.max_steps`` of them. The default does not plan
        (``UNIMPLEMENTED``, as an agent without the Plan handler answers).
        """
        raise errors.Unimplemented(f"agent {self.agent_id!r} does not plan")

    async def export_state(self) -> bytes:
        """The agent's state, for migration (default: no state)."""
        return b""

    async def import_state(self, state: bytes) -> None:
        """Replace the agent's state with an exported one (default: nothing to do)."""

    # -- messages and topics (MessagingService) ---------------------------------------

    async def on_message(self, message: agent_pb2.AgentMessage) -> None:
        """Handle one message sent to this agent or published to a topic it subscribes to.

        Messages are handed over one at a time, in the order the inbox took
        them (``message.topic`` is empty for a direct Send). The payload is
        ``message.json`` (a Struct) or ``message.any`` (a typed message).
        An agent that does not override this takes no messages: Deliver
        answers UNIMPLEMENTED.
        """
        raise errors.Unimplemented(f"agent {self.agent_id!r} takes no messages")

    @property
    def takes_messages(self) -> bool:
        """True when this agent's class overrides :meth:`on_message`."""
        return type(self).on_message is not Agent.on_message

    @property
    def inbox(self) -> Inbox:
        """The agent's bounded inbox (created at its first message)."""
        if self._inbox is None:
            self._inbox = Inbox(self, type(self).inbox_size)
        return self._inbox

    def _messaging(self, mesh: MeshClient | None) -> Any:
        client = mesh or (self.host.client if self.host is not None else None)
        messaging = getattr(client, "messaging", None)
        if messaging is None:
            raise ValueError(
                "no MessagingService to subscribe with: serve the agent with etcd= (discovery) "
                "or pass mesh=MeshClient.connect(coordination=...)"
            )
        return messaging

    async def subscribe(self, topic: str, *, mesh: MeshClient | None = None) -> None:
        """Subscribe this agent to ``topic`` (through ``mesh``, else its host's client).

        The subscription lives on the agent's registration lease: it goes when
        the registration goes. The topic is remembered, and the host subscribes
        again (with the same client) when it registers the agent anew after its
        lease lapsed (:meth:`resubscribe`).
        """
        messaging = self._messaging(mesh)
        await messaging.Subscribe(messaging_pb2.SubscribeRequest(agent_id=self.agent_id, topic=topic))
        self.topics[topic] = messaging

    async def resubscribe(self) -> None:
        """Subscribe again to every topic :meth:`subscribe` remembers (a failure is logged, not raised)."""
        for topic, messaging in list(self.topics.items()):
            try:
                await messaging.Subscribe(messaging_pb2.SubscribeRequest(agent_id=self.agent_id, topic=topic))
            except errors.MabeamError as exc:
                log.warning("agent %s: subscribing again to %r failed: %s", self.agent_id, topic, exc)

    async def unsubscribe(self, topic: str, *, mesh: MeshClient | None = None) -> bool:
        """Take this agent off ``topic``; False when it was not subscribed."""
        reply = await self._messaging(mesh).Unsubscribe(
            messaging_pb2.UnsubscribeRequest(agent_id=self.agent_id, topic=topic)
        )
        self.topics.pop(topic, None)
        return bool(reply.removed)

    def inbox_waiting(self) -> int:
        """Messages the inbox took that ``on_message`` has not started on yet."""
        return len(self._inbox) if self._inbox is not None else 0

    def load(self) -> common_pb2.AgentLoad:
        """What the next heartbeat reports; by default the calls in flight and the messages waiting
        in the inbox (a capability Send picks the least loaded). Leave ``memory_bytes`` and
        ``cpu_fraction`` at 0 and the AgentHost fills in its process's RSS and CPU, flagged
        ``shared_process`` when it serves several agents (:mod:`mabeam._usage`)."""
        waiting = self.in_flight + self.inbox_waiting()
        return common_pb2.AgentLoad(load=min(1.0, waiting / 16.0), queue_length=waiting)

    async def serve(
        self,
        registry: str | Sequence[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        etcd: Sequence[str] | None = None,
        lease_ttl: float = 5.0,
    ) -> None:
        """Serve this agent until SIGINT/SIGTERM (an AgentHost of one).

        ``host`` and ``port`` are where it listens (the AgentHost's ``bind_host``
        and ``port``; not :attr:`host`, the AgentHost serving the agent).
        ``MABEAM_ADVERTISE_HOST`` names the address others reach it at when it
        binds ``0.0.0.0`` (in a container: its service name).
        """
        await AgentHost(
            [self], registry=registry, bind_host=host, port=port, etcd=etcd, lease_ttl=lease_ttl
        ).serve()


__all__ = [
    "AGENT_SERVICE",
    "MIGRATION_CONTENT_TYPE",
    "Agent",
    "AgentHost",
    "AgentServicer",
    "HeartbeatStats",
    "from_value",
    "percentile",
    "run_eagerly",
    "to_value",
]
