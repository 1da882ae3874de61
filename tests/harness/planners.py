"""Planner replicas in tests: kill the one that runs a goal, follow the goal on another.

:func:`kill_owner_and_follow` is the failover step the resumption tests share:
the planner process whose instance id owns the goal is SIGKILLed, and the goal's
events are read to its end from a surviving replica, then the final goal.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

from mabeam.client import MeshClient
from mabeam.runtime.mesh import ServiceProcess
from mabeam.v1 import planner_pb2


async def kill_owner_and_follow(
    client: MeshClient, planners: Sequence[ServiceProcess], goal_id: str
) -> tuple[list[planner_pb2.ExecuteGoalResponse], planner_pb2.Goal]:
    """SIGKILL the planner replica owning ``goal_id`` (its pid is in the owner's instance id) and
    wait for it to die; then, through another replica, every event of the goal until its end and
    the goal as it finished."""
    goal = (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=goal_id))).goal
    owner = next(p for p in planners if f"-{p.pid}-" in goal.owner)
    owner.proc.send_signal(signal.SIGKILL)
    owner.proc.wait()
    survivor = next(p for p in planners if p is not owner)
    follow = await MeshClient.connect(planner=survivor.address)
    try:
        events = [
            e async for e in follow.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal_id=goal_id))
        ]
        final = (await follow.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=goal_id))).goal
    finally:
        await follow.close()
    return events, final
