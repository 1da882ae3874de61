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
