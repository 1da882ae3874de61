"""The planner end to end: validation, assignment, parallel execution, retries, cancel, resume."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from harness.planners import kill_owner_and_follow
from harness.wait import eventually
from mabeam import errors
from mabeam.agent import Agent, AgentHost, from_value
from mabeam.client import MeshClient
from mabeam.runtime.mesh import LocalMesh
from mabeam.server import MeshServer
from mabeam.v1 import agent_pb2, planner_pb2

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "examples" / "worker.py")
pytestmark = pytest.mark.timeout(90)


def value(data: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    if isinstance(data, dict):
        v.struct_value.update(data)
    elif isinstance(data, (int, float)):
        v.number_value = data
    elif isinstance(data, list):
        v.list_value.extend(data)
    return v


def step(
    step_id: str, capability: str = "add", data: Any = 1, deps: tuple[str, ...] = (), **kw: Any
) -> planner_pb2.StepSpec:
    return planner_pb2.StepSpec(
        step_id=step_id, capability=capability, input=value(data), depends_on=list(deps), **kw
    )


class Adder(Agent):
    """Outputs its input plus the sum of its dependencies' outputs; counts executions per step."""

    capabilities = ("add",)
    executed: collections.Counter[str] = collections.Counter()

    def __init__(self, agent_id: str, *, fail: bool = False, delay: float = 0.0, cost: float = 1.0) -> None:
        super().__init__(agent_id)
        self.fail, self.delay, self.cost = fail, delay, cost
        self.steps: list[str] = []

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        if request.HasField("task_announcement"):
            return agent_pb2.CoordinationResponse(proposal=agent_pb2.Proposal(cost=self.cost))
        return agent_pb2.CoordinationResponse(ack=agent_pb2.Acknowledgement())

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise errors.FailedPrecondition(f"{self.agent_id} always fails")
        self.steps.append(request.step_id)
        Adder.executed[f"{request.goal_id}/{request.step_id}"] += 1
        data = from_value(request.input)
        total = float(sum(data.get("values", [])) if isinstance(data, dict) else data or 0)
        for output in request.dependency_outputs.values():
            total += float(from_value(output)["sum"])
        return {"sum": total, "agent": self.agent_id}


async def host_of(registry: MeshServer, *agents: Agent) -> AgentHost:
    host = AgentHost(list(agents), registry=registry.address)
    await host.start()
    return host


async def run_goal(
    client: MeshClient, spec: planner_pb2.GoalSpec
) -> tuple[planner_pb2.Goal, list[planner_pb2.ExecuteGoalResponse]]:
    events = [e async for e in client.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal=spec))]
    goal = (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=events[0].goal_id))).goal
    return goal, events


async def test_diamond_runs_in_parallel_and_feeds_outputs(
    planner_mesh: tuple[MeshClient, MeshServer],
) -> None:
    client, registry = planner_mesh
    host = await host_of(registry, Adder("w1", delay=0.3), Adder("w2", delay=0.3))
    try:
        spec = planner_pb2.GoalSpec(
            name="diamond",
            steps=[
                step("a", data=1),
                step("b", data=10, deps=("a",)),
                step("c", data=100, deps=("a",)),
                step("d", data=0, deps=("b", "c")),
            ],
        )
        started = time.monotonic()
        goal, events = await run_goal(client, spec)
        elapsed = time.monotonic() - started
    finally:
        await host.stop()
    assert goal.state == planner_pb2.GOAL_STATE_SUCCEEDED
    outputs = {s.step_id: from_value(s.output)["sum"] for s in goal.steps}
    assert outputs == {"a": 1, "b": 11, "c": 101, "d": 112}
    assert elapsed < 4 * 0.3 + 0.8  # b and c ran side by side
    kinds = [e.type for e in events]
    assert (
        kinds[0] == planner_pb2.GOAL_EVENT_TYPE_GOAL_STARTED
        and kinds[-1] == planner_pb2.GOAL_EVENT_TYPE_GOAL_FINISHED
    )
    assert kinds.count(planner_pb2.GOAL_EVENT_TYPE_STEP_SUCCEEDED) == 4
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))


