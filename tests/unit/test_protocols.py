"""The pure coordination protocols: unit and property tests, no network."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mabeam.services.coordination.protocols import auction, consensus, contract_net, iterative, market
from mabeam.services.coordination.protocols.errors import ProtocolParamError

amounts = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)


def bids_of(values: list[float]) -> list[auction.Bid]:
    return [auction.Bid(f"a{i}", v, i) for i, v in enumerate(values)]


# -- sealed-bid auctions ----------------------------------------------------------------


@given(st.lists(amounts, min_size=1, max_size=30), amounts)
def test_vickrey_winner_pays_the_second_highest_or_the_reserve(values: list[float], reserve: float) -> None:
    result = auction.run(bids_of(values), second_price=True, reserve=reserve)
    ranked = sorted(values, reverse=True)
    if ranked[0] < reserve:
        assert result.winner is None
        return
    assert result.winner is not None and values[int(result.winner[1:])] == ranked[0]
    assert result.price == max(ranked[1] if len(ranked) > 1 else 0.0, reserve)


@given(amounts, amounts, st.lists(amounts, max_size=20), amounts)
def test_truthful_bidding_is_never_worse_than_shading(
    value: float, shaded: float, others: list[float], reserve: float
) -> None:
    def utility(bid: float) -> float:
        # Our bidder arrives last: ties go to the others, the harshest case for it.
        bids = [auction.Bid(f"o{i}", b, i) for i, b in enumerate(others)] + [
            auction.Bid("me", bid, len(others))
        ]
        result = auction.run(bids, second_price=True, reserve=reserve)
        return value - result.price if result.winner == "me" else 0.0

    assert utility(value) >= utility(shaded) - 1e-9


@given(st.lists(amounts, min_size=1, max_size=30, unique=True))
def test_first_price_winner_pays_its_bid_whatever_the_order(values: list[float]) -> None:
    shuffled = values[:]
    random.Random(len(values)).shuffle(shuffled)
    a = auction.run(bids_of(values), second_price=False)
    b = auction.run(
        [auction.Bid(f"a{values.index(v)}", v, i) for i, v in enumerate(shuffled)], second_price=False
    )
    assert a.winner == b.winner and a.price == b.price == max(values)


def test_ties_go_to_the_earlier_bid_then_the_agent_id() -> None:
    assert auction.run([auction.Bid("b", 5, 1), auction.Bid("a", 5, 2)], second_price=False).winner == "b"
    assert auction.run([auction.Bid("b", 5, 0), auction.Bid("a", 5, 0)], second_price=False).winner == "a"


def test_malformed_bids_are_rejected_with_a_reason() -> None:
    result = auction.run(
        [auction.Bid("nan", math.nan), auction.Bid("neg", -1), auction.Bid("ok", 3)], second_price=True
    )
    assert result.winner == "ok" and result.price == 0
    assert set(result.rejected) == {"nan", "neg"}


def test_negative_reserve_names_the_field() -> None:
    with pytest.raises(ProtocolParamError) as info:
        auction.run([], second_price=True, reserve=-1)
    assert info.value.field == "reserve_price"


# -- English and Dutch ----------------------------------------------------------------------


def run_english(values: dict[str, float], **kw: float) -> iterative.PriceOutcome:
    machine = iterative.EnglishAuction(list(values), **kw)  # type: ignore[arg-type]
    while not machine.done:
        _, price, asked = machine.announce()
        machine.receive([a for a in asked if values[a] >= price])
    return machine.outcome


def test_english_auction_ends_when_one_bidder_remains() -> None:
    result = run_english({"a": 10, "b": 25, "c": 30}, start_price=0, increment=5)
    assert result.winner == "c" and result.price == 30  # b stays in at 25, drops at 30


def test_english_auction_all_drop_together_goes_to_the_previous_price() -> None:
    result = run_english({"a": 12, "b": 12}, start_price=0, increment=5)
    assert result.winner == "a" and result.price == 10


@given(st.dictionaries(st.sampled_from("abcdefgh"), st.floats(min_value=0, max_value=100), min_size=2))
def test_english_winner_values_it_at_least_the_price(values: dict[str, float]) -> None:
    result = run_english(values, start_price=0, increment=1, max_rounds=1000)
    if result.winner is not None:
        assert values[result.winner] >= result.price


def test_dutch_first_acceptance_wins_and_floor_ends_it() -> None:
    machine = iterative.DutchAuction(["a", "b"], start_price=50, decrement=10)
    values = {"a": 25, "b": 35}
    while not machine.done:
        _, price, asked = machine.announce()
        machine.receive([x for x in asked if values[x] >= price])
    assert machine.outcome.winner == "b" and machine.outcome.price == 30
    with pytest.raises(ProtocolParamError) as info:
        iterative.DutchAuction(["a"], start_price=5, floor_price=10)
    assert info.value.field == "start_price"


# -- Contract Net --------------------------------------------------------------------------


def test_contract_net_awards_lowest_cost_and_rejects_the_rest() -> None:
    result = contract_net.award(
        [contract_net.Proposal("a", 5), contract_net.Proposal("b", 3), contract_net.Proposal("c", math.inf)]
    )
    assert (
        result.winner == "b"
        and result.price == 3
        and result.rejected_proposals == ["a"]
        and "c" in result.invalid
    )


# -- markets ----------------------------------------------------------------------------------


@given(
    st.floats(min_value=0.1, max_value=0.9),
    st.floats(min_value=0.1, max_value=0.9),
    st.floats(min_value=0.5, max_value=3),
    st.floats(min_value=0.5, max_value=3),
)
@settings(max_examples=25, deadline=None)
def test_tatonnement_finds_the_cobb_douglas_equilibrium(a1: float, a2: float, ex1: float, ey2: float) -> None:
    # Consumer 1 owns only x, consumer 2 only y; consumer i spends share a_i on x.
    # Closed form: p_x / p_y = (a2 * ey2) / ((1 - a1) * ex1).
    machine = market.Tatonnement(
        ["x", "y"], initial_prices={"x": 1.0, "y": 1.0}, step=0.2, tolerance=1e-6, max_rounds=20000
    )
    consumers = [(a1, ex1, 0.0), (a2, 0.0, ey2)]
    while not machine.done:
        _, p = machine.announce()
        demands = []
        for share, ex, ey in consumers:
            wealth = p["x"] * ex + p["y"] * ey
            demands.append({"x": share * wealth / p["x"] - ex, "y": (1 - share) * wealth / p["y"] - ey})
        machine.receive(demands)
    assert machine.outcome is not None and machine.outcome.converged, machine.outcome
    expected = (a2 * ey2) / ((1 - a1) * ex1)
    assert machine.outcome.prices["x"] / machine.outcome.prices["y"] == pytest.approx(expected, rel=1e-3)


def test_tatonnement_reports_non_convergence() -> None:
    machine = market.Tatonnement(["x"], step=0.1, tolerance=1e-9, max_rounds=2)
    while not machine.done:
        machine.announce()
        machine.receive([{"x": 5.0}])
    assert machine.outcome is not None and not machine.outcome.converged
    assert (
        "did not converge in 2 rounds" in machine.outcome.reason and machine.outcome.excess_demand["x"] == 5.0
    )


@pytest.mark.parametrize(
    ("kw", "field"),
    [({"step": 0}, "step"), ({"tolerance": -1}, "tolerance"), ({"max_rounds": 0}, "max_rounds")],
)
def test_market_parameters_name_the_field(kw: dict[str, float], field: str) -> None:
    with pytest.raises(ProtocolParamError) as info:
        market.Tatonnement(["x"], **kw)  # type: ignore[arg-type]
    assert info.value.field == field


orders = st.lists(
    st.tuples(
        st.sampled_from(["buy", "sell"]),
        st.floats(min_value=0, max_value=100),
        st.floats(min_value=0.1, max_value=10),
    ),
    max_size=25,
)


@given(orders)
def test_call_market_never_trades_beyond_a_limit_and_balances(raw: list[tuple[str, float, float]]) -> None:
    book = [market.Order(f"o{i}", side, price, qty, i) for i, (side, price, qty) in enumerate(raw)]
    result = market.clear(book)
    if result.price is None:
        assert result.volume == 0
        return
    limits = {o.agent_id: o for o in book}
    for trade in result.trades:
        order = limits[trade["agent_id"]]
        if order.side == "buy":
            assert order.price >= result.price
        else:
            assert order.price <= result.price
        assert trade["quantity"] <= order.quantity + 1e-9
    bought = sum(t["quantity"] for t in result.trades if t["side"] == "buy")
    sold = sum(t["quantity"] for t in result.trades if t["side"] == "sell")
    assert bought == pytest.approx(sold) == pytest.approx(result.volume)


# -- consensus -----------------------------------------------------------------------------------


@given(
    st.lists(st.sampled_from(["yes", "no", None]), min_size=1, max_size=30),
    st.floats(min_value=0.1, max_value=10),
)
def test_equal_weights_give_plain_majority(choices: list[str | None], weight: float) -> None:
    eligible = [f"v{i}" for i in range(len(choices))]
    votes = [consensus.Vote(a, c or "", c is None) for a, c in zip(eligible, choices, strict=True)]
    plain = consensus.decide(votes, eligible, rule="majority")
    weighted = consensus.decide(votes, eligible, rule="majority", weights={a: weight for a in eligible})
    assert plain.decision == weighted.decision


def test_quorum_abstention_and_ties() -> None:
    eligible = ["a", "b", "c", "d"]
    no_quorum = consensus.decide([consensus.Vote("a", "yes")], eligible, quorum=0.5)
    assert no_quorum.decision is None and "quorum" in no_quorum.reason
    abstained = consensus.decide(
        [consensus.Vote("a", "yes"), consensus.Vote("b", abstain=True)], eligible, quorum=0.5
    )
    assert abstained.decision == "yes"
    tie = [consensus.Vote("a", "yes"), consensus.Vote("b", "no")]
    assert consensus.decide(tie, eligible).decision is None
    assert consensus.decide(tie, eligible, rule="plurality", tie_rule="first_option").decision == "yes"
    assert consensus.decide(tie, eligible, rule="unanimity").decision is None


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"rule": "supermajority", "threshold": 0.5}, "threshold"),
        ({"quorum": 1.5}, "quorum"),
        ({"options": ["x"]}, "options"),
        ({"rule": "dice"}, "rule"),
    ],
)
def test_consensus_parameters_name_the_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(ProtocolParamError) as info:
        consensus.decide([], ["a"], **kw)  # type: ignore[arg-type]
    assert info.value.field == field


def test_supermajority_threshold() -> None:
    eligible = ["a", "b", "c"]
    votes = [consensus.Vote("a", "yes"), consensus.Vote("b", "yes"), consensus.Vote("c", "no")]
    assert consensus.decide(votes, eligible, rule="supermajority", threshold=0.66).decision == "yes"
    assert consensus.decide(votes, eligible, rule="supermajority", threshold=0.7).decision is None
