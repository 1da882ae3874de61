"""The orchestrator's pure value logic: decided values and constraints."""

from __future__ import annotations

import pytest

from mabeam.errors import InvalidArgument
from mabeam.services.orchestrator import variables as V
from mabeam.v1 import common_pb2, coordination_pb2
from mabeam.v1 import orchestrator_pb2 as O


def test_decided_value_of_each_outcome() -> None:
    vote = coordination_pb2.Outcome(decided=True, decision="21")
    assert V.decided_value(vote, O.BINDING_KIND_PARAMETER).number_value == 21
    assert (
        V.decided_value(coordination_pb2.Outcome(decision="blue"), O.BINDING_KIND_PARAMETER).string_value
        == "blue"
    )
    market = coordination_pb2.Outcome(prices={"power": 5.0})
    assert V.decided_value(market, O.BINDING_KIND_PARAMETER).number_value == 5
    auction = coordination_pb2.Outcome(winners=["a"], price=7)
    alloc = V.decided_value(auction, O.BINDING_KIND_RESOURCE_ALLOCATION).struct_value
    assert list(alloc["winners"]) == ["a"] and alloc["price"] == 7 and alloc["size"] == 1


def test_constraints() -> None:
    bounds = O.Constraints(min=1, max=3)
    assert V.violation(common_pb2.Value(number_value=2), bounds) is None
    assert "above the maximum" in (V.violation(common_pb2.Value(number_value=4), bounds) or "")
    allowed = O.Constraints(allowed_values=[common_pb2.Value(string_value="a")])
    assert V.violation(common_pb2.Value(string_value="b"), allowed) is not None
    size = common_pb2.Value()
    size.struct_value.update({"size": 5})
    assert "above" in (V.violation(size, bounds) or "")


@pytest.mark.parametrize("name", ["", "/x", "a b", "x" * 300])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        V.check_name(name)