@pytest.mark.parametrize(
    ("steps", "code", "message"),
    [
        ([], errors.InvalidArgument, "at least one step"),
        ([step("a"), step("a")], errors.InvalidArgument, "'a' appears twice"),
        ([step("a", deps=("ghost",))], errors.InvalidArgument, "'ghost'"),
        (
            [step("a", deps=("b",)), step("b", deps=("c",)), step("c", deps=("a",))],
            errors.InvalidArgument,
            "cycle: a -> b -> c -> a",
        ),
        ([step("a", capability="teleport")], errors.FailedPrecondition, "'teleport'"),
    ],
)
async def test_invalid_goals_are_refused_before_anything_runs(
    planner_mesh: tuple[MeshClient, MeshServer],
    steps: list[planner_pb2.StepSpec],
    code: type[errors.MabeamError],
    message: str,
) -> None:
    client, registry = planner_mesh
    host = await host_of(registry, Adder("w1"))
    try:
        with pytest.raises(code, match=message):
            await client.planner.SubmitGoal(
                planner_pb2.SubmitGoalRequest(goal=planner_pb2.GoalSpec(steps=steps))
            )
        assert not (await client.planner.ListGoals(planner_pb2.ListGoalsRequest())).goals
    finally:
        await host.stop()


async def test_failed_step_is_retried_on_another_agent(planner_mesh: tuple[MeshClient, MeshServer]) -> None:
    client, registry = planner_mesh
    bad, good = Adder("a-bad", fail=True), Adder("b-good")
    host = await host_of(registry, bad, good)
    try:
        spec = planner_pb2.GoalSpec(steps=[step("only")], strategy=planner_pb2.ASSIGNMENT_STRATEGY_FIRST_FIT)
        goal, events = await run_goal(client, spec)
    finally:
        await host.stop()
    assert goal.state == planner_pb2.GOAL_STATE_SUCCEEDED
    attempts = goal.steps[0].attempts
    assert [a.agent_id for a in attempts] == ["a-bad", "b-good"] and "always fails" in attempts[0].error
    assert planner_pb2.GOAL_EVENT_TYPE_STEP_RETRYING in [e.type for e in events]


async def test_step_failing_everywhere_fails_the_goal_and_skips_dependents(
    planner_mesh: tuple[MeshClient, MeshServer],
) -> None:
    client, registry = planner_mesh
    host = await host_of(registry, Adder("x", fail=True))
    try:
        goal, _ = await run_goal(
            client, planner_pb2.GoalSpec(steps=[step("a"), step("b", deps=("a",))], max_attempts=2)
        )
    finally:
        await host.stop()
    assert goal.state == planner_pb2.GOAL_STATE_FAILED and "'a' failed" in goal.error
    states = {s.step_id: s.state for s in goal.steps}
    assert states == {"a": planner_pb2.STEP_STATE_FAILED, "b": planner_pb2.STEP_STATE_SKIPPED}
    assert len(goal.steps[0].attempts) == 2


async def test_assignment_by_auction_records_winner_and_price(
    planner_mesh: tuple[MeshClient, MeshServer],
) -> None:
    client, registry = planner_mesh
    host = await host_of(registry, Adder("cheap", cost=2), Adder("dear", cost=9))
    try:
        goal, _ = await run_goal(
            client, planner_pb2.GoalSpec(steps=[step("s")], strategy=planner_pb2.ASSIGNMENT_STRATEGY_AUCTION)
        )
    finally:
        await host.stop()
    attempt = goal.steps[0].attempts[0]
    assert (
        goal.state == planner_pb2.GOAL_STATE_SUCCEEDED
        and attempt.agent_id == "cheap"
        and attempt.price == 2
        and attempt.session_id
    )


async def test_cancel_stops_a_running_goal(planner_mesh: tuple[MeshClient, MeshServer]) -> None:
    client, registry = planner_mesh
    host = await host_of(registry, Adder("slow", delay=2))
    try:
        submitted = (
            await client.planner.SubmitGoal(
                planner_pb2.SubmitGoalRequest(
                    goal=planner_pb2.GoalSpec(steps=[step("a"), step("b", deps=("a",))])
                )
            )
        ).goal

        async def a_running() -> bool:
            goal = (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=submitted.goal_id))).goal
            return any(s.step_id == "a" and s.state == planner_pb2.STEP_STATE_RUNNING for s in goal.steps)

        await eventually(a_running, what="step a running")  # a running goal is what is cancelled
        cancelled = (
            await client.planner.CancelGoal(
                planner_pb2.CancelGoalRequest(goal_id=submitted.goal_id, reason="changed my mind")
            )
        ).goal
    finally:
        await host.stop()
    assert cancelled.state == planner_pb2.GOAL_STATE_CANCELLED and "changed my mind" in cancelled.error
    assert {s.state for s in cancelled.steps} == {planner_pb2.STEP_STATE_CANCELLED}


