"""The coordination engine: fan-out to agents with deadlines, batching, exclusions, transcripts.

:class:`FanOut` sends one round's protocol messages concurrently over reused
channels. Participants that share an endpoint (an AgentHost) get one
``CoordinateBatch`` call carrying all their requests; an endpoint that answers
UNIMPLEMENTED gets one ``Coordinate`` per agent from then on. Each agent
keeps its own deadline and its own exclusion: a slow, dead or nonsensical
agent is left out of the round and named with the reason, and never stalls it.

:class:`Session` records every round (each request, each response or
exclusion, latencies) and writes the session to etcd (:mod:`.store`).

A session never outlives its deadline: the rounds (and the lookups and writes
made while they run) have until the deadline less a reserve
(:func:`finish_reserve`) kept for writing the outcome, and that last write has
until the deadline (at least :data:`FINISH_MIN_S`). A session whose outcome
cannot be stored in time answers DEADLINE_EXCEEDED (:meth:`Session.finish`).

A session whose record is written before its end (:meth:`Session.claim`:
iterative ones, and any with an explicit id) is marked in flight on this
replica (an owner key on the replica's lease, a running key) and unmarked
after its outcome is written, so that another replica ends it if this one
dies (:mod:`.orphans`). If this replica's lease is lost meanwhile, its next
round or its outcome answers ABORTED and writes nothing (another replica
ends it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
from google.protobuf import struct_pb2, timestamp_pb2

from mabeam import errors, telemetry
from mabeam.client import ChannelPool
from mabeam.services.coordination.store import SessionStore
from mabeam.v1 import agent_pb2, agent_pb2_grpc, coordination_pb2

if TYPE_CHECKING:
    from mabeam.runtime.etcd import LeaseKeeper

log = logging.getLogger("mabeam.coordination.engine")
BATCH_GRACE_S = 0.5
# Kept at the end of a session's deadline for writing its outcome (at most; a
# fifth of a short deadline), and the least time that write gets.
FINISH_RESERVE_S = 0.5
FINISH_MIN_S = 0.1


def finish_reserve(deadline_s: float) -> float:
    """The part of a session's deadline kept for writing its outcome."""
    return min(FINISH_RESERVE_S, deadline_s / 5)


class Participant(NamedTuple):
    """An agent taking part, and where it is served (a tuple: built once per agent per round)."""

    agent_id: str
    endpoint: str


@dataclass(slots=True)
class Reply:
    """One agent's answer in a round, or why there is none."""

    agent_id: str
    request: agent_pb2.CoordinationRequest
    response: agent_pb2.CoordinationResponse | None
    exclusion: coordination_pb2.Exclusion | None
    latency_s: float
    order: int


# What answer each request expects.
EXPECTED_ANSWER = {
    "bid_request": "bid",
    "price_quote": "price_answer",
    "demand_request": "demand",
    "order_request": "orders",
    "vote_request": "vote",
    "task_announcement": "proposal",
    "award": "ack",
    "reject": "ack",
    "custom": "custom",
}

_CODE_REASONS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: coordination_pb2.EXCLUSION_REASON_TIMEOUT,
    grpc.StatusCode.UNAVAILABLE: coordination_pb2.EXCLUSION_REASON_UNAVAILABLE,
    grpc.StatusCode.NOT_FOUND: coordination_pb2.EXCLUSION_REASON_NOT_REGISTERED,
}


def _exclusion(agent_id: str, reason: int, detail: str, round_number: int) -> coordination_pb2.Exclusion:
    return coordination_pb2.Exclusion(
        agent_id=agent_id, reason=reason, detail=detail[:500], round=round_number
    )  # type: ignore[arg-type]


