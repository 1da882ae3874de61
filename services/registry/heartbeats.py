"""Heartbeats: the beats of one stream handled concurrently, and what one beat does.

A beat refreshes its agent's lease (over the shared keep-alive streams) and
stores the agent's load when it moved, or every TTL/2, in one transaction
with the other loads of its stream waiting then (:class:`LoadWriter`). The beats of one stream
(an AgentHost's, one per agent every TTL/3 while answered) are handled concurrently, up to
HEARTBEAT_CONCURRENCY at once, and answered in the order they finish: handled
one after another, a host of 1,000 agents would queue 1,000 etcd round trips,
and under load the last beat of a burst would be answered after the lease it
refreshes had lapsed. The first error (unknown agent, wrong token, etcd
unreachable) ends the stream, except that a beat with ``answer_refusals``
gets an unknown agent or a wrong token answered (:func:`refusal`): an
AgentHost's other agents go on beating. A token is checked against etcd once per
replica and registration (:class:`VerifiedTokens`, shared by the replica's
streams), so a stream opened again costs no reads.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from google.protobuf import duration_pb2

from mabeam import errors
from mabeam.runtime.etcd import KeepAliveStream
from mabeam.services.registry.directory import DEFAULT_TTL, AgentDirectory
from mabeam.services.registry.store import MAX_LOADS_PER_TXN, RegistryStore
from mabeam.v1 import common_pb2, registry_pb2

# Token checks kept per agent (VerifiedTokens): a migrating agent's two instances beat with two.
TOKENS_PER_AGENT = 2
# Beats of one Heartbeat stream handled at once (each is an etcd lease refresh).
HEARTBEAT_CONCURRENCY = 64
# After a bad beat, the beats the client is still sending are read (not handled) until it
# pauses this long, at most HEARTBEAT_DRAIN_S, before the error ends the stream (see answer_concurrently).
HEARTBEAT_DRAIN_QUIET_S, HEARTBEAT_DRAIN_S = 0.25, 1.0


async def answer_concurrently(
    beats: AsyncIterator[registry_pb2.HeartbeatRequest],
    handle: Callable[[registry_pb2.HeartbeatRequest], Awaitable[registry_pb2.HeartbeatResponse]],
) -> AsyncIterator[registry_pb2.HeartbeatResponse]:
    """Handle ``beats`` as they come, up to HEARTBEAT_CONCURRENCY at once; yield each answer as it is ready.

    The first exception of ``handle`` (or of reading ``beats``) is raised once
    the client pauses; nothing is yielded after it.
    """
    answers: asyncio.Queue[registry_pb2.HeartbeatResponse | Exception | None] = asyncio.Queue()
    slots = asyncio.Semaphore(HEARTBEAT_CONCURRENCY)
    running: set[asyncio.Task[None]] = set()
    failed = False  # a beat failed: the stream ends once the client pauses
    beat_read = asyncio.Event()

    async def answer(beat: registry_pb2.HeartbeatRequest) -> None:
        try:
            answers.put_nowait(await handle(beat))
        except Exception as exc:
            answers.put_nowait(exc)
        finally:
            slots.release()

    async def read() -> None:
        try:
            async for beat in beats:
                beat_read.set()
                if failed:
                    continue
                await slots.acquire()
                task = asyncio.create_task(answer(beat))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.gather(*running)
            answers.put_nowait(None)  # the client is done: end after the last answer
        except Exception as exc:
            answers.put_nowait(exc)
        finally:
            beat_read.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            item = await answers.get()
            if item is None:
                return
            if isinstance(item, Exception):
                # Read what the client is still sending before the status goes out: a
                # grpc.aio client whose write fails after the status replaces it with
                # "INTERNAL: Internal error from Core" (grpc/grpc#36066), and an AgentHost
                # would never learn which agent to register again.
                failed = True
                deadline = time.monotonic() + HEARTBEAT_DRAIN_S
                while not reader.done() and time.monotonic() < deadline:
                    beat_read.clear()
                    try:
                        await asyncio.wait_for(beat_read.wait(), HEARTBEAT_DRAIN_QUIET_S)
                    except TimeoutError:
                        break  # the client paused
                raise item
            yield item
    finally:
        for task in (reader, *running):
            task.cancel()
        await asyncio.gather(reader, *running, return_exceptions=True)


class VerifiedTokens:
    """The agents whose token this replica checked, shared by its Heartbeat streams.

    agent_id -> up to two (the token's digest, lease, ttl, generation of the
    registration it was checked against): a migrating agent beats with two
    tokens. An agent's entries are dropped as soon as this replica's
    watch sees any of the agent's token keys written or deleted (a rotated
    token, a migration's switch or end, a stop: on any replica), so a
    superseded token is refused from the next beat on. A stream that breaks and is opened again (an
    AgentHost's 1,000 agents) costs no etcd reads for agents already checked:
    re-checking them all at once, on a loaded registry, delayed their beats past
    their leases. A moved generation (a migration switched the token, a
    take-over registered anew) or a lapsed lease checks again. Digests only
    (SHA-256), compared in constant time; bounded by the directory's size
    (beyond it the agents checked longest ago go first).
    """

    def __init__(self) -> None:
        # Per agent, up to TOKENS_PER_AGENT checks, newest last: a migrating agent's two
        # instances beat with two tokens, and one kept check would make them re-check in turn.
        self._known: dict[str, list[tuple[bytes, tuple[int, float, int]]]] = {}
        # Counts forgets: a check that read etcd before a token changed must not be kept.
        self.epoch = 0

    def get(self, agent_id: str, token: str) -> tuple[int, float, int] | None:
        """(lease, ttl, generation) when ``token`` was checked for the agent, else None."""
        digest = _digest(token)
        for kept, known in self._known.get(agent_id, ()):
            if hmac.compare_digest(kept, digest):
                return known
        return None

    def put(self, agent_id: str, token: str, known: tuple[int, float, int], agents: int, epoch: int) -> None:
        """Keep a check made from etcd reads that began at ``epoch`` (dropped if a token changed since)."""
        if epoch != self.epoch:
            return
        digest = _digest(token)
        # The agent moves to the end (the newest); beyond the cap the oldest agents go, not all.
        checks = [c for c in self._known.pop(agent_id, ()) if not hmac.compare_digest(c[0], digest)]
        self._known[agent_id] = [*checks[-(TOKENS_PER_AGENT - 1) :], (digest, known)]
        while len(self._known) > 2 * agents + 1024:  # ids of agents long gone
            del self._known[next(iter(self._known))]

    def forget(self, agent_id: str) -> None:
        """Check the agent's tokens again on its next beat (one of its token keys changed, or its lease)."""
        self.epoch += 1
        self._known.pop(agent_id, None)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class LoadWriter:
    """The load writes of one Heartbeat stream, as few etcd transactions as the load allows.

    A write that finds no transaction in flight goes out at once, alone; those
    that come while one is in flight wait for it and then go out together, up to
    MAX_LOADS_PER_TXN in one (:meth:`RegistryStore.put_loads`). An idle stream
    waits for nothing; a stream of 1,000 agents writing ~300 loads a second
    costs etcd a few transactions a second instead of 300. Two writes of one
    agent waiting together are one (the newer load). Bounded by the stream's
    agents: one pending write per agent.
    """

    def __init__(self, store: RegistryStore) -> None:
        self._store = store
        self._pending: dict[str, tuple[common_pb2.AgentLoad, int, asyncio.Future[bool]]] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def write(self, agent_id: str, load: common_pb2.AgentLoad, lease_id: int) -> bool:
        """Store the agent's load on ``lease_id`` (while it is registered); whether it was stored."""
        waiting = self._pending.get(agent_id)
        future = waiting[2] if waiting else asyncio.get_running_loop().create_future()
        self._pending[agent_id] = (load, lease_id, future)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="registry-load-writes")
        # Shielded: a beat cancelled (its stream ended) must not cancel a write others wait on.
        return await asyncio.shield(future)

    async def _flush(self) -> None:
        while self._pending:
            batch = {}
            for agent_id in list(self._pending)[:MAX_LOADS_PER_TXN]:
                batch[agent_id] = self._pending.pop(agent_id)
            try:
                stored = await self._store.put_loads(
                    {a: (load, lease) for a, (load, lease, _) in batch.items()}
                )
            except BaseException as exc:
                for _, _, future in batch.values():
                    _settle(future, exception=exc if isinstance(exc, Exception) else None)
                if not isinstance(exc, Exception):
                    raise
            else:
                for agent_id, (_, _, future) in batch.items():
                    _settle(future, result=stored[agent_id])

    async def close(self) -> None:
        """Stop writing: writes not sent are dropped (their beats are not answered)."""
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
        for _, _, future in self._pending.values():
            _settle(future)
        self._pending.clear()


