"""Bounded per-stream queues for Watch* streams fed by a producer that cannot wait.

A stream fed by a watch-fed cache's listener (``WatchAgents`` after its
snapshot) gets events at the rate the mesh changes, whatever the consumer
reads. Its handler sends them through a :class:`BoundedQueue`: the listener
puts without ever blocking (an append), and the handler yields them as fast as
gRPC takes them. When the consumer falls behind by more than the limit
(:data:`WATCH_QUEUE_LIMIT` events, or ``$MABEAM_WATCH_QUEUE_LIMIT``), the queue
drops what it holds and the stream ends with ``RESOURCE_EXHAUSTED`` (reason
``WATCH_QUEUE_FULL``, metadata ``limit``), naming the limit and saying how to
resume (``after_revision`` = the revision of the last event received). A
stream's memory is therefore at most ``limit`` events plus what gRPC's
flow-control windows hold. Each cut is counted (``mabeam.watch.cut``, by
method) and logged.

Streams that read their own etcd watch (``WatchAgents`` resumed from a
revision, ``WatchVariables``, ``WatchSession``, ``ExecuteGoal``) need no queue:
they read the next etcd response only when gRPC took the previous events, so
a slow consumer holds at most one etcd watch response (etcd sends at most
1,000 revisions per response) and the flow-control windows; the backlog stays
in etcd's history. Cutting those would be wrong: a consumer resuming far
behind catches up from history faster than any network drains it, so it
would be cut again at every try.

The limit counts events, not bytes: counting is free on the producer's path,
where measuring each message is not. 4,096 events lets a burst as large as a
whole host of agents lapsing at once (one etcd response, delivered in one go)
through to a consumer that keeps up.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from typing import Generic, TypeVar

from mabeam import errors, telemetry
from mabeam.v1 import common_pb2

T = TypeVar("T")

WATCH_QUEUE_LIMIT = 4096
"""Events a Watch* stream may hold for a consumer that has not read them yet (default)."""

LIMIT_ENV = "MABEAM_WATCH_QUEUE_LIMIT"

log = logging.getLogger(__name__)


def watch_queue_limit() -> int:
    """The limit in force: ``$MABEAM_WATCH_QUEUE_LIMIT`` (a positive integer) or :data:`WATCH_QUEUE_LIMIT`."""
    raw = os.environ.get(LIMIT_ENV, "")
    if not raw:
        return WATCH_QUEUE_LIMIT
    try:
        value = int(raw)
    except ValueError:
        return WATCH_QUEUE_LIMIT
    return value if value > 0 else WATCH_QUEUE_LIMIT


class BoundedQueue(Generic[T]):
    """A single-consumer queue that never blocks its producer and never holds more than ``limit`` items.

    :meth:`put_nowait` past the limit empties the queue and ends it: the
    consumer's next :meth:`get` raises :class:`mabeam.errors.ResourceExhausted`
    with ``what`` (the RPC) and ``resume`` (how to start again) in its message.
    :meth:`finish` ends it normally (after the items held), :meth:`fail` with
    an exception (after the items held). Iterating it is ``get`` until the end.
    """

    __slots__ = ("_end", "_items", "_resume", "_waiter", "_what", "high_water", "limit")

    def __init__(self, what: str, resume: str, limit: int | None = None) -> None:
        self.limit = watch_queue_limit() if limit is None else limit
        self.high_water = 0  # the most items held at once: never above limit
        self._items: deque[T] = deque()
        self._end: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._what = what
        self._resume = resume

    def __len__(self) -> int:
        return len(self._items)

    @property
    def overflowed(self) -> bool:
        """True once the consumer fell behind by more than the limit."""
        return isinstance(self._end, errors.ResourceExhausted)

    def put_nowait(self, item: T) -> bool:
        """Queue ``item``; False (and nothing kept) once the queue has ended or overflows now."""
        if self._end is not None:
            return False
        items = self._items
        if len(items) >= self.limit:
            items.clear()
            self._end = errors.ResourceExhausted(
                f"{self._what}: the consumer fell more than {self.limit} events behind "
                f"(the per-stream limit, {LIMIT_ENV}); the stream was ended to bound the "
                f"server's memory: {self._resume}",
                reason=common_pb2.ERROR_REASON_WATCH_QUEUE_FULL,
                metadata={"limit": str(self.limit)},
            )
            self._wake()
            telemetry.instruments().watch_cut.add(1, {"method": self._what})
            log.warning("%s: consumer more than %d events behind; stream ended", self._what, self.limit)
            return False
        items.append(item)
        if len(items) > self.high_water:
            self.high_water = len(items)
        self._wake()
        return True

    def finish(self) -> None:
        """End the queue after the items it holds."""
        if self._end is None:
            self._end = StopAsyncIteration()
            self._wake()

    def fail(self, exc: BaseException) -> None:
        """End the queue with ``exc``, raised by :meth:`get` after the items it holds."""
        if self._end is None:
            self._end = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> T:
        """The next item; raises the end (StopAsyncIteration, the overflow, a failure) after the last."""
        while True:
            if self._items:
                return self._items.popleft()
            if self._end is not None:
                raise self._end
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def __aiter__(self) -> BoundedQueue[T]:
        return self

    async def __anext__(self) -> T:
        return await self.get()
