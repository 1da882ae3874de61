"""The orchestrator's pure value logic: decided values and constraints."""

from __future__ import annotations

import pytest

from mabeam.errors import InvalidArgument
from mabeam.services.orchestrator import variables
from mabeam.v1 import common_pb2, coordination_pb2, orchestrator_pb2


def test_decided_value_of_each_outcome() -> None:
    vote = coordination_pb2.Outcome(decided=True, decision="21")
    assert variables.decided_value(vote, orchestrator_pb2.BINDING_KIND_PARAMETER).number_value == 21
    assert (
        variables.decided_value(
            coordination_pb2.Outcome(decision="blue"), orchestrator_pb2.BINDING_KIND_PARAMETER
        ).string_value
        == "blue"
    )
    market = coordination_pb2.Outcome(prices={"power": 5.0})
    assert variables.decided_value(market, orchestrator_pb2.BINDING_KIND_PARAMETER).number_value == 5
    auction = coordination_pb2.Outcome(winners=["a"], price=7)
    alloc = variables.decided_value(auction, orchestrator_pb2.BINDING_KIND_RESOURCE_ALLOCATION).struct_value
    assert list(alloc["winners"]) == ["a"] and alloc["price"] == 7 and alloc["size"] == 1


def test_constraints() -> None:
    bounds = orchestrator_pb2.Constraints(min=1, max=3)
    assert variables.violation(common_pb2.Value(number_value=2), bounds) is None
    assert "above the maximum" in (variables.violation(common_pb2.Value(number_value=4), bounds) or "")
    allowed = orchestrator_pb2.Constraints(allowed_values=[common_pb2.Value(string_value="a")])
    assert variables.violation(common_pb2.Value(string_value="b"), allowed) is not None
    size = common_pb2.Value()
    size.struct_value.update({"size": 5})
    assert "above" in (variables.violation(size, bounds) or "")


@pytest.mark.parametrize("name", ["", "/x", "a b", "x" * 300])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        variables.check_name(name)


def test_adaptation_metrics_name_any_heartbeat_field_a_variable_or_session_outcomes() -> None:
    assert variables.parse_metric("agents.load.mean") == ("agents", "load", "mean")
    assert variables.parse_metric("agents.queue.mean") == ("agents", "queue_length", "mean")  # the old name
    assert variables.parse_metric("agents.memory_bytes.max") == ("agents", "memory_bytes", "max")
    assert variables.parse_metric("agents.cpu_fraction.sum") == ("agents", "cpu_fraction", "sum")
    assert variables.parse_metric("var:room/temp") == ("var", "room/temp", "")
    assert variables.parse_metric("sessions:first_price.decided_ratio") == (
        "sessions",
        "first_price",
        "decided_ratio",
    )
    for bad in ("agents.load", "agents.color.mean", "agents.load.median", "var:", "sessions:x", "load", ""):
        with pytest.raises(InvalidArgument) as info:
            variables.parse_metric(bad, "binding.adaptation.metric")
        assert info.value.field == "binding.adaptation.metric"
    assert variables.aggregate([1.0, 2.0, 6.0], "mean") == 3.0
    assert variables.aggregate([1.0, 2.0, 6.0], "sum") == 9.0
    assert variables.aggregate([1.0, 2.0, 6.0], "min") == 1.0
    assert variables.aggregate([], "max") is None
    decided = coordination_pb2.Session(
        participants=["a", "b"], outcome=coordination_pb2.Outcome(decided=True)
    )
    undecided = coordination_pb2.Session(participants=["a", "b", "c", "d"])
    undecided.excluded.add(agent_id="c")
    assert variables.session_statistic([decided, undecided], "decided_ratio") == 0.5
    assert variables.session_statistic([decided, undecided], "excluded_mean") == 0.5
    assert variables.session_statistic([decided, undecided], "participants_mean") == 3.0
    assert variables.session_statistic([], "decided_ratio") is None
