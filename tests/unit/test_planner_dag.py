"""Goal validation and scheduling, as pure logic (hypothesis over random graphs)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mabeam.services.planner.dag import GoalInvalid, StepSpec, validate


@st.composite
def dags(draw: st.DrawFn) -> list[StepSpec]:
    n = draw(st.integers(min_value=1, max_value=40))
    steps = []
    for i in range(n):
        deps = draw(st.sets(st.integers(min_value=0, max_value=i - 1), max_size=min(i, 4))) if i else set()
        steps.append(StepSpec(f"s{i}", "cap", tuple(f"s{d}" for d in sorted(deps))))
    return draw(st.permutations(steps))


@given(dags())
def test_acyclic_goals_validate_and_run_each_step_once_after_its_deps(steps: list[StepSpec]) -> None:
    plan = validate(steps)
    done: list[str] = []
    while len(done) < len(steps):
        ready = plan.ready(set(done), set(done))
        assert ready, "a valid plan always has a ready step"
        for step_id in ready:
            assert all(d in done for d in plan.steps[step_id].depends_on)
        done.append(ready[0])
    assert sorted(done) == sorted(s.step_id for s in steps)


@given(dags(), st.data())
def test_a_back_edge_is_reported_as_a_real_cycle(steps: list[StepSpec], data: st.DataObject) -> None:
    with_deps = [s for s in steps if s.depends_on]
    if not with_deps:
        return
    victim = data.draw(st.sampled_from(with_deps))
    target = victim.depends_on[0]
    # target -> ... -> victim exists already (victim depends on target); add target depends on victim.
    changed = [
        StepSpec(s.step_id, s.capability, (*s.depends_on, victim.step_id)) if s.step_id == target else s
        for s in steps
    ]
    with pytest.raises(GoalInvalid) as info:
        validate(changed)
    assert info.value.code == "CYCLE"
    cycle = info.value.message.removeprefix("cycle: ").split(" -> ")
    by_id = {s.step_id: s for s in changed}
    assert cycle[0] == cycle[-1]
    for a, b in itertools.pairwise(cycle):
        assert b in by_id[a].depends_on


def test_long_chain_and_wide_fan_out_validate() -> None:
    chain = [StepSpec("c0", "x")] + [StepSpec(f"c{i}", "x", (f"c{i - 1}",)) for i in range(1, 5000)]
    fan = [StepSpec("root", "x")] + [StepSpec(f"f{i}", "x", ("root",)) for i in range(5000)]
    assert len(validate(chain).order) == 5000 and len(validate(fan).order) == 5001


@pytest.mark.parametrize(
    ("steps", "code", "step"),
    [
        ([], "EMPTY_GOAL", ""),
        ([StepSpec("a", "x"), StepSpec("a", "x")], "DUPLICATE_STEP", "a"),
        ([StepSpec("a", "x", ("zz",))], "MISSING_DEPENDENCY", "a"),
        ([StepSpec("a", "x", ("a",))], "SELF_DEPENDENCY", "a"),
        ([StepSpec("bad id", "x")], "EMPTY_STEP_ID", "bad id"),
    ],
)
def test_each_error_names_the_step(steps: list[StepSpec], code: str, step: str) -> None:
    with pytest.raises(GoalInvalid) as info:
        validate(steps)
    assert info.value.code == code and info.value.step_id == step


def test_missing_capability() -> None:
    with pytest.raises(GoalInvalid) as info:
        validate([StepSpec("a", "fly")], live_capabilities={"walk"})
    assert info.value.code == "NO_CAPABILITY" and "'fly'" in info.value.message


def test_descendants() -> None:
    plan = validate(
        [StepSpec("a", "x"), StepSpec("b", "x", ("a",)), StepSpec("c", "x", ("b",)), StepSpec("d", "x")]
    )
    assert plan.descendants("a") == ["b", "c"] and plan.descendants("d") == []
