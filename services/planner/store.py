"""The planner's etcd keyspace (under the mesh prefix P).

==============================  ====================================================  =============
key                             value                                                 lease
==============================  ====================================================  =============
P/goals/<id>                    ``mabeam.v1.Goal`` without step statuses (summary)  none
P/goal-steps/<id>/<step>        ``mabeam.v1.StepStatus``                              none
P/goal-events/<id>/<seq:010d>   ``mabeam.v1.ExecuteGoalResponse``                     none
P/goal-owner/<id>               id of the planner replica running the goal            the replica's
P/goal-cancel/<id>              why the goal was cancelled                             none
==============================  ====================================================  =============

Step statuses have keys of their own so that finishing one step of a
1,000-step goal writes that step, not the whole goal. Every write of the
runner checks in the same transaction that its replica still owns the goal,
so a replica that lost its lease cannot overwrite the one that resumed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient, snapshot
from mabeam.v1 import planner_pb2


class GoalStore:
    """Reads and owner-guarded writes of goals, steps and events."""

    def __init__(self, client: EtcdClient, config: MeshConfig) -> None:
        self.client = client
        self.goals = config.key("goals") + b"/"
        self.steps = config.key("goal-steps") + b"/"
        self.events = config.key("goal-events") + b"/"
        self.owners = config.key("goal-owner") + b"/"
        self.cancels = config.key("goal-cancel") + b"/"

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

    async def create(self, goal: planner_pb2.Goal) -> bool:
        """Store a new goal (False when the id exists).

        A step without a status key is pending, so a goal of any size is one put
        (etcd caps a transaction at 128 operations).
        """
        c = self.client
        key = self.goal_key(goal.goal_id)
        ok, _ = await c.transaction(
            compare=[c.transactions.create(key) == 0],
            success=[c.transactions.put(key, goal.SerializeToString())],
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

    async def write(self, owner: str, goal_id: str, puts: Sequence[tuple[bytes, bytes]]) -> bool:
        """Put every key only while ``owner`` owns the goal."""
        c = self.client
        ops: list[Any] = [c.transactions.put(k, v) for k, v in puts]
        ok, _ = await c.transaction(
            compare=[c.transactions.value(self.owner_key(goal_id)) == owner.encode()], success=ops, failure=[]
        )
        return bool(ok)

    async def list_goals(self) -> list[planner_pb2.Goal]:
        kvs, _ = await snapshot(self.client, self.goals)
        return [planner_pb2.Goal.FromString(kv.value) for kv in kvs]
