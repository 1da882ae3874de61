"""Agents that plan (issue 16, point 1): objectives planned by an agent, expandable steps.

Real etcd, real registry, coordination and planner services, agents on an
AgentHost; auth is on (the harness's tokens).
"""

from __future__ import annotations

import asyncio
import collections
from asyncio.subprocess import DEVNULL
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2

from harness.node_agent import start_node_agent
from harness.planners import kill_owner_and_follow
from harness.wait import eventually
from mabeam import errors
from mabeam.agent import Agent, AgentHost, from_value, to_value
from mabeam.client import MeshClient
from mabeam.runtime.mesh import LocalMesh
from mabeam.server import MeshServer
from mabeam.v1 import agent_pb2, planner_pb2, registry_pb2

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(90)


class Worker(Agent):
    """Capability "add": its input number plus every number found in its dependencies' outputs."""

    capabilities = ("add",)

    def __init__(self, agent_id: str) -> None:
        super().__init__(agent_id)
        self.ran: list[str] = []

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        self.ran.append(request.step_id)
        total = float(from_value(request.input) or 0)
        for output in request.dependency_outputs.values():
            total += _numbers(from_value(output))
        return total


def _numbers(data: Any) -> float:
    if isinstance(data, (int, float)):
        return float(data)
    if isinstance(data, dict):
        return sum(_numbers(v) for v in data.values())
    return 0.0


class Planner(Agent):
    """Capability "trip": plans the objective {"legs": N} as N chained "add" steps plus a total."""

    capabilities = ("trip",)

    def __init__(self, agent_id: str, answer: Callable[[agent_pb2.PlanRequest], Any] | None = None) -> None:
        super().__init__(agent_id)
        self.answer = answer
        self.requests: list[agent_pb2.PlanRequest] = []

    async def plan(self, request: agent_pb2.PlanRequest) -> Any:
        self.requests.append(request)
        if self.answer is not None:
            return self.answer(request)
        legs = int(from_value(request.input)["legs"])
        steps: list[dict[str, Any]] = [
            {
                "step_id": f"leg{i}",
                "capability": "add",
                "input": i,
                "depends_on": [f"leg{i - 1}"] if i else [],
            }
            for i in range(legs)
        ]
        steps.append({"step_id": "total", "capability": "add", "input": 0, "depends_on": [f"leg{legs - 1}"]})
        return steps


class Splitter(Agent):
    """Capability "split": expands a step into two "add" steps and a join; or nests forever."""

    capabilities = ("split",)

    def __init__(self, agent_id: str, *, nest: bool = False) -> None:
        super().__init__(agent_id)
        self.nest = nest
        self.requests: list[agent_pb2.PlanRequest] = []

    async def plan(self, request: agent_pb2.PlanRequest) -> Any:
        self.requests.append(request)
        if self.nest:
            return [{"step_id": "deeper", "capability": "split", "expandable": True}]
        return [
            agent_pb2.PlannedStep(step_id="x", capability="add", input=to_value(1)),
            agent_pb2.PlannedStep(step_id="y", capability="add", input=to_value(2)),
            agent_pb2.PlannedStep(step_id="z", capability="add", input=to_value(3), depends_on=["x", "y"]),
        ]


@pytest.fixture
async def hosted(
    planner_mesh: tuple[MeshClient, MeshServer],
) -> AsyncIterator[Callable[..., Awaitable[AgentHost]]]:
    hosts: list[AgentHost] = []

    async def start(*agents: Agent) -> AgentHost:
        host = AgentHost(list(agents), registry=planner_mesh[1].address)
        await host.start()
        hosts.append(host)
        return host

    yield start
    for host in hosts:
        await host.stop()


async def run(
    client: MeshClient, spec: planner_pb2.GoalSpec
) -> tuple[planner_pb2.Goal, list[planner_pb2.ExecuteGoalResponse]]:
    events = [e async for e in client.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal=spec))]
    goal = (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=events[0].goal_id))).goal
    return goal, events


def objective(capability: str, data: Any) -> planner_pb2.Objective:
    return planner_pb2.Objective(capability=capability, input=to_value(data))


def ids(value: struct_pb2.Value) -> list[str]:
    return [v.string_value for v in value.list_value.values]


