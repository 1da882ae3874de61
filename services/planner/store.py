"""The planner's etcd keyspace (under the mesh prefix P).

==============================  ====================================================  ==================
key                             value                                                 lease
==============================  ====================================================  ==================
P/goals/<id>                    ``mabeam.v1.Goal`` without step statuses (summary)  none; expiry once
                                                                                      finished (below)
P/goal-steps/<id>/<step>        ``mabeam.v1.StepStatus``                              none; expiry once
                                                                                      finished
P/goal-events/<id>/<seq:010d>   ``mabeam.v1.ExecuteGoalResponse``                     none; expiry once
                                                                                      finished
P/goal-owner/<id>               id of the planner replica running the goal            the replica's
P/goal-cancel/<id>              why the goal was cancelled (deleted when it           none
                                finishes)
P/goal-order/<o>/<id>           the goal's state (``GoalState`` number, decimal);     none; expiry once
                                ``<o>`` = 2^63 - created_at in ns, 20 digits: key     finished
                                order is newest first (what ListGoals pages over)
P/goal-active/<id>              the goal's state while it is pending or running;      none
                                deleted when it finishes (what replicas watch)
P/goal-index-version            "1" once goals stored before the two indexes have     none
                                their index keys (:meth:`GoalStore.backfill_indexes`)
P/goal-retention-leader/<l>     candidates of the election of the replica that        the candidate's
                                enforces the count cap (:meth:`GoalStore.trim`)
P/requests/planner/<m>/<id>     outcome of a call by ``request_id``                   the window's
                                (:mod:`mabeam.runtime.idempotency`)
P/planner-agents/<agent>        capability of an agent a planner replica started      none; deleted when
                                for a goal (:mod:`.launcher`)                         it is stopped
P/planner-agent-claims/<agent>  id of the replica that keeps that agent (stops it     the replica's
                                once idle); an agent with no claim is adopted
==============================  ====================================================  ==================

The two indexes keep the planner's memory and its lists bounded: every
replica watches ``goal-active/`` (unfinished goals only), not ``goals/``
(every goal ever), and ``ListGoals`` reads one bounded range of
``goal-order/`` per page (:mod:`mabeam.runtime.paging`), filtering by state
on the index's value. Both are written in the transactions that write the
goal's state; a goal's cancel key is deleted when it finishes.

Step statuses have keys of their own so that finishing one step of a
1,000-step goal writes that step, not the whole goal. Every write of the
runner checks in the same transaction that its replica still owns the goal,
so a replica that lost its lease cannot overwrite the one that resumed it.

Retention (:mod:`mabeam.runtime.retention`, ``--goal-retention``,
``MABEAM_GOAL_RETENTION``, default 7 days): a finished goal's keys are bound
to an *expiry lease*, so etcd deletes them itself when the period is over.
A goal's life is unbounded, so its steps and events are written without a
lease while it runs; when it finishes, the runner first puts every step
status and event again bound to the expiry lease (:meth:`GoalStore.rebind`,
transactions of at most 120 operations and 1 MiB, guarded by ownership),
then writes the goal's summary, ``goal-order/`` key and last events bound to
it, in the transaction that finishes the goal. A replica that dies in between
leaves an unfinished goal: the replica that resumes it first puts the keys
bound to a lease again without one (:meth:`GoalStore.unbind`), then finishes
it again. With a count cap (``MABEAM_GOAL_RETENTION_COUNT``), the replica
that leads ``goal-retention-leader/`` deletes the oldest finished goals
beyond it (:meth:`GoalStore.trim`): every key of each, never an unfinished one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.utils

from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient, LeaseKeeper, ResumingWatch, snapshot, try_acquire, while_leading
from mabeam.runtime.etcd.leases import LeaseNotFound as LeaseNotFound  # re-exported: writers catch it
from mabeam.runtime.etcd.leases import raise_if_lease_unknown
from mabeam.runtime.idempotency import RequestLog
from mabeam.runtime.paging import ScanStats, last_keys, range_reply, scan
from mabeam.v1 import planner_pb2

FINISHED = (planner_pb2.GOAL_STATE_SUCCEEDED, planner_pb2.GOAL_STATE_FAILED, planner_pb2.GOAL_STATE_CANCELLED)
_FINISHED_VALUES = {str(int(s)).encode() for s in FINISHED}
# One rebinding transaction: at most this many puts and about this many bytes (etcd: 128 ops, 1.5 MiB).
REBIND_TXN_OPS = 120
REBIND_TXN_BYTES = 1 << 20
# The count cap's work per pass: goals deleted, and goal-order keys examined, at most.
TRIM_BATCH = 100
TRIM_MAX_EXAMINED = 2_000


@dataclass
class TrimStats:
    """What the count cap's passes did (tests and the curious read it)."""

    passes: int = 0
    deleted: int = 0
    counts: int = 0  # count-only range reads
    examined: int = 0  # goal-order keys read


