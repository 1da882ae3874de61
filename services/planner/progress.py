"""A goal's progress in etcd: group commit of its writes, ownership checked, events numbered.

Every write of a goal runner (goal summary, step statuses, progress events)
goes through its :class:`ProgressLog`: the writes asked for while one
transaction is in flight are merged into the next (at most MAX_TXN_OPS keys),
each transaction checks that this replica still owns the goal, and events get
their sequence numbers in the order the writes were asked for, so a follower
sees them in sequence. The write that finishes a goal is bound to its expiry
lease (``write(..., lease=)``: :mod:`mabeam.runtime.retention`).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import timestamp_pb2

from mabeam.services.planner.store import GoalStore, LeaseNotFound
from mabeam.v1 import planner_pb2

START_WRITE_DELAY_S = 0.05
MAX_TXN_OPS = 120  # etcd refuses a transaction of more than 128 operations


def now_ts() -> timestamp_pb2.Timestamp:
    # Not Timestamp.GetCurrentTime: it goes through datetime, in Python, several times a step.
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


@dataclass
class Event:
    """A progress event waiting for its sequence number."""

    etype: int
    fields: dict[str, Any]


Put = tuple[bytes, bytes | None] | Event  # a value of None deletes the key


def _no_header() -> dict[str, Any]:
    return {}


class OwnershipLost(Exception):
    """This replica no longer owns the goal: stop at once, another replica runs it."""


class ProgressLog:
    """The writes of one goal's runner, group-committed while ``owner`` owns the goal.

    ``header`` gives the fields every event carries at the moment it is numbered
    (``goal_state``, ``steps_done``, ``steps_total``).
    """

    def __init__(
        self, store: GoalStore, goal_id: str, owner: str, header: Callable[[], dict[str, Any]]
    ) -> None:
        self.store = store
        self.goal_id = goal_id
        self.owner = owner
        self.seq = 0
        self._header = header
        self._queue: collections.deque[tuple[list[Put], asyncio.Future[None], int | None]] = (
            collections.deque()
        )
        self._flusher: asyncio.Future[None] | None = None

    def event(self, etype: int, **fields: Any) -> Event:
        """A progress event; it gets its sequence number when it is written."""
        return Event(etype, fields)

    def delayed(self, puts: list[Put]) -> DelayedWrite:
        """``puts`` written after START_WRITE_DELAY_S unless settled or cancelled first."""
        return DelayedWrite(self, puts)

    async def write(self, puts: Sequence[Put], lease: int | None = None) -> None:
        """Write ``puts`` (with the writes queued meanwhile: group commit), checking ownership.

        Writes are applied in the order they were asked for, and events are
        numbered in that order, so a follower sees them in sequence. ``lease``
        (the finishing write's expiry lease) binds every put of the transaction
        that carries them; :class:`LeaseNotFound` when etcd no longer knows it
        (nothing was written, and no sequence number used).
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((list(puts), done, lease))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        await done

    async def _flush(self) -> None:
        while self._queue:
            batch: list[tuple[list[Put], asyncio.Future[None], int | None]] = []
            ops = 0
            while self._queue and (not batch or ops + len(self._queue[0][0]) <= MAX_TXN_OPS):
                item = self._queue.popleft()
                batch.append(item)
                ops += len(item[0])
            merged: dict[bytes, bytes | None] = {}
            lease = next((item[2] for item in batch if item[2] is not None), None)
            seq_before = self.seq
            for puts, _, _ in batch:
                for put in puts:
                    if isinstance(put, Event):
                        self.seq += 1
                        event = planner_pb2.ExecuteGoalResponse(
                            sequence=self.seq,
                            type=put.etype,  # type: ignore[arg-type]
                            goal_id=self.goal_id,
                            time=now_ts(),
                            **self._header(),
                            **put.fields,
                        )
                        merged[self.store.event_key(self.goal_id, self.seq)] = event.SerializeToString()
                    else:
                        merged.pop(put[0], None)  # the later value of a key wins, in its place
                        merged[put[0]] = put[1]
            try:
                ok = await self.store.write(self.owner, self.goal_id, list(merged.items()), lease)
            except LeaseNotFound as exc:
                self.seq = seq_before  # nothing was written: the events are numbered again
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            except BaseException as exc:
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                raise
            for _, fut, _ in batch:
                if not fut.done():
                    if ok:
                        fut.set_result(None)
                    else:
                        fut.set_exception(OwnershipLost(self.goal_id))

    def close(self) -> None:
        """Stop writing (the run ended): a commit in flight is cancelled.

        The header callable is dropped too: it is the runner's bound method, and
        the cycle runner -> log -> runner would keep a finished runner (its goal,
        its 1,000-agent candidate lists) until the cycle collector runs, which
        protobuf's arenas do not prompt: the planner's memory grew by the goal.
        """
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
        self._header = _no_header


class DelayedWrite:
    """A step's start record, written after a short delay unless its outcome comes first."""

    def __init__(self, log: ProgressLog, puts: list[Put]) -> None:
        self._log = log
        self._puts = puts
        self._task: asyncio.Future[None] | None = None
        # A timer, not a sleeping task: most steps end first and cancel it.
        self._timer = asyncio.get_running_loop().call_later(START_WRITE_DELAY_S, self._start)

    def _start(self) -> None:
        self._task = asyncio.ensure_future(self._log.write(self._puts))

    async def settle(self) -> None:
        """Before the outcome is written: the start record was written, or never will be.

        A step that ended before the timer has no start record at all: its
        outcome (status and event) says which agent ran which attempt, and an
        ASSIGNED and a STARTED event at the same instant would tell a follower
        nothing more (they were two thirds of a fast goal's events).
        """
        if self._task is None:
            self._timer.cancel()
            return
        await self._task

    def cancel(self) -> None:
        """The step was cancelled before its outcome: no start record is written for it."""
        self._timer.cancel()