class FanOut:
    """Sends a round's requests, batched per endpoint, each agent with its own deadline."""

    def __init__(self, pool: ChannelPool) -> None:
        self._pool = pool
        self._no_batch: set[str] = set()

    async def send(
        self,
        round_number: int,
        requests: Sequence[tuple[Participant, agent_pb2.CoordinationRequest]],
        timeout: float,
        check: Callable[[agent_pb2.CoordinationRequest, agent_pb2.CoordinationResponse], str | None]
        | None = None,
        limit: float | None = None,
    ) -> list[Reply]:
        """Every participant's reply (or exclusion), in arrival order.

        ``timeout`` is each agent's deadline; ``limit`` caps every call's,
        the batches' grace included (the session's time left).
        """
        batch_timeout = timeout + BATCH_GRACE_S if limit is None else min(timeout + BATCH_GRACE_S, limit)
        arrival = itertools.count()
        by_endpoint: dict[str, list[tuple[Participant, agent_pb2.CoordinationRequest]]] = defaultdict(list)
        for participant, request in requests:
            by_endpoint[participant.endpoint].append((participant, request))
        replies: list[Reply] = []

        def judge(
            request: agent_pb2.CoordinationRequest, response: agent_pb2.CoordinationResponse, latency: float
        ) -> Reply:
            agent_id = request.agent_id
            answer = response.WhichOneof("answer")
            if answer == "decline":
                why = _exclusion(
                    agent_id,
                    coordination_pb2.EXCLUSION_REASON_DECLINED,
                    response.decline.reason,
                    round_number,
                )
                return Reply(agent_id, request, response, why, latency, next(arrival))
            expected = EXPECTED_ANSWER.get(request.WhichOneof("message") or "", "")
            problem = None
            if response.agent_id and response.agent_id != agent_id:
                problem = f"answered as {response.agent_id!r}"
            elif answer != expected:
                problem = f"answered {answer or 'nothing'} to a {request.WhichOneof('message')} (expected {expected})"
            elif check is not None:
                problem = check(request, response)
            if problem:
                why = _exclusion(agent_id, coordination_pb2.EXCLUSION_REASON_MALFORMED, problem, round_number)
                return Reply(agent_id, request, response, why, latency, next(arrival))
            return Reply(agent_id, request, response, None, latency, next(arrival))

        def failed(
            request: agent_pb2.CoordinationRequest, code: grpc.StatusCode, detail: str, latency: float
        ) -> Reply:
            reason = _CODE_REASONS.get(code, coordination_pb2.EXCLUSION_REASON_ERROR)
            why = _exclusion(request.agent_id, reason, f"{code.name}: {detail}", round_number)
            return Reply(request.agent_id, request, None, why, latency, next(arrival))

        async def one(endpoint: str, request: agent_pb2.CoordinationRequest) -> None:
            stub = self._pool.stub(endpoint, agent_pb2_grpc.AgentServiceStub)
            started = time.perf_counter()
            try:
                response = await stub.Coordinate(request, timeout=timeout)
            except grpc.RpcError as exc:
                replies.append(
                    failed(request, exc.code(), exc.details() or "", time.perf_counter() - started)
                )
                return
            replies.append(judge(request, response, time.perf_counter() - started))

        async def batch(
            endpoint: str, group: list[tuple[Participant, agent_pb2.CoordinationRequest]]
        ) -> None:
            stub = self._pool.stub(endpoint, agent_pb2_grpc.AgentServiceStub)
            started = time.perf_counter()
            message = agent_pb2.CoordinateBatchRequest(requests=[r for _, r in group])
            try:
                answer = await stub.CoordinateBatch(message, timeout=batch_timeout)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self._no_batch.add(endpoint)
                    await asyncio.gather(*(one(endpoint, r) for _, r in group))
                    return
                latency = time.perf_counter() - started
                for _, request in group:
                    replies.append(failed(request, exc.code(), exc.details() or "", latency))
                return
            latency = time.perf_counter() - started
            entries = {e.agent_id: e for e in answer.entries}
            for _, request in group:
                entry = entries.get(request.agent_id)
                if entry is None:
                    replies.append(
                        failed(request, grpc.StatusCode.INTERNAL, "missing from the batch answer", latency)
                    )
                elif entry.WhichOneof("result") == "error":
                    code = next(
                        (c for c in grpc.StatusCode if c.value[0] == entry.error.code),
                        grpc.StatusCode.UNKNOWN,
                    )
                    replies.append(failed(request, code, entry.error.message, latency))
                else:
                    replies.append(judge(request, entry.response, latency))

        tasks = []
        for endpoint, group in by_endpoint.items():
            if len(group) > 1 and endpoint not in self._no_batch:
                tasks.append(batch(endpoint, group))
            else:
                tasks.extend(one(endpoint, r) for _, r in group)
        await asyncio.gather(*tasks)
        replies.sort(key=lambda r: r.order)
        return replies


def now_ts() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    """A JSON-like dict as a Struct (Struct.update: much faster than json_format on big payloads)."""
    out = struct_pb2.Struct()
    out.update(data)
    return out


