"""The planner's etcd keyspace (under the mesh prefix P).

==============================  ====================================================  =============
key                             value                                                 lease
==============================  ====================================================  =============
P/goals/<id>                    ``mabeam.v1.Goal`` without step statuses (summary)  none
P/goal-steps/<id>/<step>        ``mabeam.v1.StepStatus``                              none
P/goal-events/<id>/<seq:010d>   ``mabeam.v1.ExecuteGoalResponse``                     none
P/goal-owner/<id>               id of the planner replica running the goal            the replica's
P/goal-cancel/<id>              why the goal was cancelled                             none
P/goal-order/<o>/<id>           the goal's state (``GoalState`` number, decimal);     none
                                ``<o>`` = 2^63 - created_at in ns, 20 digits: key
                                order is newest first (what ListGoals pages over)
P/goal-active/<id>              the goal's state while it is pending or running;      none
                                deleted when it finishes (what replicas watch)
P/goal-index-version            "1" once goals stored before the two indexes have     none
                                their index keys (:meth:`GoalStore.backfill_indexes`)
P/requests/planner/<m>/<id>     outcome of a call by ``request_id``                   the window's
                                (:mod:`mabeam.runtime.idempotency`)
==============================  ====================================================  =============

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
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient, LeaseKeeper, ResumingWatch, snapshot, try_acquire
from mabeam.runtime.idempotency import RequestLog
from mabeam.runtime.paging import ScanStats, scan
from mabeam.v1 import planner_pb2

FINISHED = (planner_pb2.GOAL_STATE_SUCCEEDED, planner_pb2.GOAL_STATE_FAILED, planner_pb2.GOAL_STATE_CANCELLED)


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

    async def write(self, owner: str, goal_id: str, puts: Sequence[tuple[bytes, bytes | None]]) -> bool:
        """Put every key (delete those whose value is None) only while ``owner`` owns the goal."""
        c = self.client
        ops: list[Any] = [
            c.transactions.delete(k) if v is None else c.transactions.put(k, v) for k, v in puts
        ]
        ok, _ = await c.transaction(
            compare=[c.transactions.value(self.owner_key(goal_id)) == owner.encode()], success=ops, failure=[]
        )
        return bool(ok)

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
        self, goal_id: str, start_revision: int
    ) -> AsyncIterator[planner_pb2.ExecuteGoalResponse]:
        """The goal's progress events written from ``start_revision`` on, as they come."""
        # Closed on the way out: a watch left behind keeps its etcd stream open (one per call).
        async with ResumingWatch(
            self.client, self.events_prefix(goal_id), start_revision=start_revision
        ) as watch:
            async for change in watch:
                if change.kind == "PUT":
                    yield planner_pb2.ExecuteGoalResponse.FromString(change.value)
