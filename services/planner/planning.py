"""Planning inside a goal's run: objectives, expandable steps, agents started for a step.

A mixin of :class:`~mabeam.services.planner.runner.GoalRunner` (it uses the
runner's goal, specs, statuses, outputs, assigner and progress log). An
objective is planned when the goal starts (:meth:`Planning._plan_objective`):
an agent of its capability answers ``AgentService.Plan``, the plan is
validated as submitted steps are (:func:`dag.validate` with the live
capabilities) and becomes the goal's ``spec.steps``, recorded with a
``GOAL_PLANNED`` event. An expandable step is expanded when it is ready
(:meth:`Planning._expand`): its sub-steps ``<step>:<id>`` are appended to
``spec.steps``, the first ones taking the step's dependencies, and the step
then depends on the sub-plan's last steps and succeeds with their outputs
(:meth:`Planning._join`). With ``may_start_agents`` a capability nobody
offers gets an agent of the catalog kind of that name
(:mod:`.launcher`).

Bounds: MAX_PLAN_STEPS for an objective's plan, MAX_EXPANSION_STEPS per
expansion, MAX_EXPANSION_DEPTH expansions deep, MAX_GOAL_STEPS a goal,
MAX_PLAN_BYTES a plan and MAX_GOAL_SPEC_BYTES the goal's steps serialized
(the goal's summary is one etcd put).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import struct_pb2

from mabeam import errors
from mabeam.services.planner import dag
from mabeam.services.planner.assignment import Assigner, Assignment
from mabeam.services.planner.progress import ProgressLog, Put
from mabeam.v1 import agent_pb2, agent_pb2_grpc, planner_pb2

if TYPE_CHECKING:
    from mabeam.services.planner.server import PlannerServicer

DEFAULT_ATTEMPTS = 3
DEFAULT_STEP_TIMEOUT_S = 30.0

# Planning agents (AgentService.Plan): an objective's plan, an expansion, a goal grown by expansions.
MAX_PLAN_STEPS = 1000
MAX_EXPANSION_STEPS = 100
MAX_EXPANSION_DEPTH = 3
MAX_GOAL_STEPS = 1000
# A plan's steps serialized, at most (the goal's summary, which holds them, is one etcd put).
MAX_PLAN_BYTES = 256 * 1024
MAX_GOAL_SPEC_BYTES = 1024 * 1024


class PlanInvalid(Exception):
    """A plan the planner refuses (the message names why); the goal or the step fails with it."""


def seconds(d: Any, default: float) -> float:
    value = float(d.seconds + d.nanos / 1e9)
    return value if value > 0 else default


class Planning:
    """The planning half of a goal's runner (see the module)."""

    planner: PlannerServicer
    goal: planner_pb2.Goal
    goal_id: str
    spec: planner_pb2.GoalSpec
    specs: dict[str, planner_pb2.StepSpec]
    plan: dag.Plan
    statuses: dict[str, planner_pb2.StepStatus]
    outputs: dict[str, struct_pb2.Value]
    done_count: int
    progress: ProgressLog
    assigner: Assigner
    expanded: set[str]
    depth: dict[str, int]

    def _graph(self) -> dag.Plan:
        return dag.validate(
            [dag.StepSpec(s.step_id, s.capability, tuple(s.depends_on)) for s in self.spec.steps]
        )

    def _goal_puts(self) -> list[Put]:
        raise NotImplementedError

    def _step_put(self, step_id: str) -> tuple[bytes, bytes]:
        raise NotImplementedError

    # -- agents the planner starts (GoalSpec.may_start_agents) ---------------------------

    async def _assign(
        self,
        spec: planner_pb2.StepSpec,
        excluded: set[str],
        in_flight: planner_pb2.StepAttempt | None = None,
    ) -> Assignment | None:
        """The assigner's choice; when nobody offers the capability and the goal may, an agent started for it."""
        assignment = await self.assigner.assign(spec, excluded, in_flight)
        if assignment is not None or not self.spec.may_start_agents:
            return assignment
        launcher = self.planner.launcher
        if not await launcher.can_start(spec.capability):
            return None
        agent_id = await launcher.start(spec.capability)
        if agent_id not in self.goal.plan.started_agents:
            self.goal.plan.started_agents.append(agent_id)
            await self.progress.write(
                [
                    *self._goal_puts(),
                    self.progress.event(
                        planner_pb2.GOAL_EVENT_TYPE_AGENT_STARTED, step_id=spec.step_id, agent_id=agent_id
                    ),
                ]
            )
        self.assigner.forget(spec.capability)
        return await self.assigner.assign(spec, excluded)

    async def _startable(self, capabilities: set[str]) -> set[str]:
        """Which of ``capabilities`` the planner may start an agent for (the goal allows it, a catalog kind)."""
        if not self.spec.may_start_agents:
            return set()
        return {c for c in capabilities if await self.planner.launcher.can_start(c)}

    # -- planning agents -----------------------------------------------------------------

    async def _live(self, capabilities: set[str]) -> set[str]:
        """Which of ``capabilities`` a live agent offers now (or, when the goal may, the planner can start)."""
        live = {c for c in capabilities if await self.assigner.candidates(c)}
        return live | await self._startable(capabilities - live)

    async def _ask_plan(
        self,
        capability: str,
        step_id: str,
        value: Any,
        depth: int,
        max_steps: int,
        attempts: int,
        timeout: float,
    ) -> tuple[str, list[agent_pb2.PlannedStep]]:
        """Ask agents of ``capability`` for a plan, another agent after a failure; (agent id, steps)."""
        excluded: set[str] = set()
        why = f"no live agent offers capability {capability!r}"
        probe = planner_pb2.StepSpec(step_id=step_id or "plan", capability=capability)
        for _ in range(max(1, attempts)):
            try:
                assignment = await self._assign(probe, excluded)
            except errors.MabeamError as exc:
                raise PlanInvalid(f"no agent to plan: {exc.message}") from None
            if assignment is None or assignment.agent_id in excluded:
                break
            request = agent_pb2.PlanRequest(
                agent_id=assignment.agent_id,
                goal_id=self.goal_id,
                step_id=step_id,
                capability=capability,
                input=value,
                depth=depth,
                max_steps=max_steps,
            )
            if step_id:
                for d in self.specs[step_id].depends_on:
                    request.dependency_outputs[d].CopyFrom(self.outputs[d])
            request.deadline.FromNanoseconds(int((time.time() + timeout) * 1e9))
            stub = self.planner.pool.stub(assignment.endpoint, agent_pb2_grpc.AgentServiceStub)
            self.planner.launcher.use(assignment.agent_id)  # an agent this replica started is busy planning
            try:
                reply = await stub.Plan(request, timeout=timeout)
            except grpc.RpcError as exc:
                why = f"agent {assignment.agent_id!r} gave no plan: {exc.code().name}: {exc.details()}"
                excluded.add(assignment.agent_id)
                continue
            finally:
                self.planner.launcher.release(assignment.agent_id)
            return assignment.agent_id, list(reply.steps)
        raise PlanInvalid(why)

    async def _checked(
        self, agent_id: str, planned: list[agent_pb2.PlannedStep], most: int, prefix: str
    ) -> list[planner_pb2.StepSpec]:
        """A plan validated as a submitted goal is, as StepSpecs (ids prefixed ``prefix``)."""
        who = f"the plan of agent {agent_id!r}"
        if not planned:
            raise PlanInvalid(f"{who} has no steps")
        if len(planned) > most:
            raise PlanInvalid(f"{who} has {len(planned)} steps; at most {most}")
        size = sum(p.ByteSize() for p in planned)
        if size > MAX_PLAN_BYTES:
            raise PlanInvalid(f"{who} is {size} bytes; at most {MAX_PLAN_BYTES}")
        graph = [
            dag.StepSpec(prefix + p.step_id, p.capability, tuple(prefix + d for d in p.depends_on))
            for p in planned
        ]
        try:
            dag.validate(graph)
            dag.validate(graph, await self._live({p.capability for p in planned}))
        except dag.GoalInvalid as exc:
            raise PlanInvalid(f"{who} is invalid: {exc.message}") from None
        steps: list[planner_pb2.StepSpec] = []
        for p, g in zip(planned, graph, strict=True):
            step = planner_pb2.StepSpec(
                step_id=g.step_id,
                capability=p.capability,
                depends_on=g.depends_on,
                timeout=p.timeout,
                max_attempts=p.max_attempts,
                expandable=p.expandable,
            )
            if p.HasField("input"):
                step.input.CopyFrom(p.input)
            steps.append(step)
        return steps

    async def _plan_objective(self) -> None:
        """Ask a planning agent for the objective's steps; they become the goal's steps (recorded)."""
        objective = self.spec.objective
        agent_id, planned = await self._ask_plan(
            objective.capability,
            "",
            objective.input,
            0,
            MAX_PLAN_STEPS,
            self.spec.max_attempts or DEFAULT_ATTEMPTS,
            DEFAULT_STEP_TIMEOUT_S,
        )
        steps = await self._checked(agent_id, planned, MAX_PLAN_STEPS, "")
        self.spec.steps.extend(steps)
        self.goal.plan.agent_id = agent_id
        self.specs = {s.step_id: s for s in self.spec.steps}
        self.plan = self._graph()
        for step in steps:
            self.statuses[step.step_id] = planner_pb2.StepStatus(
                step_id=step.step_id, state=planner_pb2.STEP_STATE_PENDING
            )
        ids = struct_pb2.Value()
        ids.list_value.values.extend(struct_pb2.Value(string_value=s.step_id) for s in steps)
        await self.progress.write(
            [
                *self._goal_puts(),
                self.progress.event(planner_pb2.GOAL_EVENT_TYPE_GOAL_PLANNED, agent_id=agent_id, output=ids),
            ]
        )

    async def _expand(self, step_id: str) -> bool | list[str]:
        """Replace an expandable step by its agent's plan; the added step ids, or False (it failed)."""
        spec = self.specs[step_id]
        status = self.statuses[step_id]
        depth = self.depth.get(step_id, 0) + 1
        try:
            if depth > MAX_EXPANSION_DEPTH:
                raise PlanInvalid(f"expansions nest at most {MAX_EXPANSION_DEPTH} deep")
            room = min(MAX_EXPANSION_STEPS, MAX_GOAL_STEPS - len(self.specs))
            if room <= 0:
                raise PlanInvalid(f"the goal has {len(self.specs)} steps; at most {MAX_GOAL_STEPS}")
            agent_id, planned = await self._ask_plan(
                spec.capability,
                step_id,
                spec.input,
                depth,
                room,
                spec.max_attempts or self.spec.max_attempts or DEFAULT_ATTEMPTS,
                seconds(spec.timeout, DEFAULT_STEP_TIMEOUT_S),
            )
            steps = await self._checked(agent_id, planned, room, f"{step_id}:")
            clash = next((s.step_id for s in steps if s.step_id in self.specs), None)
            if clash is not None:
                raise PlanInvalid(f"the plan of agent {agent_id!r} adds step {clash!r}, which the goal has")
            if self.spec.ByteSize() + sum(s.ByteSize() for s in steps) > MAX_GOAL_SPEC_BYTES:
                raise PlanInvalid(f"the goal's steps would pass {MAX_GOAL_SPEC_BYTES} bytes")
        except PlanInvalid as exc:
            status.state, status.error = planner_pb2.STEP_STATE_FAILED, f"expansion failed: {exc}"
            await self.progress.write(
                [
                    self._step_put(step_id),
                    self.progress.event(
                        planner_pb2.GOAL_EVENT_TYPE_STEP_FAILED, step_id=step_id, error=status.error
                    ),
                ]
            )
            return False
        ids = [s.step_id for s in steps]
        needed = {d for s in steps for d in s.depends_on}
        for s in steps:
            if not s.depends_on:  # the plan's first steps wait for what the expanded step waited for
                s.depends_on.extend(spec.depends_on)
        sinks = [i for i in ids if i not in needed]
        self.spec.steps.extend(steps)
        self.specs = {s.step_id: s for s in self.spec.steps}
        self.specs[step_id].depends_on.extend(sinks)  # the expanded step succeeds after its plan's last steps
        self.plan = self._graph()
        self.goal.plan.expansions.add(step_id=step_id, agent_id=agent_id, depth=depth, step_ids=ids)
        self.expanded.add(step_id)
        for i in ids:
            self.depth[i] = depth
            self.statuses[i] = planner_pb2.StepStatus(step_id=i, state=planner_pb2.STEP_STATE_PENDING)
        status.state, status.agent_id, status.error = planner_pb2.STEP_STATE_RUNNING, agent_id, ""
        listed = struct_pb2.Value()
        listed.list_value.values.extend(struct_pb2.Value(string_value=i) for i in ids)
        await self.progress.write(
            [
                *self._goal_puts(),
                self._step_put(step_id),
                self.progress.event(
                    planner_pb2.GOAL_EVENT_TYPE_STEP_EXPANDED,
                    step_id=step_id,
                    agent_id=agent_id,
                    output=listed,
                ),
            ]
        )
        return ids

    async def _join(self, step_id: str) -> bool:
        """An expanded step whose plan's last steps succeeded: it succeeds, their outputs its output."""
        output = struct_pb2.Value()
        for d in self.specs[step_id].depends_on:
            if d.startswith(f"{step_id}:"):
                output.struct_value.fields[d[len(step_id) + 1 :]].CopyFrom(self.outputs[d])
        await self._succeeded(step_id, output, self.statuses[step_id].agent_id)
        return True

    async def _succeeded(self, step_id: str, output: struct_pb2.Value, agent_id: str, **event: Any) -> None:
        """``step_id`` succeeded with ``output``: its status, the goal's outputs and count of done
        steps, and the write of its status with the STEP_SUCCEEDED event (``event``: more fields)."""
        status = self.statuses[step_id]
        status.state = planner_pb2.STEP_STATE_SUCCEEDED
        status.output.CopyFrom(output)
        self.outputs[step_id] = output
        self.done_count += 1
        await self.progress.write(
            [
                self._step_put(step_id),
                self.progress.event(
                    planner_pb2.GOAL_EVENT_TYPE_STEP_SUCCEEDED,
                    step_id=step_id,
                    agent_id=agent_id,
                    output=output,
                    **event,
                ),
            ]
        )