async def test_an_objective_is_planned_by_an_agent_recorded_and_run(
    planner_mesh: tuple[MeshClient, MeshServer], hosted: Callable[..., Awaitable[AgentHost]]
) -> None:
    client, _ = planner_mesh
    planner, worker = Planner("planner-1"), Worker("worker-1")
    await hosted(planner, worker)
    goal, events = await run(
        client, planner_pb2.GoalSpec(name="trip", objective=objective("trip", {"legs": 3}))
    )

    assert goal.state == planner_pb2.GOAL_STATE_SUCCEEDED, goal.error
    # The plan is recorded: who planned, and the steps (in the goal's spec, with their statuses).
    assert goal.plan.agent_id == "planner-1"
    assert [s.step_id for s in goal.spec.steps] == ["leg0", "leg1", "leg2", "total"]
    assert list(goal.spec.steps[1].depends_on) == ["leg0"]
    assert [s.state for s in goal.steps] == [planner_pb2.STEP_STATE_SUCCEEDED] * 4
    assert from_value(goal.steps[3].output) == 3.0  # 0 + 1 + 2, through the chain
    assert worker.ran == ["leg0", "leg1", "leg2", "total"]
    # The planning agent was asked once, for the objective (depth 0, no step).
    (request,) = planner.requests
    assert (request.goal_id, request.step_id, request.depth) == (goal.goal_id, "", 0)
    assert from_value(request.input) == {"legs": 3}
    assert request.max_steps == 1000
    planned = [e for e in events if e.type == planner_pb2.GOAL_EVENT_TYPE_GOAL_PLANNED]
    assert len(planned) == 1 and planned[0].agent_id == "planner-1"
    assert ids(planned[0].output) == ["leg0", "leg1", "leg2", "total"]
    kinds = [e.type for e in events]
    assert kinds.index(planner_pb2.GOAL_EVENT_TYPE_GOAL_PLANNED) < kinds.index(
        planner_pb2.GOAL_EVENT_TYPE_STEP_SUCCEEDED
    )
    assert events[-1].steps_total == 4


async def test_an_invalid_plan_fails_the_goal_and_runs_nothing(
    planner_mesh: tuple[MeshClient, MeshServer], hosted: Callable[..., Awaitable[AgentHost]]
) -> None:
    client, _ = planner_mesh
    cyclic = [
        {"step_id": "a", "capability": "add", "depends_on": ["b"]},
        {"step_id": "b", "capability": "add", "depends_on": ["a"]},
    ]
    worker = Worker("worker-1")
    await hosted(Planner("planner-1", answer=lambda r: cyclic), worker)
    goal, _ = await run(client, planner_pb2.GoalSpec(objective=objective("trip", {})))
    assert goal.state == planner_pb2.GOAL_STATE_FAILED
    assert "planner-1" in goal.error and "cycle: a -> b -> a" in goal.error
    assert worker.ran == []
    assert not goal.spec.steps

    # A capability no live agent offers is refused as in a submitted goal.
    flier = Planner("planner-2", answer=lambda r: [{"step_id": "a", "capability": "fly"}])
    flier.agent_capabilities = ("fly-trip",)
    await hosted(flier)
    goal, _ = await run(client, planner_pb2.GoalSpec(objective=objective("fly-trip", {})))
    assert goal.state == planner_pb2.GOAL_STATE_FAILED
    assert "'fly'" in goal.error and "no live agent offers" in goal.error


async def test_an_agent_that_does_not_plan_fails_the_goal_saying_so(
    planner_mesh: tuple[MeshClient, MeshServer], hosted: Callable[..., Awaitable[AgentHost]]
) -> None:
    client, _ = planner_mesh
    await hosted(Worker("worker-1"))
    goal, _ = await run(client, planner_pb2.GoalSpec(objective=objective("add", {}), max_attempts=1))
    assert goal.state == planner_pb2.GOAL_STATE_FAILED
    assert "worker-1" in goal.error and "UNIMPLEMENTED" in goal.error