def order_suffix(goal: planner_pb2.Goal) -> str:
    """The goal's key under ``goal-order/``: newest first, then by id (also the page tokens' position)."""
    return f"{(1 << 63) - goal.created_at.ToNanoseconds():020d}/{goal.goal_id}"


class GoalStore:
    """Reads and owner-guarded writes of goals, steps and events; goals' owner keys and cancellations."""

    def __init__(self, client: EtcdClient, config: MeshConfig) -> None:
        self.client = client
        self.goals = config.key("goals") + b"/"
        self.steps = config.key("goal-steps") + b"/"
        self.events = config.key("goal-events") + b"/"
        self.owners = config.key("goal-owner") + b"/"
        self.cancels = config.key("goal-cancel") + b"/"
        self.order = config.key("goal-order") + b"/"
        self.active = config.key("goal-active") + b"/"
        self.index_version = config.key("goal-index-version")
        self.retention_leader = config.key("goal-retention-leader")
        self.started_agents = config.key("planner-agents") + b"/"
        self.agent_claims = config.key("planner-agent-claims") + b"/"
        self.trims = TrimStats()
        self.scans = ScanStats()  # what ListGoals' range reads cost (tests read it)
        self.requests = RequestLog(client, config, "planner")  # outcomes by request_id

    def goal_key(self, goal_id: str) -> bytes:
        return self.goals + goal_id.encode()

    def steps_prefix(self, goal_id: str) -> bytes:
        return self.steps + goal_id.encode() + b"/"

    def step_key(self, goal_id: str, step_id: str) -> bytes:
        return self.steps_prefix(goal_id) + step_id.encode()

    def events_prefix(self, goal_id: str) -> bytes:
        return self.events + goal_id.encode() + b"/"

    def event_key(self, goal_id: str, seq: int) -> bytes:
        return self.events_prefix(goal_id) + f"{seq:010d}".encode()

    def owner_key(self, goal_id: str) -> bytes:
        return self.owners + goal_id.encode()

    def cancel_key(self, goal_id: str) -> bytes:
        return self.cancels + goal_id.encode()

    def order_key(self, goal: planner_pb2.Goal) -> bytes:
        return self.order + order_suffix(goal).encode()

    def active_key(self, goal_id: str) -> bytes:
        return self.active + goal_id.encode()

    def state_puts(self, goal: planner_pb2.Goal) -> list[tuple[bytes, bytes | None]]:
        """The index keys to write with the goal's summary: its state, and active or not (None deletes)."""
        state = str(int(goal.state)).encode()
        if goal.state in FINISHED:
            return [
                (self.order_key(goal), state),
                (self.active_key(goal.goal_id), None),
                (self.cancel_key(goal.goal_id), None),
            ]
        return [(self.order_key(goal), state), (self.active_key(goal.goal_id), state)]

    async def create(self, goal: planner_pb2.Goal) -> bool:
        """Store a new goal (False when the id exists).

        A step without a status key is pending, so a goal of any size is one put
        (etcd caps a transaction at 128 operations), with its index keys.
        """
        c = self.client
        key = self.goal_key(goal.goal_id)
        indexes = [c.transactions.put(k, v) for k, v in self.state_puts(goal) if v is not None]
        ok, _ = await c.transaction(
            compare=[c.transactions.create(key) == 0],
            success=[c.transactions.put(key, goal.SerializeToString()), *indexes],
            failure=[],
        )
        return bool(ok)

    async def get(self, goal_id: str, with_steps: bool = True) -> planner_pb2.Goal | None:
        got = await self.client.get(self.goal_key(goal_id))
        if got is None:
            return None
        goal = planner_pb2.Goal.FromString(got.value)
        if with_steps:
            statuses = {s.step_id: s for s in await self.step_statuses(goal_id)}
            for spec in goal.spec.steps:
                pending = planner_pb2.StepStatus(step_id=spec.step_id, state=planner_pb2.STEP_STATE_PENDING)
                goal.steps.append(statuses.get(spec.step_id, pending))
        return goal

    async def step_statuses(self, goal_id: str) -> list[planner_pb2.StepStatus]:
        kvs, _ = await snapshot(self.client, self.steps_prefix(goal_id))
        return [planner_pb2.StepStatus.FromString(kv.value) for kv in kvs]

    async def last_seq(self, goal_id: str) -> int:
        kvs, _ = await snapshot(self.client, self.events_prefix(goal_id))
        return max((int(kv.key.rsplit(b"/", 1)[1]) for kv in kvs), default=0)

    async def write(
        self,
        owner: str,
        goal_id: str,
        puts: Sequence[tuple[bytes, bytes | None]],
        lease: int | None = None,
    ) -> bool:
        """Put every key (delete those whose value is None) only while ``owner`` owns the goal.

        ``lease``: the puts are bound to it (the expiry lease of a finishing goal);
        :class:`LeaseNotFound` when etcd no longer knows it.
        """
        c = self.client
        ops: list[Any] = [
            c.transactions.delete(k) if v is None else c.transactions.put(k, v, lease=lease) for k, v in puts
        ]
        return await self._guarded(owner, goal_id, ops, lease)

    async def _guarded(self, owner: str, goal_id: str, ops: list[Any], lease: int | None) -> bool:
        c = self.client
        try:
            ok, _ = await c.transaction(
                compare=[c.transactions.value(self.owner_key(goal_id)) == owner.encode()],
                success=ops,
                failure=[],
            )
        except aetcd.exceptions.ClientError as exc:
            raise_if_lease_unknown(exc, lease)
            raise
        return bool(ok)

    async def _range(
        self, start: bytes, end: bytes, limit: int = 0, *, count_only: bool = False, keys_only: bool = False
    ) -> Any:
        """One etcd range read (``limit`` 0: no limit): the reply, with ``kvs``, ``more`` and ``count``."""
        return await range_reply(self.client, start, end, limit, count_only=count_only, keys_only=keys_only)

    async def _pages(self, prefix: bytes, size: int) -> AsyncIterator[list[Any]]:
        """The key-values under ``prefix`` in bounded range reads of ``size`` keys."""
        end = aetcd.utils.prefix_range_end(prefix)
        start = prefix
        while True:
            reply = await self._range(start, end, size)
            if reply.kvs:
                yield list(reply.kvs)
            if not reply.more or not reply.kvs:
                return
            start = bytes(reply.kvs[-1].key) + b"\x00"

    async def _reput(self, owner: str, goal_id: str, lease: int | None) -> int | None:
        """Put every step status and event of the goal again, bound to ``lease`` (None: to no lease);
        only keys not bound to it already. How many were put, None when ``owner`` lost the goal."""
        c = self.client
        want = lease or 0
        moved = 0
        for prefix in (self.steps_prefix(goal_id), self.events_prefix(goal_id)):
            async for kvs in self._pages(prefix, REBIND_TXN_OPS):
                ops: list[Any] = []
                size = 0
                for kv in kvs:
                    if int(kv.lease) == want:
                        continue
                    value = bytes(kv.value)
                    if ops and size + len(kv.key) + len(value) > REBIND_TXN_BYTES:
                        if not await self._guarded(owner, goal_id, ops, lease):
                            return None
                        moved += len(ops)
                        ops, size = [], 0
                    ops.append(c.transactions.put(bytes(kv.key), value, lease=lease))
                    size += len(kv.key) + len(value)
                if ops:
                    if not await self._guarded(owner, goal_id, ops, lease):
                        return None
                    moved += len(ops)
        return moved

    async def rebind(self, owner: str, goal_id: str, lease: int) -> int | None:
        """Before a goal's finishing write: bind its step statuses and events to the expiry ``lease``.

        Transactions of at most REBIND_TXN_OPS puts and about REBIND_TXN_BYTES, each
        guarded by ``owner``'s ownership as the runner's writes are; keys already on
        ``lease`` are skipped (idempotent). Returns how many keys were put (None: the
        goal is no longer ``owner``'s); :class:`LeaseNotFound` when etcd lost the lease.
        """
        return await self._reput(owner, goal_id, lease)

    async def unbind(self, owner: str, goal_id: str) -> int | None:
        """When a goal is resumed: put its step statuses and events bound to a lease (a replica that
        died while finishing it had rebound them) again without one, so none expires while it runs."""
        return await self._reput(owner, goal_id, None)

    async def page_goal_ids(
        self, after: str | None, size: int, state: int = 0
    ) -> tuple[list[str], str | None]:
        """Up to ``size`` goal ids, newest first, after the ``goal-order/`` position ``after`` (with
        ``state``: in that state only); and the position the next page continues after (None: last).

        Bounded range reads of the index (:func:`mabeam.runtime.paging.scan`), never the whole prefix.
        """
        keep = None if not state else (lambda kv: bytes(kv.value) == str(int(state)).encode())
        kvs, next_after = await scan(self.client, self.order, after, size, keep=keep, stats=self.scans)
        return [bytes(kv.key).rsplit(b"/", 1)[1].decode() for kv in kvs], next_after

    async def drop_active(self, goal_id: str) -> None:
        """Delete a finished goal's active-index key (left by an index backfill racing its end)."""
        c = self.client
        goal = await self.get(goal_id, with_steps=False)
        if goal is not None and goal.state in FINISHED:
            await c.delete(self.active_key(goal_id))

    async def backfill_indexes(self) -> int:
        """Give goals stored before ``goal-order/`` and ``goal-active/`` existed their index keys.

        Once per mesh (``goal-index-version``); pages through ``goals/`` in bounded
        ranges; each key is created only where missing, so replicas running it at
        once agree. Returns how many goals it looked at.
        """
        c = self.client
        if await c.get(self.index_version) is not None:
            return 0
        seen, after = 0, None
        while True:
            kvs, after = await scan(c, self.goals, after, 500)
            for kv in kvs:
                goal = planner_pb2.Goal.FromString(kv.value)
                seen += 1
                for key, value in self.state_puts(goal):
                    if value is None:
                        if key.startswith(self.cancels):
                            await c.delete(key)
                        continue
                    await c.transaction(
                        compare=[c.transactions.create(key) == 0],
                        success=[c.transactions.put(key, value)],
                        failure=[],
                    )
            if after is None:
                break
        await c.put(self.index_version, b"1")
        return seen

    def lease_keeper(self, ttl: int) -> LeaseKeeper:
        """A lease for this replica's owner keys, kept alive while the replica runs (started by its owner)."""
        return LeaseKeeper(self.client, ttl)

    async def acquire_owner(self, goal_id: str, owner: str, lease_id: int) -> bool:
        """Take the goal's owner key for ``owner`` on ``lease_id`` (True when it is ours, also already)."""
        return await try_acquire(self.client, self.owner_key(goal_id), owner, lease_id)

    async def release_owner(self, goal_id: str, owner: str) -> None:
        """Drop the goal's owner key if ``owner`` still holds it."""
        c = self.client
        await c.transaction(
            compare=[c.transactions.value(self.owner_key(goal_id)) == owner.encode()],
            success=[c.transactions.delete(self.owner_key(goal_id))],
            failure=[],
        )

    # -- agents the planner started (:mod:`.launcher`) ------------------------------------

    async def record_started(self, agent_id: str, capability: str, owner: str, lease_id: int) -> None:
        """Before starting it: the agent, and ``owner``'s claim on it bound to ``lease_id``."""
        c, t = self.client, self.client.transactions
        await c.transaction(
            compare=[],
            success=[
                t.put(self.started_agents + agent_id.encode(), capability.encode()),
                t.put(self.agent_claims + agent_id.encode(), owner.encode(), lease=lease_id),
            ],
            failure=[],
        )

    async def claim_started(self, agent_id: str, owner: str, lease_id: int) -> bool:
        """Take an unclaimed started agent for ``owner`` (True when it is ours)."""
        return await try_acquire(self.client, self.agent_claims + agent_id.encode(), owner, lease_id)

    async def drop_started(self, agent_id: str) -> None:
        """The agent was stopped (or never started): its record and claim go."""
        c, t = self.client, self.client.transactions
        await c.transaction(
            compare=[],
            success=[
                t.delete(self.started_agents + agent_id.encode()),
                t.delete(self.agent_claims + agent_id.encode()),
            ],
            failure=[],
        )

    async def unclaimed_started(
        self, most: int, after: str | None = None
    ) -> tuple[list[tuple[str, str]], str | None]:
        """(agent id, capability) of started agents nobody claims (their replica's lease went), among
        the next ``most`` records after ``after`` (None: from the first); and where the next call
        goes on from (None: the end was reached). Two bounded reads: the records, and the claims
        of just their key range."""
        end = aetcd.utils.prefix_range_end(self.started_agents)
        start = self.started_agents + (after.encode() + b"\0" if after else b"")
        started = await self._range(start, end, most)
        ids = [bytes(kv.key)[len(self.started_agents) :] for kv in started.kvs]
        if not ids:
            return [], None
        claims = await self._range(
            self.agent_claims + ids[0], self.agent_claims + ids[-1] + b"\0", len(ids), keys_only=True
        )
        claimed = {bytes(kv.key)[len(self.agent_claims) :] for kv in claims.kvs}
        unclaimed = [
            (agent_id.decode(), bytes(kv.value).decode())
            for agent_id, kv in zip(ids, started.kvs, strict=True)
            if agent_id not in claimed
        ]
        return unclaimed, (ids[-1].decode() if started.more else None)

    async def request_cancel(self, goal_id: str, reason: str) -> bool:
        """Ask the goal's runner (whichever replica it is on) to cancel it; False when it is not
        pending or running any more (nothing written: a finished goal keeps no cancel key)."""
        c = self.client
        ok, _ = await c.transaction(
            compare=[c.transactions.create(self.active_key(goal_id)) > 0],
            success=[c.transactions.put(self.cancel_key(goal_id), reason.encode())],
            failure=[],
        )
        return bool(ok)

    async def events_so_far(self, goal_id: str) -> tuple[list[planner_pb2.ExecuteGoalResponse], int]:
        """The goal's progress events so far, in order, and the revision they were read at."""
        kvs, revision = await snapshot(self.client, self.events_prefix(goal_id))
        return [planner_pb2.ExecuteGoalResponse.FromString(kv.value) for kv in kvs], revision

    async def follow_events(
        self, goal_id: str, start_revision: int, after_seq: int = 0
    ) -> AsyncIterator[planner_pb2.ExecuteGoalResponse]:
        """The goal's progress events written from ``start_revision`` on, as they come, each once:
        only those whose sequence number is above ``after_seq`` and the last one yielded (a finishing
        goal puts its events again, bound to its expiry lease: those puts are not new events)."""
        last = after_seq
        # Closed on the way out: a watch left behind keeps its etcd stream open (one per call).
        async with ResumingWatch(
            self.client, self.events_prefix(goal_id), start_revision=start_revision
        ) as watch:
            async for change in watch:
                if change.kind != "PUT":
                    continue
                seq = int(bytes(change.key).rsplit(b"/", 1)[1])
                if seq <= last:
                    continue
                last = seq
                yield planner_pb2.ExecuteGoalResponse.FromString(change.value)

    # -- the count cap ----------------------------------------------------------------

    async def count(self, prefix: bytes, start: bytes | None = None, end: bytes | None = None) -> int:
        """How many keys are in ``[start, end)`` (default: under ``prefix``): a count-only range read."""
        self.trims.counts += 1
        reply = await self._range(
            start or prefix, end or aetcd.utils.prefix_range_end(prefix), count_only=True
        )
        return int(reply.count)

    async def _count(self, start: bytes, end: bytes) -> int:
        return await self.count(self.order, start, end)

    async def _read(self, start: bytes, end: bytes, limit: int) -> list[Any]:
        kvs = list((await self._range(start, end, limit)).kvs)
        self.trims.examined += len(kvs)
        return kvs

    async def trim(self, keep: int) -> int:
        """Delete the oldest finished goals beyond the ``keep`` newest finished ones (every key of
        each); never an unfinished goal. Bounded per call: at most TRIM_BATCH goals deleted and about
        TRIM_MAX_EXAMINED ``goal-order/`` keys read. Returns how many goals were deleted.

        The oldest goals are at the end of the newest-first ``goal-order/``: windows of at most
        TRIM_BATCH keys are taken from its end backwards (:func:`mabeam.runtime.paging.last_keys`:
        count-only ranges and one bounded ascending read each), oldest first.
        """
        self.trims.passes += 1
        finished = await self.count(self.order) - await self.count(self.active)
        excess = min(finished - keep, TRIM_BATCH)
        deleted, examined = 0, 0
        end = aetcd.utils.prefix_range_end(self.order)
        while excess > deleted and examined < TRIM_MAX_EXAMINED:
            kvs = await last_keys(
                self.client, self.order, end, TRIM_BATCH, count=self._count, read=self._read
            )
            if not kvs:
                break
            examined += len(kvs)
            for kv in reversed(kvs):  # oldest first
                if bytes(kv.value) not in _FINISHED_VALUES:
                    continue  # pending or running: never deleted
                if await self._delete_goal(bytes(kv.key), bytes(kv.value)):
                    deleted += 1
                    if deleted >= excess:
                        break
            end = bytes(kvs[0].key)
        self.trims.deleted += deleted
        return deleted

    async def _delete_goal(self, order_key: bytes, state: bytes) -> bool:
        """Every key of one finished goal, in one transaction guarded by its ``goal-order/`` key still
        saying it finished (so a goal is deleted once, and never one that is not finished)."""
        c = self.client
        goal_id = order_key.rsplit(b"/", 1)[1].decode()
        steps, events = self.steps_prefix(goal_id), self.events_prefix(goal_id)
        ok, _ = await c.transaction(
            compare=[c.transactions.value(order_key) == state],
            success=[
                c.transactions.delete(order_key),
                c.transactions.delete(self.goal_key(goal_id)),
                c.transactions.delete(steps, aetcd.utils.prefix_range_end(steps)),
                c.transactions.delete(events, aetcd.utils.prefix_range_end(events)),
                c.transactions.delete(self.cancel_key(goal_id)),
            ],
            failure=[],
        )
        return bool(ok)

    async def while_leading_retention(
        self, candidate_id: str, ttl: int, work: Callable[[], Awaitable[object]], interval: float
    ) -> None:
        """Run ``work`` every ``interval`` while this replica leads the goal retention election."""
        await while_leading(
            self.client, self.retention_leader, candidate_id, ttl, work, interval, what="goal retention"
        )