class Session:
    """One running session: its rounds, exclusions and the write to etcd."""

    def __init__(
        self,
        store: SessionStore,
        fanout: FanOut,
        protocol: str,
        parameters: dict[str, object],
        participants: Sequence[Participant],
        *,
        session_id: str,
        deadline_s: float,
        round_timeout_s: float,
        coordinator_id: str,
        stream_rounds: bool,
        notify: bool = False,
        started: float | None = None,
    ) -> None:
        self.store = store
        self.fanout = fanout
        self.participants = list(participants)
        self.endpoint_of = {p.agent_id: p.endpoint for p in participants}
        # ``started``: time.monotonic() when the call began (lookups count against the deadline).
        self.deadline_s = deadline_s
        self.started = time.monotonic() if started is None else started
        self.deadline = self.started + deadline_s
        self.reserve = finish_reserve(deadline_s)
        self.round_timeout_s = round_timeout_s
        self.stream_rounds = stream_rounds
        self.notify = notify
        self.proto = coordination_pb2.Session(
            session_id=session_id or uuid.uuid4().hex[:16],
            protocol=protocol,
            state=coordination_pb2.SESSION_STATE_RUNNING,
            parameters=struct(parameters),
            participants=[p.agent_id for p in participants],
            started_at=now_ts(),
            coordinator_id=coordinator_id,
        )
        self._excluded: set[str] = set()
        # Kept beside the proto, not in it, until the end: the summary written
        # to etcd has no rounds, and a transcript of 1,000 entries is costly to copy.
        self.rounds: list[coordination_pb2.Round] = []
        self._unsaved_rounds: list[coordination_pb2.Round] = []
        # The round being sent: its number and the agents asked (named if the deadline cuts it).
        self._in_flight: tuple[int, list[str]] | None = None
        # The lease of this replica the session's owner key is on (None: not marked in flight).
        self._keeper: LeaseKeeper | None = None

    async def claim(self, keeper: LeaseKeeper | None = None) -> bool:
        """Write the session's record before its rounds; False when its id exists already.

        With ``keeper`` the session is also marked in flight on this replica
        (its owner key on ``keeper``'s lease, its running key: :mod:`.orphans`),
        in the same transaction.
        """
        if keeper is None:
            return await self.store.create(self.proto)
        claimed = await self.store.create(
            self.proto, owner=self.proto.coordinator_id, owner_lease=keeper.lease_id
        )
        if claimed:
            self._keeper = keeper
        return claimed

    def check_owned(self) -> None:
        """ABORTED when this replica lost the lease the session's owner key was on."""
        if self._keeper is not None and self._keeper.lost.is_set():
            raise errors.Aborted(
                f"session {self.session_id}: coordination replica {self.proto.coordinator_id} lost its "
                "etcd lease while the session ran; another replica ends it (ABANDONED), "
                "see GetSession",
                metadata={"session_id": self.session_id},
            )

    @property
    def session_id(self) -> str:
        return self.proto.session_id

    def remaining(self) -> float:
        """Seconds left for the rounds: the deadline less the reserve for writing the outcome."""
        return self.deadline - self.reserve - time.monotonic()

    def hard_limit(self) -> float:
        """Seconds until the rounds are cut off: :meth:`remaining` and half the reserve, for
        answers sent at the agents' deadline to arrive."""
        return self.remaining() + self.reserve / 2

    def cut_off(self) -> None:
        """The deadline cut the round in flight: name every agent asked that has not answered."""
        if self._in_flight is None:
            return
        number, asked = self._in_flight
        self._in_flight = None
        for agent_id in asked:
            self.exclude(
                _exclusion(
                    agent_id,
                    coordination_pb2.EXCLUSION_REASON_TIMEOUT,
                    f"no answer before the session's deadline ({self.deadline_s:g} s)",
                    number,
                )
            )

    @property
    def excluded_ids(self) -> set[str]:
        """Agents left out so far (they are not asked again)."""
        return self._excluded

    def exclude(self, exclusion: coordination_pb2.Exclusion) -> None:
        """Name an agent as left out (its first exclusion is the one kept)."""
        if exclusion.agent_id not in self._excluded:
            self._excluded.add(exclusion.agent_id)
            self.proto.excluded.append(exclusion)

    async def round(
        self,
        requests: Sequence[tuple[str, agent_pb2.CoordinationRequest]],
        announced: dict[str, object] | None = None,
        check: Callable[[agent_pb2.CoordinationRequest, agent_pb2.CoordinationResponse], str | None]
        | None = None,
    ) -> list[Reply]:
        """Run one round: send, collect, record. Replies with an exclusion are named in the session.

        Each request is copied into the round's transcript and sent from
        there, so one request object may serve every agent (a sealed-bid
        round asks them all the same); the engine sets the agent, session,
        round and deadline of each copy.
        """
        self.check_owned()
        number = self.proto.round_count + 1
        self.proto.round_count = number
        timeout = max(min(self.round_timeout_s, self.remaining()), 0.001)
        at = int((time.time() + timeout) * 1e9)
        # What every request of the round shares, merged in by one call per request.
        common = agent_pb2.CoordinationRequest(
            session_id=self.session_id, protocol=self.proto.protocol, round=number
        )
        common.deadline.seconds, common.deadline.nanos = divmod(at, 1_000_000_000)
        record = coordination_pb2.Round(number=number, started_at=now_ts())
        if announced:
            record.state.CopyFrom(struct(announced))
        entries = record.entries
        entry_of: dict[str, coordination_pb2.TranscriptEntry] = {}
        endpoint_of = self.endpoint_of
        prepared = []
        for agent_id, request in requests:
            entry = entries.add(agent_id=agent_id, request=request)
            entry_of[agent_id] = entry
            sent = entry.request
            sent.MergeFrom(common)
            sent.agent_id = agent_id
            prepared.append((Participant(agent_id, endpoint_of[agent_id]), sent))
        self._in_flight = (number, [p.agent_id for p, _ in prepared])
        replies = await self.fanout.send(
            number, prepared, timeout, check, limit=max(self.hard_limit(), 0.001)
        )
        self._in_flight = None
        declined = coordination_pb2.EXCLUSION_REASON_DECLINED
        for reply in replies:
            entry = entry_of[reply.agent_id]
            if reply.response is not None:
                entry.response.CopyFrom(reply.response)
            if reply.exclusion is not None:
                entry.exclusion.CopyFrom(reply.exclusion)
                if reply.exclusion.reason != declined:
                    self.exclude(reply.exclusion)
            # Set directly: Duration.FromNanoseconds is pure Python, per entry.
            latency = entry.latency
            latency.seconds, latency.nanos = divmod(int(reply.latency_s * 1e9), 1_000_000_000)
        record.finished_at.CopyFrom(now_ts())
        if self.stream_rounds:
            async with asyncio.timeout(max(self.hard_limit(), 0.001)):
                await self.store.put_round(self.session_id, record)
        else:
            self._unsaved_rounds.append(record)
        self.rounds.append(record)
        return replies

    async def finish(
        self, outcome: coordination_pb2.Outcome, state: int | None = None
    ) -> coordination_pb2.Session:
        """Record the outcome and write the session (summary and unsaved rounds) in one transaction.

        Returns the session without its rounds (:attr:`rounds`; see :meth:`answer`).
        The write has until the deadline (at least FINISH_MIN_S); a session
        whose outcome cannot be stored by then raises DeadlineExceeded naming it
        (its record, if one was claimed, may still say RUNNING). A session marked
        in flight is unmarked after its outcome is written; one whose replica lost
        its lease raises ABORTED instead, writing nothing.
        """
        self.check_owned()
        self.proto.outcome.CopyFrom(outcome)
        if state is None:
            state = (
                coordination_pb2.SESSION_STATE_DECIDED
                if outcome.decided
                else coordination_pb2.SESSION_STATE_NO_DECISION
            )
        self.proto.state = state  # type: ignore[assignment]
        self.proto.finished_at.CopyFrom(now_ts())
        try:
            async with asyncio.timeout(max(self.deadline - time.monotonic(), FINISH_MIN_S)):
                owner = self.proto.coordinator_id if self._keeper is not None else None
                await self.store.finish(self.proto, self._unsaved_rounds, owner=owner)
        except TimeoutError:
            raise errors.DeadlineExceeded(
                f"session {self.session_id} reached its deadline ({self.deadline_s:g} s) before its "
                f"outcome could be stored; it is not recorded (outcome: {outcome.reason or 'none'})",
                metadata={"session_id": self.session_id},
            ) from None
        if self._keeper is not None:
            try:
                async with asyncio.timeout(max(self.deadline - time.monotonic(), FINISH_MIN_S)):
                    await self.store.drop_in_flight(self.session_id, self.proto.coordinator_id)
            except Exception as exc:  # TimeoutError too
                # The outcome is stored; a replica that finds the keys left ends nothing (it is finished).
                log.warning("session %s: its in-flight keys are left (%s)", self.session_id, exc)
        record_finished(self.proto, time.monotonic() - self.started)
        return self.proto

    def answer(self, out: coordination_pb2.Session, view: int) -> None:
        """Fill ``out`` with the finished session: with its rounds unless ``view`` is BASIC.

        One copy of the transcript at most (it can be thousands of entries).
        """
        out.CopyFrom(self.proto)
        if view != coordination_pb2.SESSION_VIEW_BASIC:
            out.rounds.extend(self.rounds)


def record_finished(session: coordination_pb2.Session, seconds: float) -> None:
    """The metrics of a finished session: count and duration by protocol and state, its
    participants, and its exclusions by reason."""
    meters = telemetry.instruments()
    labels = {"protocol": session.protocol, "state": coordination_pb2.SessionState.Name(session.state)}
    meters.sessions.add(1, labels)
    meters.session_duration.record(seconds, labels)
    meters.session_participants.record(len(session.participants), {"protocol": session.protocol})
    for exclusion in session.excluded:
        reason = coordination_pb2.ExclusionReason.Name(exclusion.reason)
        meters.exclusions.add(1, {"protocol": session.protocol, "reason": reason})
