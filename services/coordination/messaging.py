"""mabeam.v1.MessagingService: messages to agents by id, by capability, or to a topic's subscribers.

Hosted by the coordination service's processes. Delivery goes through
``AgentService.Deliver``; recipients that share an endpoint (an AgentHost)
get one ``DeliverBatch`` call per chunk (at most :data:`BATCH_MAX` deliveries
and :data:`BATCH_MAX_BYTES`), as protocol messages are batched per host; an
endpoint that answers UNIMPLEMENTED to DeliverBatch gets one Deliver per agent
from then on. Subscriptions live in etcd on the agent's registration lease
(:class:`~mabeam.services.coordination.subscriptions.store.SubscriptionStore`).

=========================  =======================================================
limit                      value
=========================  =======================================================
message (serialized)       :data:`MAX_MESSAGE_BYTES` (64 KiB), INVALID_ARGUMENT
topic, ids                 1-128 characters of ``[A-Za-z0-9._:-]``
topics per agent           :data:`MAX_TOPICS_PER_AGENT`, RESOURCE_EXHAUSTED
subscribers per topic      :data:`MAX_SUBSCRIBERS_PER_TOPIC`, RESOURCE_EXHAUSTED
timeout                    default 5 s, at most 60 s
failures in an answer      :data:`MAX_FAILURES_LISTED` (the counts count them all)
=========================  =======================================================

The guarantee (at-least-once with dedupe by sender_id/message_id), the
ordering and the backpressure are stated in proto/mabeam/v1/messaging.proto
and docs/decisions.md ("Messages and topics").
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, NamedTuple

import grpc

from mabeam import auth, errors
from mabeam.client import ChannelPool, MeshClient, list_all
from mabeam.runtime import validate
from mabeam.server import MeshServer
from mabeam.services.coordination.engine import now_ts
from mabeam.services.coordination.participants import resolve
from mabeam.services.coordination.subscriptions.store import SubscriptionStore
from mabeam.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    common_pb2,
    messaging_pb2,
    messaging_pb2_grpc,
    registry_pb2,
)

SERVICE_NAME = "mabeam.v1.MessagingService"
MAX_MESSAGE_BYTES = 64 * 1024
MAX_TOPICS_PER_AGENT = 1000
MAX_SUBSCRIBERS_PER_TOPIC = 10_000
MAX_FAILURES_LISTED = 100
# One DeliverBatch: at most this many deliveries and bytes (gRPC's default receive limit is 4 MiB).
BATCH_MAX = 1000
BATCH_MAX_BYTES = 3 * 1024 * 1024
_OK = 0
_UNIMPLEMENTED = errors.status_code_number(grpc.StatusCode.UNIMPLEMENTED)
_EXHAUSTED = errors.status_code_number(grpc.StatusCode.RESOURCE_EXHAUSTED)
_NOT_FOUND = errors.status_code_number(grpc.StatusCode.NOT_FOUND)
_DEADLINE = errors.status_code_number(grpc.StatusCode.DEADLINE_EXCEEDED)


class Recipient(NamedTuple):
    agent_id: str
    endpoint: str


class Outcome(NamedTuple):
    """One recipient's answer: code 0 (in its inbox, maybe a duplicate) or why not."""

    agent_id: str
    code: int
    message: str
    duplicate: bool


def check_message(message: agent_pb2.AgentMessage, field: str = "message") -> None:
    """INVALID_ARGUMENT naming what is wrong with a message to send."""
    size = message.ByteSize()
    if size > MAX_MESSAGE_BYTES:
        raise errors.InvalidArgument(
            field, f"is {size} bytes serialized, over the limit of {MAX_MESSAGE_BYTES}"
        )
    validate.identifier(message.message_id, f"{field}.message_id")
    validate.identifier(message.sender_id, f"{field}.sender_id")
    if message.WhichOneof("payload") is None:
        raise errors.InvalidArgument(f"{field}.payload", "is required: set any or json")
    identity = auth.current()
    if identity is not None and identity.role == auth.AGENT:
        auth.require_agent(message.sender_id)  # an agent sends as itself only