async def test_bad_objectives_are_refused_at_submission(
    planner_mesh: tuple[MeshClient, MeshServer], hosted: Callable[..., Awaitable[AgentHost]]
) -> None:
    client, _ = planner_mesh
    await hosted(Worker("worker-1"), Planner("planner-1"))
    submit = client.planner.SubmitGoal
    both = planner_pb2.GoalSpec(
        objective=objective("trip", {}), steps=[planner_pb2.StepSpec(step_id="a", capability="add")]
    )
    with pytest.raises(errors.InvalidArgument, match=r"goal\.objective.*not both"):
        await submit(planner_pb2.SubmitGoalRequest(goal=both))
    with pytest.raises(errors.InvalidArgument, match=r"goal\.objective.capability"):
        await submit(planner_pb2.SubmitGoalRequest(goal=planner_pb2.GoalSpec(objective=objective("", {}))))
    big = planner_pb2.GoalSpec(objective=objective("trip", {"blob": "x" * 70_000}))
    with pytest.raises(errors.InvalidArgument, match=r"goal\.objective.input.*65536"):
        await submit(planner_pb2.SubmitGoalRequest(goal=big))
    with pytest.raises(errors.FailedPrecondition, match="'nobody-plans'"):
        await submit(
            planner_pb2.SubmitGoalRequest(goal=planner_pb2.GoalSpec(objective=objective("nobody-plans", {})))
        )


async def test_an_expandable_step_is_replaced_by_its_agents_plan(
    planner_mesh: tuple[MeshClient, MeshServer], hosted: Callable[..., Awaitable[AgentHost]]
) -> None:
    client, _ = planner_mesh
    splitter, worker = Splitter("splitter-1"), Worker("worker-1")
    await hosted(splitter, worker)
    spec = planner_pb2.GoalSpec(
        steps=[
            planner_pb2.StepSpec(step_id="prep", capability="add", input=to_value(10)),
            planner_pb2.StepSpec(
                step_id="big", capability="split", input=to_value("go"), depends_on=["prep"], expandable=True
            ),
            planner_pb2.StepSpec(step_id="final", capability="add", input=to_value(0), depends_on=["big"]),
        ]
    )
    goal, events = await run(client, spec)
    assert goal.state == planner_pb2.GOAL_STATE_SUCCEEDED, goal.error
    states = {s.step_id: s for s in goal.steps}
    assert set(states) == {"prep", "big", "final", "big:x", "big:y", "big:z"}
    # x and y got prep's output (10): x = 11, y = 12; z = 3 + 11 + 12 = 26; big's output is {z: 26}.
    assert from_value(states["big:z"].output) == 26.0
    assert from_value(states["big"].output) == {"z": 26.0}
    assert from_value(states["final"].output) == 26.0
    assert sorted(worker.ran) == ["big:x", "big:y", "big:z", "final", "prep"]
    assert worker.ran[-1] == "final" and worker.ran[0] == "prep"
    # The expansion request carried the step, its input and its dependencies' outputs.
    (request,) = splitter.requests
    assert (request.step_id, request.depth, request.max_steps) == ("big", 1, 100)
    assert from_value(request.input) == "go"
    assert from_value(request.dependency_outputs["prep"]) == 10.0
    # Recorded: in the goal's plan and as an event.
    (expansion,) = goal.plan.expansions
    assert (expansion.step_id, expansion.agent_id, expansion.depth) == ("big", "splitter-1", 1)
    assert list(expansion.step_ids) == ["big:x", "big:y", "big:z"]
    expanded = [e for e in events if e.type == planner_pb2.GOAL_EVENT_TYPE_STEP_EXPANDED]
    assert len(expanded) == 1 and expanded[0].step_id == "big" and expanded[0].agent_id == "splitter-1"
    assert ids(expanded[0].output) == ["big:x", "big:y", "big:z"]
    assert events[-1].steps_total == 6 and events[-1].steps_done == 6


