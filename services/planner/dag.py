"""Goals as dependency graphs of steps: validation and scheduling (pure, no I/O).

A goal is valid when it has steps, every step id is unique and well formed,
every dependency names another step of the goal, and the dependencies have no
cycle. A capability no live agent offers is refused too, when the live
capabilities are given. Errors name the step (and, for a cycle, the cycle in
order: ``a -> b -> c -> a``). Everything is iterative (no recursion), linear in
steps plus edges: a 1,000-step chain validates at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

STEP_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")


class GoalInvalid(ValueError):
    """A goal that cannot run. ``code`` says why; the service maps NO_CAPABILITY to
    FAILED_PRECONDITION and every other code to INVALID_ARGUMENT."""

    def __init__(self, code: str, step_id: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.step_id = step_id
        self.message = message


@dataclass(frozen=True)
class StepSpec:
    """A step as the planner schedules it."""

    step_id: str
    capability: str
    depends_on: tuple[str, ...] = ()


@dataclass
class Plan:
    """A validated goal: its order and its edges."""

    steps: dict[str, StepSpec]
    order: list[str]  # submission order
    dependents: dict[str, list[str]] = field(default_factory=dict)

    def ready(self, done: set[str], started: set[str]) -> list[str]:
        """Steps whose dependencies are all done and that have not started, in submission order."""
        return [
            s
            for s in self.order
            if s not in started and s not in done and all(d in done for d in self.steps[s].depends_on)
        ]

    def descendants(self, step_id: str) -> list[str]:
        """Every step that depends on ``step_id``, directly or not (to skip after a failure)."""
        seen: set[str] = set()
        todo = list(self.dependents.get(step_id, []))
        while todo:
            s = todo.pop()
            if s not in seen:
                seen.add(s)
                todo.extend(self.dependents.get(s, []))
        return [s for s in self.order if s in seen]


def validate(steps: Sequence[StepSpec], live_capabilities: Iterable[str] | None = None) -> Plan:
    """Check a goal and return its plan; raise :class:`GoalInvalid` naming the step."""
    if not steps:
        raise GoalInvalid("EMPTY_GOAL", "", "a goal needs at least one step")
    by_id: dict[str, StepSpec] = {}
    for index, step in enumerate(steps):
        if not step.step_id:
            raise GoalInvalid("EMPTY_STEP_ID", "", f"steps[{index}] has no step_id")
        if not STEP_ID_RE.match(step.step_id):
            raise GoalInvalid(
                "EMPTY_STEP_ID",
                step.step_id,
                f"step id {step.step_id[:140]!r} must be 1-128 characters of [A-Za-z0-9._:-]",
            )
        if step.step_id in by_id:
            raise GoalInvalid("DUPLICATE_STEP", step.step_id, f"step {step.step_id!r} appears twice")
        if not step.capability:
            raise GoalInvalid("EMPTY_CAPABILITY", step.step_id, f"step {step.step_id!r} has no capability")
        by_id[step.step_id] = step
    dependents: dict[str, list[str]] = {s: [] for s in by_id}
    for step in steps:
        for dep in step.depends_on:
            if dep == step.step_id:
                raise GoalInvalid("SELF_DEPENDENCY", step.step_id, f"step {step.step_id!r} depends on itself")
            if dep not in by_id:
                raise GoalInvalid(
                    "MISSING_DEPENDENCY",
                    step.step_id,
                    f"step {step.step_id!r} depends on {dep!r}, which is not a step of the goal",
                )
            dependents[dep].append(step.step_id)
    cycle = find_cycle(by_id)
    if cycle:
        raise GoalInvalid("CYCLE", cycle[0], "cycle: " + " -> ".join(cycle))
    if live_capabilities is not None:
        live = set(live_capabilities)
        for step in steps:
            if step.capability not in live:
                raise GoalInvalid(
                    "NO_CAPABILITY",
                    step.step_id,
                    f"step {step.step_id!r} needs capability {step.capability!r}, which no live agent offers",
                )
    return Plan(by_id, [s.step_id for s in steps], dependents)


def find_cycle(steps: dict[str, StepSpec]) -> list[str]:
    """A cycle as ``[a, b, ..., a]`` where each depends on the next, or [] (iterative DFS)."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(steps, white)
    for root in steps:
        if color[root] != white:
            continue
        path: list[str] = []
        stack: list[tuple[str, int]] = [(root, 0)]
        while stack:
            node, index = stack.pop()
            if index == 0:
                color[node] = grey
                path.append(node)
            deps = steps[node].depends_on
            if index < len(deps):
                stack.append((node, index + 1))
                nxt = deps[index]
                if color[nxt] == grey:
                    return [*path[path.index(nxt) :], nxt]
                if color[nxt] == white:
                    stack.append((nxt, 0))
            else:
                color[node] = black
                path.pop()
    return []