async def test_goal_deadline(planner_mesh: tuple[MeshClient, MeshServer]) -> None:
    client, registry = planner_mesh
    host = await host_of(registry, Adder("slow", delay=5))
    try:
        spec = planner_pb2.GoalSpec(steps=[step("a")], deadline=duration_pb2.Duration(nanos=300_000_000))
        goal, _ = await run_goal(client, spec)
    finally:
        await host.stop()
    assert goal.state == planner_pb2.GOAL_STATE_FAILED and "deadline" in goal.error


async def test_wide_fan_out_and_long_chain(planner_mesh: tuple[MeshClient, MeshServer]) -> None:
    client, registry = planner_mesh
    host = await host_of(registry, *(Adder(f"w{i}") for i in range(4)))
    try:
        fan = [step("root", data=1)] + [step(f"f{i}", data=1, deps=("root",)) for i in range(499)]
        chain = [step("c0", data=1)] + [step(f"c{i}", data=1, deps=(f"c{i - 1}",)) for i in range(1, 500)]
        goal, _ = await run_goal(client, planner_pb2.GoalSpec(steps=fan + chain, max_parallelism=64))
    finally:
        await host.stop()
    assert goal.state == planner_pb2.GOAL_STATE_SUCCEEDED
    outputs = {s.step_id: from_value(s.output)["sum"] for s in goal.steps}
    assert len(outputs) == 1000 and outputs["f498"] == 2 and outputs["c499"] == 500


async def test_step_deadline(planner_mesh: tuple[MeshClient, MeshServer]) -> None:
    client, registry = planner_mesh
    host = await host_of(registry, Adder("slow", delay=3))
    try:
        spec = planner_pb2.GoalSpec(
            steps=[step("a", timeout=duration_pb2.Duration(nanos=300_000_000), max_attempts=1)]
        )
        goal, _ = await run_goal(client, spec)
    finally:
        await host.stop()
    assert goal.state == planner_pb2.GOAL_STATE_FAILED
    assert "DEADLINE_EXCEEDED" in goal.steps[0].error


async def test_unknown_goal(planner_mesh: tuple[MeshClient, MeshServer]) -> None:
    client, _ = planner_mesh
    with pytest.raises(errors.NotFound):
        await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id="nope"))
    with pytest.raises(errors.NotFound):
        await client.planner.CancelGoal(planner_pb2.CancelGoalRequest(goal_id="nope"))
    with pytest.raises(errors.InvalidArgument):
        await client.planner.ListGoals(planner_pb2.ListGoalsRequest(page_size=-1))


@pytest.mark.slow
async def test_step_whose_agent_dies_is_retried_elsewhere(
    planner_mesh: tuple[MeshClient, MeshServer],
) -> None:
    client, registry = planner_mesh
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, WORKER, "--id", "a-doomed", "--registry", registry.address),
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    survivor = Adder("b-survivor")
    survivor.capabilities = ("compute",)  # type: ignore[misc]
    survivor.agent_capabilities = ("compute",)
    host = await host_of(registry, survivor)
    try:
        await eventually(lambda: _registered(client, "a-doomed"), timeout=15, what="worker registered")
        spec = planner_pb2.GoalSpec(
            steps=[
                planner_pb2.StepSpec(
                    step_id="long", capability="compute", input=value({"sleep": 3, "values": [1]})
                )
            ],
            strategy=planner_pb2.ASSIGNMENT_STRATEGY_FIRST_FIT,
        )
        goal_id = (await client.planner.SubmitGoal(planner_pb2.SubmitGoalRequest(goal=spec))).goal.goal_id

        async def running_on_doomed() -> bool:
            goal = (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=goal_id))).goal
            return (
                goal.steps[0].state == planner_pb2.STEP_STATE_RUNNING and goal.steps[0].agent_id == "a-doomed"
            )

        await eventually(running_on_doomed, what="step running on the doomed worker")
        proc.send_signal(signal.SIGKILL)
        events = [
            e async for e in client.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal_id=goal_id))
        ]
        goal = (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=goal_id))).goal
    finally:
        with contextlib.suppress(ProcessLookupError):  # already reaped
            proc.kill()
        await proc.wait()
        await host.stop()
    assert events[-1].goal_state == planner_pb2.GOAL_STATE_SUCCEEDED
    assert [a.agent_id for a in goal.steps[0].attempts] == ["a-doomed", "b-survivor"]


async def _registered(client: MeshClient, agent_id: str) -> bool:
    from mabeam.v1 import registry_pb2

    try:
        await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id))
    except errors.NotFound:
        return False
    return True