def _settle(
    future: asyncio.Future[bool], result: bool | None = None, exception: Exception | None = None
) -> None:
    """Give ``future`` its result or exception (cancel it when neither), unless it is done;
    an exception nobody awaits any more (a beat cancelled meanwhile) is not reported as lost."""
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
        future.add_done_callback(lambda f: f.exception())
    elif result is not None:
        future.set_result(result)
    else:
        future.cancel()


class HeartbeatStream:
    """The beats of one Heartbeat stream: tokens checked once per replica, loads written when they moved."""

    def __init__(
        self,
        store: RegistryStore,
        directory: AgentDirectory,
        keepalives: KeepAliveStream,
        verified: VerifiedTokens,
    ) -> None:
        self._store = store
        self._directory = directory
        self._keepalives = keepalives
        self._verified = verified
        self._last_put: dict[str, float] = {}
        self._loads = LoadWriter(store)

    async def close(self) -> None:
        """The stream ended: stop its load writes."""
        await self._loads.close()

    async def beat(
        self, agent_id: str, token: str, reported: common_pb2.AgentLoad
    ) -> registry_pb2.HeartbeatResponse:
        """One beat: check the token (once per registration), refresh the lease, store the load if due.

        Checked again when the registration moved (a lease or generation: a migration
        switched its token, a take-over registered anew): an old token does not
        keep working on a stream opened before.
        """
        known = self._verified.get(agent_id, token)
        seen = self._directory.agents.get(self._store.keys.agent(agent_id))
        # Checked again unless this replica's directory shows the very registration that was
        # checked (absent from it: lapsed, or registered again and not seen yet).
        fresh = known is None or seen is None or (seen.lease_id, seen.generation) != (known[0], known[2])
        if fresh:
            known = await self._check(agent_id, token)
        assert known is not None
        remaining = await self._keepalives.refresh(known[0])
        if remaining <= 0 and not fresh:
            # The directory lagged behind etcd: the lease checked was revoked and the agent
            # registered again (a take-over keeps its token) before the watch told this
            # replica. The registration in etcd decides, not the cached one.
            self._verified.forget(agent_id)
            known = await self._check(agent_id, token)
            remaining = await self._keepalives.refresh(known[0])
        if remaining <= 0:
            self._verified.forget(agent_id)
            raise errors.NotFound(
                f"lease of agent {agent_id!r} lapsed: register again with its token",
                reason=common_pb2.ERROR_REASON_AGENT_NOT_FOUND,
                metadata={"agent_id": agent_id},
            )
        lease_id, ttl, _ = known
        # The load key is rewritten at most every TTL/2 unless the load moved:
        # a beat must not cost an etcd write (and a watch event) every time.
        load = common_pb2.AgentLoad()
        load.CopyFrom(reported)
        load.reported_at.GetCurrentTime()
        stored = self._directory.loads.get(self._store.keys.load(agent_id))
        now = time.monotonic()
        changed = stored is None or (
            abs(stored.load - load.load) > 0.05
            or stored.queue_length != load.queue_length
            or _memory_moved(stored, load)
        )
        if changed or now - self._last_put.get(agent_id, 0.0) > ttl / 2:
            self._last_put[agent_id] = now
            await self._loads.write(agent_id, load, lease_id)
        return registry_pb2.HeartbeatResponse(
            agent_id=agent_id, lease_id=lease_id, ttl=duration_pb2.Duration(seconds=remaining)
        )

    async def _check(self, agent_id: str, token: str) -> tuple[int, float, int]:
        """The agent's registration read from etcd, and its token checked: (lease, ttl, generation)."""
        epoch = self._verified.epoch
        agent, _ = await self._store.get_agent(agent_id)
        if agent is None:
            raise errors.NotFound(
                f"agent {agent_id!r} is not registered (its lease lapsed?): register again",
                reason=common_pb2.ERROR_REASON_AGENT_NOT_FOUND,
                metadata={"agent_id": agent_id},
            )
        if not await self._store.token_matches(agent_id, token):
            raise errors.PermissionDenied(
                f"wrong or missing token for agent {agent_id!r}", metadata={"agent_id": agent_id}
            )
        known = (agent.lease_id, float(agent.lease_ttl.seconds or DEFAULT_TTL), agent.generation)
        self._verified.put(agent_id, token, known, len(self._directory.agents), epoch)
        return known


def refusal(agent_id: str, exc: errors.MabeamError) -> registry_pb2.HeartbeatResponse:
    """The answer to a beat refused with ``exc`` (NOT_FOUND, PERMISSION_DENIED) that asked for
    ``answer_refusals``: the status it would have ended the stream with, in the answer."""
    return registry_pb2.HeartbeatResponse(
        agent_id=agent_id,
        refusal=registry_pb2.HeartbeatRefusal(
            code=exc.code.value[0], message=exc.message, reason=exc.reason_value
        ),
    )


def _memory_moved(stored: common_pb2.AgentLoad, load: common_pb2.AgentLoad) -> bool:
    """Whether an agent's own memory moved enough to store its load before TTL/2: by more than
    1 MiB and 10 %. A process shared by many agents (an AgentHost's) never counts: its RSS moving
    would rewrite every one of its agents' loads at once (1,000 writes in a burst); it is
    stored with the TTL/2 refresh."""
    if load.shared_process:
        return False
    before, now = int(stored.memory_bytes), int(load.memory_bytes)
    return abs(now - before) > max(1 << 20, before // 10)