async def test_expansions_nest_at_most_three_deep(
    planner_mesh: tuple[MeshClient, MeshServer], hosted: Callable[..., Awaitable[AgentHost]]
) -> None:
    client, _ = planner_mesh
    splitter = Splitter("splitter-1", nest=True)
    await hosted(splitter, Worker("worker-1"))
    spec = planner_pb2.GoalSpec(
        steps=[
            planner_pb2.StepSpec(step_id="s", capability="split", expandable=True),
            planner_pb2.StepSpec(step_id="after", capability="add", depends_on=["s"]),
        ]
    )
    goal, events = await run(client, spec)
    assert goal.state == planner_pb2.GOAL_STATE_FAILED
    assert [r.depth for r in splitter.requests] == [1, 2, 3]
    assert [e.depth for e in goal.plan.expansions] == [1, 2, 3]
    deepest = "s:deeper:deeper:deeper"
    states = {s.step_id: s for s in goal.steps}
    assert states[deepest].state == planner_pb2.STEP_STATE_FAILED
    assert "at most 3 deep" in states[deepest].error
    assert f"step {deepest!r} failed" in goal.error
    assert states["after"].state == planner_pb2.STEP_STATE_SKIPPED
    assert len([e for e in events if e.type == planner_pb2.GOAL_EVENT_TYPE_STEP_EXPANDED]) == 3


async def test_the_javascript_agent_plans_an_objective(planner_mesh: tuple[MeshClient, MeshServer]) -> None:
    client, registry = planner_mesh
    js = await start_node_agent(
        "--id", "js-planner", "--capabilities", "compute,plan-sum", registry=registry.address, stdout=DEVNULL
    )
    try:

        async def registered() -> bool:
            listed = await client.registry.ListAgents(registry_pb2.ListAgentsRequest(capability="plan-sum"))
            return any(a.agent_id == "js-planner" for a in listed.agents)

        await eventually(registered, timeout=20, what="the JavaScript agent registered")
        spec = planner_pb2.GoalSpec(objective=objective("plan-sum", {"values": [1, 2, 4]}))
        goal, events = await run(client, spec)
        assert goal.state == planner_pb2.GOAL_STATE_SUCCEEDED, goal.error
        assert goal.plan.agent_id == "js-planner"
        assert [s.step_id for s in goal.spec.steps] == ["part0", "part1", "part2", "total"]
        assert list(goal.spec.steps[3].depends_on) == ["part0", "part1", "part2"]
        # The JavaScript agent ran the steps too (its only "compute" peer): total = 1 + 2 + 4.
        assert from_value(goal.steps[3].output)["sum"] == 7.0
        assert {s.agent_id for s in goal.steps} == {"js-planner"}
        assert any(e.type == planner_pb2.GOAL_EVENT_TYPE_GOAL_PLANNED for e in events)
        # Asked for more steps than it may give, it refuses and the goal fails saying so.
        spec = planner_pb2.GoalSpec(objective=objective("plan-sum", {"values": []}), max_attempts=1)
        goal, _ = await run(client, spec)
        assert goal.state == planner_pb2.GOAL_STATE_FAILED and "INVALID_ARGUMENT" in goal.error
    finally:
        js.terminate()
        await js.wait()