@pytest.mark.slow
async def test_killed_planner_replica_is_resumed_without_rerunning_steps(
    local_mesh: Callable[..., Awaitable[LocalMesh]],
) -> None:
    mesh = await local_mesh(
        services=("registry", "coordination", "planner"), replicas=2, extra_env={"MABEAM_SERVICE_TTL": "2"}
    )
    registry, planners = mesh.addresses("registry"), [p for p in mesh.processes if p.kind == "planner"]
    adders = [Adder(f"r{i}", delay=0.2) for i in range(2)]
    host = AgentHost(adders, registry=registry)
    await host.start()
    client = await MeshClient.connect(registry=registry, planner=[p.address for p in planners])
    try:
        chain = [step("s0")] + [step(f"s{i}", deps=(f"s{i - 1}",)) for i in range(1, 12)]
        submitted = (
            await client.planner.SubmitGoal(
                planner_pb2.SubmitGoalRequest(goal=planner_pb2.GoalSpec(steps=chain), goal_id="resumable")
            )
        ).goal

        async def some_done() -> bool:
            goal = (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id="resumable"))).goal
            return sum(s.state == planner_pb2.STEP_STATE_SUCCEEDED for s in goal.steps) >= 3

        await eventually(some_done, timeout=15, what="a few steps done")
        events, final = await kill_owner_and_follow(client, planners, "resumable")
    finally:
        await client.close()
        await host.stop()
    assert final.state == planner_pb2.GOAL_STATE_SUCCEEDED and final.resumed_count >= 1
    assert events[-1].type == planner_pb2.GOAL_EVENT_TYPE_GOAL_FINISHED
    assert from_value(final.steps[-1].output)["sum"] == 12
    # Each step ran exactly once across both replicas (a step in flight at the kill is
    # sent again with the same idempotency key, and the agent returns the earlier output).
    runs = collections.Counter(s for a in adders for s in a.steps)
    assert runs == {f"s{i}": 1 for i in range(12)}
    del submitted


async def _orphan_goal(etcd_client: Any, mesh_config: Any, goal_id: str, created_at_s: float) -> None:
    """A pending goal with no owner, as a replica that died right after storing it leaves it;
    its ``created_at`` is from that replica's clock, here ``created_at_s``."""
    from mabeam.services.planner.store import GoalStore

    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(created_at_s * 1e9))
    goal = planner_pb2.Goal(
        goal_id=goal_id,
        spec=planner_pb2.GoalSpec(steps=[step("only")]),
        state=planner_pb2.GOAL_STATE_PENDING,
        created_at=created,
    )
    assert await GoalStore(etcd_client, mesh_config).create(goal)


async def _state(client: MeshClient, goal_id: str) -> planner_pb2.Goal:
    return (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=goal_id))).goal


async def test_an_orphaned_goal_is_adopted_within_its_bound_whatever_the_clock_that_wrote_it(
    planner_mesh: tuple[MeshClient, MeshServer], etcd_client: Any, mesh_config: Any
) -> None:
    from mabeam.services.planner.server import ADOPT_AFTER_S

    client, registry = planner_mesh
    host = await host_of(registry, Adder("skew-1"))
    try:
        # Written by a replica whose clock runs an hour ahead: "created in the future".
        written = time.monotonic()
        await _orphan_goal(etcd_client, mesh_config, "from-the-future", time.time() + 3600)
        done = await eventually(
            lambda: _finished(client, "from-the-future"), timeout=ADOPT_AFTER_S + 8, what="adopted and run"
        )
        assert done.state == planner_pb2.GOAL_STATE_SUCCEEDED
        assert time.monotonic() - written <= ADOPT_AFTER_S + 8

        # Written by a replica whose clock runs an hour behind: still left to the
        # submitting replica for ADOPT_AFTER_S by this replica's own clock, not taken at once.
        written = time.monotonic()
        await _orphan_goal(etcd_client, mesh_config, "from-the-past", time.time() - 3600)
        await asyncio.sleep(ADOPT_AFTER_S / 2)
        goal = await _state(client, "from-the-past")
        if time.monotonic() - written < ADOPT_AFTER_S:
            assert goal.state == planner_pb2.GOAL_STATE_PENDING and not goal.owner
        done = await eventually(
            lambda: _finished(client, "from-the-past"), timeout=ADOPT_AFTER_S + 8, what="adopted and run"
        )
        assert done.state == planner_pb2.GOAL_STATE_SUCCEEDED
    finally:
        await host.stop()


async def _finished(client: MeshClient, goal_id: str) -> planner_pb2.Goal | None:
    goal = await _state(client, goal_id)
    return goal if goal.state == planner_pb2.GOAL_STATE_SUCCEEDED else None