class Deliveries:
    """Hands one message to many agents, batched per endpoint, each with its outcome."""

    def __init__(self, pool: ChannelPool) -> None:
        self._pool = pool
        self._no_batch: set[str] = set()

    def _stub(self, endpoint: str) -> agent_pb2_grpc.AgentServiceStub:
        return self._pool.stub(endpoint, agent_pb2_grpc.AgentServiceStub)

    async def send(
        self, recipients: Sequence[Recipient], message: agent_pb2.AgentMessage, timeout: float
    ) -> list[Outcome]:
        by_endpoint: dict[str, list[str]] = defaultdict(list)
        for r in recipients:
            by_endpoint[r.endpoint].append(r.agent_id)
        per = message.ByteSize() + 150  # an entry: the message, an agent id, framing
        chunk = max(1, min(BATCH_MAX, BATCH_MAX_BYTES // per))
        jobs = []
        for endpoint, ids in by_endpoint.items():
            for i in range(0, len(ids), chunk):
                jobs.append(self._to_host(endpoint, ids[i : i + chunk], message, timeout))
        results = await asyncio.gather(*jobs)
        return [o for group in results for o in group]

    async def _to_host(
        self, endpoint: str, ids: list[str], message: agent_pb2.AgentMessage, timeout: float
    ) -> list[Outcome]:
        if len(ids) > 1 and endpoint not in self._no_batch:
            request = agent_pb2.DeliverBatchRequest(
                deliveries=[agent_pb2.DeliverRequest(agent_id=a, message=message) for a in ids]
            )
            try:
                answer = await self._stub(endpoint).DeliverBatch(request, timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    return [_failed(a, exc) for a in ids]
                self._no_batch.add(endpoint)
            else:
                got = {e.agent_id: e for e in answer.entries}
                out = []
                for a in ids:
                    entry = got.get(a)
                    if entry is None:
                        out.append(Outcome(a, _NOT_FOUND, "the host's answer left the agent out", False))
                    elif entry.HasField("error") and entry.error.code:
                        out.append(Outcome(a, entry.error.code, entry.error.message, False))
                    else:
                        out.append(Outcome(a, _OK, "", entry.duplicate))
                return out
        return list(await asyncio.gather(*(self._one(endpoint, a, message, timeout) for a in ids)))

    async def _one(
        self, endpoint: str, agent_id: str, message: agent_pb2.AgentMessage, timeout: float
    ) -> Outcome:
        try:
            answer = await self._stub(endpoint).Deliver(
                agent_pb2.DeliverRequest(agent_id=agent_id, message=message), timeout=timeout
            )
        except grpc.RpcError as exc:
            return _failed(agent_id, exc)
        return Outcome(agent_id, _OK, "", answer.duplicate)


def _failed(agent_id: str, exc: grpc.RpcError) -> Outcome:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return Outcome(agent_id, errors.status_code_number(code), (details or code.name)[:500], False)


def _send_error(outcome: Outcome) -> errors.MabeamError:
    """What Send answers for a recipient that did not take the message."""
    who, said = outcome.agent_id, outcome.message
    if outcome.code == _UNIMPLEMENTED:
        return errors.FailedPrecondition(
            f"agent {who!r} takes no messages (its AgentService answered UNIMPLEMENTED to Deliver)",
            metadata={"agent_id": who},
        )
    if outcome.code == _EXHAUSTED:
        return errors.ResourceExhausted(
            f"agent {who!r}'s inbox is full; the message was not delivered ({said})",
            metadata={"agent_id": who},
        )
    if outcome.code == _NOT_FOUND:
        return errors.NotFound(
            f"agent {who!r} is not served at its registered endpoint ({said})",
            reason=common_pb2.ERROR_REASON_AGENT_NOT_FOUND,
        )
    if outcome.code == _DEADLINE:
        return errors.DeadlineExceeded(
            f"agent {who!r} did not take the message in time; send it again with the same message_id"
        )
    return errors.Unavailable(
        f"agent {who!r} could not be reached ({said}); send it again with the same message_id",
        reason=common_pb2.ERROR_REASON_SERVICE_UNAVAILABLE,
    )


class MessagingServicer(messaging_pb2_grpc.MessagingServiceServicer):
    """mabeam.v1.MessagingService."""

    def __init__(self, server: MeshServer, store: SubscriptionStore, pool: ChannelPool) -> None:
        self._server = server
        self.store = store
        self.deliveries = Deliveries(pool)
        self._mesh: MeshClient | None = None

    async def start(self) -> None:
        self._mesh = await self._server.connect_mesh()

    async def stop(self) -> None:
        if self._mesh is not None:
            await self._mesh.close()

    @property
    def registry(self) -> Any:
        assert self._mesh is not None
        return self._mesh.registry

    @staticmethod
    def _timeout(request: Any) -> float:
        return validate.seconds(request.timeout, "timeout", default=5.0, minimum=0.001, maximum=60)

    async def _pick(self, capability: str, message: agent_pb2.AgentMessage) -> Recipient:
        """The live agent offering ``capability`` that reports the least load (ties: at random) —
        or, for a message sent before (the same sender and message id, within PICK_MEMORY_S),
        the agent it went to then, while that one still offers it: a resend is deduplicated by
        the agent that may have it, never handled by a second one."""
        agents = await list_all(
            self.registry.ListAgents, registry_pb2.ListAgentsRequest(capability=capability), "agents"
        )
        if not agents:
            raise errors.FailedPrecondition(
                f"no live agent offers capability {capability!r}",
                reason=common_pb2.ERROR_REASON_NO_CAPABLE_AGENT,
            )
        best = min(agents, key=lambda a: (a.load.load, a.load.queue_length, random.random()))
        chosen = await self.store.pick_once(message.sender_id, message.message_id, best.agent_id)
        if chosen != best.agent_id:
            earlier = next((a for a in agents if a.agent_id == chosen), None)
            if earlier is not None:
                return Recipient(earlier.agent_id, earlier.endpoint)
            await self.store.repick(message.sender_id, message.message_id, best.agent_id)  # gone: anew
        return Recipient(best.agent_id, best.endpoint)

    async def Send(self, request: messaging_pb2.SendRequest, context: Any) -> messaging_pb2.SendResponse:
        if bool(request.agent_id) == bool(request.capability):
            raise errors.InvalidArgument("agent_id", "give exactly one of agent_id and capability")
        check_message(request.message)
        if request.message.topic:
            raise errors.InvalidArgument("message.topic", "must be empty in Send (Publish sets it)")
        timeout = self._timeout(request)
        if request.agent_id:
            validate.identifier(request.agent_id, "agent_id")
            try:
                found = await self.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=request.agent_id))
            except errors.NotFound:
                raise errors.NotFound(
                    f"agent {request.agent_id!r} is not registered",
                    reason=common_pb2.ERROR_REASON_AGENT_NOT_FOUND,
                ) from None
            recipient = Recipient(found.agent.agent_id, found.agent.endpoint)
        else:
            if len(request.capability) > 128:  # what the registry takes: any 1-128 characters
                raise errors.InvalidArgument(
                    "capability", f"must be 1-128 characters (got {len(request.capability)})"
                )
            recipient = await self._pick(request.capability, request.message)
        message = agent_pb2.AgentMessage()
        message.CopyFrom(request.message)
        message.sent_at.CopyFrom(now_ts())
        (outcome,) = await self.deliveries.send([recipient], message, timeout)
        if outcome.code != _OK:
            raise _send_error(outcome)
        return messaging_pb2.SendResponse(agent_id=recipient.agent_id, duplicate=outcome.duplicate)

    async def Publish(
        self, request: messaging_pb2.PublishRequest, context: Any
    ) -> messaging_pb2.PublishResponse:
        validate.identifier(request.topic, "topic")
        check_message(request.message)
        timeout = self._timeout(request)
        message = agent_pb2.AgentMessage()
        message.CopyFrom(request.message)
        message.topic = request.topic
        message.sent_at.CopyFrom(now_ts())
        ids = await self.store.subscribers(request.topic, MAX_SUBSCRIBERS_PER_TOPIC)
        reply = messaging_pb2.PublishResponse(subscribers=len(ids))
        if not ids:
            return reply
        found, missing = await resolve(self.registry, common_pb2.AgentSelector(agent_ids=ids))
        outcomes = [Outcome(m.agent_id, _NOT_FOUND, "not registered", False) for m in missing]
        outcomes += await self.deliveries.send(
            [Recipient(p.agent_id, p.endpoint) for p in found], message, timeout
        )
        for o in outcomes:
            if o.code == _OK:
                reply.delivered += 1
                reply.duplicates += int(o.duplicate)
                continue
            if o.code == _EXHAUSTED:
                reply.dropped += 1
            else:
                reply.failed += 1
            if len(reply.failures) < MAX_FAILURES_LISTED:
                reply.failures.add(agent_id=o.agent_id, code=o.code, message=o.message)
        return reply

    async def Subscribe(
        self, request: messaging_pb2.SubscribeRequest, context: Any
    ) -> messaging_pb2.SubscribeResponse:
        validate.identifier(request.agent_id, "agent_id")
        validate.identifier(request.topic, "topic")
        said = await self.store.subscribe(
            request.agent_id,
            request.topic,
            max_per_agent=MAX_TOPICS_PER_AGENT,
            max_per_topic=MAX_SUBSCRIBERS_PER_TOPIC,
        )
        if said == "not registered":
            raise errors.NotFound(
                f"agent {request.agent_id!r} is not registered (a subscription lives on its registration)",
                reason=common_pb2.ERROR_REASON_AGENT_NOT_FOUND,
            )
        if said == "no lease":
            raise errors.FailedPrecondition(
                f"agent {request.agent_id!r} is registered without a lease; a subscription needs one"
            )
        if said == "agent full":
            raise errors.ResourceExhausted(
                f"agent {request.agent_id!r} is subscribed to {MAX_TOPICS_PER_AGENT} topics, the limit",
                reason=common_pb2.ERROR_REASON_CONSTRAINT_VIOLATED,
            )
        if said == "topic full":
            raise errors.ResourceExhausted(
                f"topic {request.topic!r} has {MAX_SUBSCRIBERS_PER_TOPIC} subscribers, the limit",
                reason=common_pb2.ERROR_REASON_CONSTRAINT_VIOLATED,
            )
        return messaging_pb2.SubscribeResponse()

    async def Unsubscribe(
        self, request: messaging_pb2.UnsubscribeRequest, context: Any
    ) -> messaging_pb2.UnsubscribeResponse:
        validate.identifier(request.agent_id, "agent_id")
        validate.identifier(request.topic, "topic")
        removed = await self.store.unsubscribe(request.agent_id, request.topic)
        return messaging_pb2.UnsubscribeResponse(removed=removed)

    async def ListSubscriptions(
        self, request: messaging_pb2.ListSubscriptionsRequest, context: Any
    ) -> messaging_pb2.ListSubscriptionsResponse:
        size = validate.page_size(request.page_size)
        if request.topic:
            validate.identifier(request.topic, "topic")
        if request.agent_id:
            validate.identifier(request.agent_id, "agent_id")
        filters = [request.topic, request.agent_id]
        after = validate.decode_page_token(request.page_token, filters)
        pairs, following = await self.store.list_page(request.topic, request.agent_id, after, size)
        token = validate.encode_page_token(following, filters) if following is not None else ""
        return messaging_pb2.ListSubscriptionsResponse(
            subscriptions=[messaging_pb2.Subscription(topic=t, agent_id=a) for t, a in pairs],
            next_page_token=token,
        )


async def build(server: MeshServer, store: SubscriptionStore, pool: ChannelPool) -> MessagingServicer:
    """Add the messaging servicer to ``server`` (the coordination service's build calls it)."""
    servicer = MessagingServicer(server, store, pool)
    await servicer.start()
    server.on_stop(servicer.stop)
    server.add_service(SERVICE_NAME, messaging_pb2_grpc.add_MessagingServiceServicer_to_server, servicer)
    return servicer