def readme_planner() -> type[Agent]:
    """The README's planning agent, as written there."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Planning agents") :]
    code = section[section.index("```python\n") + 10 : section.index("```\n", section.index("```python"))]
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)
    planner: type[Agent] = scope["TripPlanner"]
    return planner


async def test_the_readme_planning_agent_plans(
    planner_mesh: tuple[MeshClient, MeshServer], hosted: Callable[..., Awaitable[AgentHost]]
) -> None:
    client, _ = planner_mesh

    class Computer(Worker):
        capabilities = ("compute",)

    await hosted(readme_planner()("trip-planner"), Computer("computer-1"))
    goal, _ = await run(client, planner_pb2.GoalSpec(objective=objective("plan-trip", {"legs": 3})))
    assert goal.state == planner_pb2.GOAL_STATE_SUCCEEDED, goal.error
    assert [s.step_id for s in goal.spec.steps] == ["leg0", "leg1", "leg2", "total"]
    assert from_value(goal.steps[3].output) == 3.0  # 0 + 1 + 2


def test_the_readme_javascript_command_is_the_one_tested() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "node examples/node-agent/agent.js --id js-planner --capabilities compute,plan-sum" in readme


class SlowWorker(Worker):
    """A Worker that takes 0.2 s a step."""

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        await asyncio.sleep(0.2)
        return await super().execute_step(request)


@pytest.mark.slow
async def test_a_planned_and_expanded_goal_resumes_without_planning_again(
    local_mesh: Callable[..., Awaitable[LocalMesh]],
) -> None:
    mesh = await local_mesh(
        services=("registry", "coordination", "planner"), replicas=2, extra_env={"MABEAM_SERVICE_TTL": "2"}
    )
    registry, planners = mesh.addresses("registry"), [p for p in mesh.processes if p.kind == "planner"]

    def plan(request: agent_pb2.PlanRequest) -> Any:
        if request.step_id:  # the expandable step: a chain of 8
            return [
                {
                    "step_id": f"c{i}",
                    "capability": "add",
                    "input": 1,
                    "depends_on": [f"c{i - 1}"] if i else [],
                }
                for i in range(8)
            ]
        return [
            {"step_id": "first", "capability": "add", "input": 1},
            {"step_id": "chain", "capability": "trip", "depends_on": ["first"], "expandable": True},
            {"step_id": "last", "capability": "add", "input": 0, "depends_on": ["chain"]},
        ]

    planner, worker = Planner("planner-1", answer=plan), SlowWorker("worker-1")
    host = AgentHost([planner, worker], registry=registry)
    await host.start()
    client = await MeshClient.connect(registry=registry, planner=[p.address for p in planners])
    try:
        spec = planner_pb2.GoalSpec(objective=objective("trip", {}))
        await client.planner.SubmitGoal(planner_pb2.SubmitGoalRequest(goal=spec, goal_id="planned"))

        async def expanded_and_going() -> bool:
            goal = (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id="planned"))).goal
            done = {s.step_id for s in goal.steps if s.state == planner_pb2.STEP_STATE_SUCCEEDED}
            return len(goal.plan.expansions) == 1 and {"chain:c0", "chain:c1"} <= done

        await eventually(expanded_and_going, timeout=20, what="the plan expanded and two sub-steps done")
        events, final = await kill_owner_and_follow(client, planners, "planned")
    finally:
        await client.close()
        await host.stop()
    assert final.state == planner_pb2.GOAL_STATE_SUCCEEDED, final.error
    assert final.resumed_count >= 1 and events[-1].type == planner_pb2.GOAL_EVENT_TYPE_GOAL_FINISHED
    # The survivor ran the recorded plan: nobody was asked to plan again.
    assert [(r.step_id, r.depth) for r in planner.requests] == [("", 0), ("chain", 1)]
    assert len(final.plan.expansions) == 1 and final.plan.agent_id == "planner-1"
    # Each step ran once (a step in flight at the kill is answered from its idempotency key).
    assert collections.Counter(worker.ran) == {"first": 1, "last": 1, **{f"chain:c{i}": 1 for i in range(8)}}
    # first = 1; c0 = 1 + 1; each next adds 1: c7 = 9; chain = {c7: 9}; last = 9.
    assert from_value({s.step_id: s for s in final.steps}["last"].output) == 9.0


async def test_an_expansion_beyond_its_size_fails_the_step_naming_the_limit(
    planner_mesh: tuple[MeshClient, MeshServer], hosted: Callable[..., Awaitable[AgentHost]]
) -> None:
    client, _ = planner_mesh
    many = [{"step_id": f"s{i}", "capability": "add"} for i in range(101)]
    big = Planner("planner-1", answer=lambda r: many)
    await hosted(big, Worker("worker-1"))
    spec = planner_pb2.GoalSpec(
        steps=[planner_pb2.StepSpec(step_id="huge", capability="trip", expandable=True)], max_attempts=1
    )
    goal, events = await run(client, spec)
    assert goal.state == planner_pb2.GOAL_STATE_FAILED
    (request,) = big.requests
    assert request.max_steps == 100  # the agent was told the limit
    assert "has 101 steps; at most 100" in goal.steps[0].error
    assert not goal.plan.expansions and len(goal.spec.steps) == 1
    assert not [e for e in events if e.type == planner_pb2.GOAL_EVENT_TYPE_STEP_EXPANDED]


def test_a_goal_file_may_give_an_objective(tmp_path: Path) -> None:
    from mabeam.cli.goal import load_goal

    path = tmp_path / "trip.yaml"
    path.write_text(
        "name: trip\nmay_start_agents: true\nobjective: {capability: plan-trip, input: {legs: 3}}\n"
    )
    spec = load_goal(path)
    assert spec.objective.capability == "plan-trip" and from_value(spec.objective.input) == {"legs": 3.0}
    assert spec.may_start_agents and not spec.steps
