"""How each built-in protocol runs on the engine: requests out, pure decision in.

One module on purpose, past 500 lines: the drivers are short, share the parameter
and reply helpers at the top, and the BUILTINS table at the bottom lists them all.

Each driver takes a :class:`~.engine.Session` and its parameters, runs the
rounds through the engine and decides with the pure module of
:mod:`.protocols`. Parameters are plain dicts (from the typed RPCs or from
``Run``'s Struct); a bad parameter raises ``ProtocolParamError`` naming it
before any message is sent.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from mabeam.services.coordination.engine import Session, struct
from mabeam.services.coordination.protocols import auction, consensus, contract_net, iterative, market
from mabeam.services.coordination.protocols.errors import ProtocolParamError
from mabeam.v1 import agent_pb2, coordination_pb2

Driver = Callable[[Session, dict[str, Any]], Awaitable[coordination_pb2.Outcome]]


@dataclass(frozen=True)
class Builtin:
    """A built-in protocol: its driver and what ListProtocols says of it."""

    name: str
    description: str
    iterative: bool
    parameters: dict[str, tuple[str, Any]]  # name -> (description, default; None = required)
    driver: Driver = field(compare=False)
    validate: Callable[[dict[str, Any]], object] = field(compare=False, default=lambda p: None)


def _number(params: dict[str, Any], name: str, default: float) -> float:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolParamError(name, f"must be a number (got {value!r})")
    return float(value)


def _int(params: dict[str, Any], name: str, default: int) -> int:
    value = _number(params, name, default)
    if value != int(value):
        raise ProtocolParamError(name, f"must be a whole number (got {value})")
    return int(value)


def _str(params: dict[str, Any], name: str, default: str | None = None) -> str:
    value = params.get(name, default)
    if not isinstance(value, str) or not value:
        raise ProtocolParamError(name, "is required (a string)")
    return value


def _ok(bid_check: Callable[[agent_pb2.CoordinationResponse], str | None]) -> Any:
    def check(request: agent_pb2.CoordinationRequest, response: agent_pb2.CoordinationResponse) -> str | None:
        return bid_check(response)

    return check


def _bid_problem(response: agent_pb2.CoordinationResponse) -> str | None:
    amount = response.bid.amount
    if not math.isfinite(amount) or amount < 0:
        return f"bid {amount} is not a finite number >= 0"
    return None


async def _notify(
    session: Session, winners: list[str], item: str, price: float, quantity: float = 0.0
) -> None:
    """Award the winners and reject the others (when the session asks for it)."""
    if not session.notify:
        return
    requests = []
    for agent_id in session.proto.participants:
        if agent_id in session.excluded_ids:
            continue
        request = agent_pb2.CoordinationRequest()
        if agent_id in winners:
            request.award.CopyFrom(agent_pb2.AwardNotice(item=item, price=price, quantity=quantity))
        else:
            request.reject.CopyFrom(agent_pb2.RejectNotice(reason="another agent won"))
        requests.append((agent_id, request))
    if requests and session.remaining() > 0:
        await session.round(requests)


def _active(session: Session) -> list[str]:
    return [a for a in session.proto.participants if a not in session.excluded_ids]


# -- sealed-bid auctions ------------------------------------------------------------


def _validate_sealed(p: dict[str, Any]) -> None:
    _str(p, "item")
    auction.check_reserve(_number(p, "reserve_price", 0.0))


async def _sealed(session: Session, p: dict[str, Any], second_price: bool) -> coordination_pb2.Outcome:
    item, reserve = _str(p, "item"), _number(p, "reserve_price", 0.0)
    attributes = p.get("item_attributes") or {}
    template = agent_pb2.CoordinationRequest()
    template.bid_request.item = item
    template.bid_request.reserve_price = reserve
    if attributes:
        template.bid_request.attributes.CopyFrom(struct(attributes))
    # One request for all: the engine copies it into each agent's transcript entry.
    requests = [(agent_id, template) for agent_id in _active(session)]
    replies = await session.round(requests, check=_ok(_bid_problem))
    bids = [
        auction.Bid(r.agent_id, r.response.bid.amount, r.order)
        for r in replies
        if r.exclusion is None and r.response is not None
    ]
    result = auction.run(bids, second_price=second_price, reserve=reserve)
    outcome = coordination_pb2.Outcome(decided=result.decided, reason=result.reason, price=result.price)
    if result.winner:
        outcome.winners.append(result.winner)
    outcome.details.CopyFrom(struct(result.details()))
    await _notify(session, list(outcome.winners), item, result.price)
    return outcome


async def first_price(session: Session, p: dict[str, Any]) -> coordination_pb2.Outcome:
    return await _sealed(session, p, second_price=False)


async def second_price(session: Session, p: dict[str, Any]) -> coordination_pb2.Outcome:
    return await _sealed(session, p, second_price=True)


# -- English and Dutch ---------------------------------------------------------------


def _english(p: dict[str, Any], bidders: list[str]) -> iterative.EnglishAuction:
    _str(p, "item")
    return iterative.EnglishAuction(
        bidders or ["-"],
        start_price=_number(p, "start_price", 0.0),
        increment=_number(p, "increment", 1.0),
        reserve=_number(p, "reserve_price", 0.0),
        max_rounds=_int(p, "max_rounds", 100),
    )


def _dutch(p: dict[str, Any], bidders: list[str]) -> iterative.DutchAuction:
    _str(p, "item")
    if "start_price" not in p:
        raise ProtocolParamError("start_price", "is required for a Dutch auction")
    return iterative.DutchAuction(
        bidders or ["-"],
        start_price=_number(p, "start_price", 0.0),
        decrement=_number(p, "decrement", 1.0),
        floor_price=_number(p, "floor_price", 0.0),
        max_rounds=_int(p, "max_rounds", 100),
    )


async def _price_rounds(session: Session, p: dict[str, Any], machine: Any) -> coordination_pb2.Outcome:
    item = _str(p, "item")
    while not machine.done:
        if session.remaining() <= 0:
            return coordination_pb2.Outcome(
                decided=False, reason=f"session deadline reached after {machine.round} rounds"
            )
        _, price, asked = machine.announce()
        asked = [a for a in asked if a not in session.excluded_ids]
        requests = []
        for agent_id in asked:
            request = agent_pb2.CoordinationRequest()
            request.price_quote.item = item
            request.price_quote.price = price
            request.price_quote.active_bidders = len(asked)
            requests.append((agent_id, request))
        replies = await session.round(requests, announced={"price": price, "asked": len(asked)})
        machine.receive(
            [
                r.agent_id
                for r in replies
                if r.exclusion is None and r.response is not None and r.response.price_answer.accept
            ]
        )
    result = machine.outcome
    outcome = coordination_pb2.Outcome(
        decided=result.winner is not None, reason=result.reason, price=result.price
    )
    if result.winner:
        outcome.winners.append(result.winner)
    outcome.details.CopyFrom(struct({"rounds": result.rounds}))
    await _notify(session, list(outcome.winners), item, result.price)
    return outcome


async def english(session: Session, p: dict[str, Any]) -> coordination_pb2.Outcome:
    return await _price_rounds(session, p, _english(p, _active(session)))


async def dutch(session: Session, p: dict[str, Any]) -> coordination_pb2.Outcome:
    return await _price_rounds(session, p, _dutch(p, _active(session)))


# -- Contract Net ----------------------------------------------------------------------


def _validate_cnet(p: dict[str, Any]) -> None:
    _str(p, "task")
    contract_net.award([], str(p.get("criterion", "lowest_cost")))


async def contract_net_run(session: Session, p: dict[str, Any]) -> coordination_pb2.Outcome:
    task, criterion = _str(p, "task"), str(p.get("criterion", "lowest_cost"))
    task_input = p.get("task_input") or {}
    requests = []
    for agent_id in _active(session):
        request = agent_pb2.CoordinationRequest()
        request.task_announcement.task = task
        if task_input:
            request.task_announcement.task_input.CopyFrom(struct(task_input))
        requests.append((agent_id, request))

    def problem(response: agent_pb2.CoordinationResponse) -> str | None:
        cost, quality = response.proposal.cost, response.proposal.quality
        if not math.isfinite(cost) or cost < 0:
            return f"cost {cost} is not a finite number >= 0"
        if not math.isfinite(quality) or not 0 <= quality <= 1:
            return f"quality {quality} is outside [0, 1]"
        return None

    replies = await session.round(requests, check=_ok(problem))
    proposals = [
        contract_net.Proposal(
            r.agent_id, r.response.proposal.cost, r.response.proposal.quality, order=r.order
        )
        for r in replies
        if r.exclusion is None and r.response is not None
    ]
    result = contract_net.award(proposals, criterion)
    outcome = coordination_pb2.Outcome(
        decided=result.winner is not None, reason=result.reason, price=result.price
    )
    if result.winner:
        outcome.winners.append(result.winner)
        # Contract Net always awards and rejects: that is the protocol, not a courtesy.
        notices = []
        for agent_id in [result.winner, *result.rejected_proposals]:
            request = agent_pb2.CoordinationRequest()
            if agent_id == result.winner:
                request.award.CopyFrom(agent_pb2.AwardNotice(item=task, price=result.price))
            else:
                request.reject.CopyFrom(agent_pb2.RejectNotice(reason="another proposal won"))
            notices.append((agent_id, request))
        if session.remaining() > 0:
            await session.round(notices)
    outcome.details.CopyFrom(struct({"rejected_proposals": result.rejected_proposals}))
    return outcome


# -- markets ------------------------------------------------------------------------------


def _tatonnement(p: dict[str, Any]) -> market.Tatonnement:
    goods = p.get("goods")
    if not isinstance(goods, list) or not all(isinstance(g, str) and g for g in goods):
        raise ProtocolParamError("goods", "a list of good names is required")
    prices = p.get("initial_prices") or {}
    if not isinstance(prices, dict):
        raise ProtocolParamError("initial_prices", "must map goods to prices")
    return market.Tatonnement(
        list(goods),
        initial_prices={str(k): float(v) for k, v in prices.items()},
        step=_number(p, "step", 0.1),
        tolerance=_number(p, "tolerance", 0.01),
        max_rounds=_int(p, "max_rounds", 100),
        min_price=_number(p, "min_price", 1e-4),
    )


async def tatonnement(session: Session, p: dict[str, Any]) -> coordination_pb2.Outcome:
    machine = _tatonnement(p)

    def problem(response: agent_pb2.CoordinationResponse) -> str | None:
        return machine.validate_demand(dict(response.demand.net_demand))

    while not machine.done:
        if session.remaining() <= 0:
            return coordination_pb2.Outcome(
                decided=False,
                reason=f"session deadline reached after {machine.round} rounds",
                prices=machine.prices,
            )
        _, prices = machine.announce()
        requests = []
        for agent_id in _active(session):
            request = agent_pb2.CoordinationRequest()
            request.demand_request.prices.update(prices)
            requests.append((agent_id, request))
        replies = await session.round(requests, announced={"prices": prices}, check=_ok(problem))
        machine.receive(
            [
                dict(r.response.demand.net_demand)
                for r in replies
                if r.exclusion is None and r.response is not None
            ]
        )
    result = machine.outcome
    assert result is not None
    outcome = coordination_pb2.Outcome(decided=result.converged, reason=result.reason, prices=result.prices)
    outcome.details.CopyFrom(
        struct(
            {"excess_demand": result.excess_demand, "rounds": result.rounds, "converged": result.converged}
        )
    )
    return outcome


async def call_market(session: Session, p: dict[str, Any]) -> coordination_pb2.Outcome:
    goods = p.get("goods") or []
    if not isinstance(goods, list) or len(goods) != 1 or not isinstance(goods[0], str):
        raise ProtocolParamError("goods", "a call market trades exactly one good")
    good = goods[0]
    requests = []
    for agent_id in _active(session):
        request = agent_pb2.CoordinationRequest()
        request.order_request.good = good
        requests.append((agent_id, request))
    sides = {agent_pb2.ORDER_SIDE_BUY: "buy", agent_pb2.ORDER_SIDE_SELL: "sell"}

    def problem(response: agent_pb2.CoordinationResponse) -> str | None:
        for o in response.orders.orders:
            why = market.validate_order(market.Order("", sides.get(o.side, "?"), o.price, o.quantity))
            if why:
                return why
        return None

    replies = await session.round(requests, check=_ok(problem))
    orders = [
        market.Order(r.agent_id, sides[o.side], o.price, o.quantity, r.order)
        for r in replies
        if r.exclusion is None and r.response is not None
        for o in r.response.orders.orders
    ]
    result = market.clear(orders)
    outcome = coordination_pb2.Outcome(
        decided=result.price is not None, reason=result.reason, price=result.price or 0.0
    )
    if result.price is not None:
        outcome.prices[good] = result.price
        outcome.winners.extend(sorted({t["agent_id"] for t in result.trades}))
    outcome.details.CopyFrom(struct({"volume": result.volume, "trades": result.trades}))
    return outcome


# -- consensus ------------------------------------------------------------------------------

RULE_NAMES = {
    coordination_pb2.CONSENSUS_RULE_MAJORITY: "majority",
    coordination_pb2.CONSENSUS_RULE_SUPERMAJORITY: "supermajority",
    coordination_pb2.CONSENSUS_RULE_UNANIMITY: "unanimity",
    coordination_pb2.CONSENSUS_RULE_PLURALITY: "plurality",
}


def _consensus_params(p: dict[str, Any]) -> dict[str, Any]:
    options = p.get("options") or ["yes", "no"]
    if not isinstance(options, list):
        raise ProtocolParamError("options", "must be a list of strings")
    weights = p.get("weights") or {}
    if not isinstance(weights, dict):
        raise ProtocolParamError("weights", "must map agent ids to weights")
    params = {
        "options": [str(o) for o in options],
        "rule": str(p.get("rule", "majority")),
        "threshold": _number(p, "threshold", 2 / 3),
        "quorum": _number(p, "quorum", 0.0),
        "weights": {str(k): float(v) for k, v in weights.items()},
        "tie_rule": str(p.get("tie_rule", "no_decision")),
    }
    _str(p, "question")
    consensus.check(
        params["rule"], params["threshold"], params["quorum"], params["options"], params["weights"]
    )
    return params


async def consensus_run(session: Session, p: dict[str, Any]) -> coordination_pb2.Outcome:
    params = _consensus_params(p)
    requests = []
    for agent_id in _active(session):
        request = agent_pb2.CoordinationRequest()
        request.vote_request.question = str(p["question"])
        request.vote_request.options.extend(params["options"])
        requests.append((agent_id, request))

    def problem(response: agent_pb2.CoordinationResponse) -> str | None:
        if not response.vote.abstain and response.vote.option not in params["options"]:
            return f"voted {response.vote.option!r}, not one of {params['options']}"
        return None

    replies = await session.round(requests, check=_ok(problem))
    votes = [
        consensus.Vote(r.agent_id, r.response.vote.option, r.response.vote.abstain)
        for r in replies
        if r.exclusion is None and r.response is not None
    ]
    result = consensus.decide(votes, list(session.proto.participants), **params)
    outcome = coordination_pb2.Outcome(
        decided=result.decision is not None, reason=result.reason, decision=result.decision or ""
    )
    outcome.tallies.update(result.tallies)
    outcome.details.CopyFrom(struct({"turnout": result.turnout, "cast": result.cast}))
    return outcome


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin(
            "first_price",
            "sealed-bid first-price auction: the highest bid wins and pays its bid",
            False,
            {"item": ("what is sold", None), "reserve_price": ("no sale below it", 0.0)},
            first_price,
            _validate_sealed,
        ),
        Builtin(
            "vickrey",
            "sealed-bid second-price auction: the highest bid wins and pays the second-highest (or the reserve)",
            False,
            {"item": ("what is sold", None), "reserve_price": ("no sale below it", 0.0)},
            second_price,
            _validate_sealed,
        ),
        Builtin(
            "english",
            "ascending auction in rounds: the price rises while more than one bidder stays in",
            True,
            {
                "item": ("what is sold", None),
                "start_price": ("opening price", 0.0),
                "increment": ("price step", 1.0),
                "reserve_price": ("no sale below it", 0.0),
                "max_rounds": ("round cap", 100),
            },
            english,
            lambda p: _english(p, ["-"]),
        ),
        Builtin(
            "dutch",
            "descending auction in rounds: the first to accept the falling price wins",
            True,
            {
                "item": ("what is sold", None),
                "start_price": ("first asking price", None),
                "decrement": ("price step", 1.0),
                "floor_price": ("lowest price asked", 0.0),
                "max_rounds": ("round cap", 100),
            },
            dutch,
            lambda p: _dutch(p, ["-"]),
        ),
        Builtin(
            "contract_net",
            "Contract Net: announce a task, collect proposals, award the best, reject the rest",
            False,
            {
                "task": ("what is to be done", None),
                "task_input": ("the task's input", {}),
                "criterion": ("lowest_cost or best_value", "lowest_cost"),
            },
            contract_net_run,
            _validate_cnet,
        ),
        Builtin(
            "tatonnement",
            "Walrasian tatonnement: prices move with excess demand until it is within tolerance",
            True,
            {
                "goods": ("the goods", None),
                "initial_prices": ("starting prices", {}),
                "step": ("adjustment speed", 0.1),
                "tolerance": ("convergence tolerance", 0.01),
                "max_rounds": ("round cap", 100),
                "min_price": ("price floor", 1e-4),
            },
            tatonnement,
            _tatonnement,
        ),
        Builtin(
            "call_market",
            "one-shot uniform-price double auction of limit orders",
            False,
            {"goods": ("exactly one good", None)},
            call_market,
        ),
        Builtin(
            "consensus",
            "a vote: majority, supermajority, unanimity or plurality, weighted, with quorum",
            False,
            {
                "question": ("what is decided", None),
                "options": ("the options", ["yes", "no"]),
                "rule": ("majority, supermajority, unanimity or plurality", "majority"),
                "threshold": ("supermajority fraction", 2 / 3),
                "quorum": ("turnout needed", 0.0),
                "weights": ("vote weight per agent", {}),
                "tie_rule": ("no_decision or first_option", "no_decision"),
            },
            consensus_run,
            _consensus_params,
        ),
    )
}


def protocol_info(builtin: Builtin) -> coordination_pb2.ProtocolInfo:
    """What ListProtocols says of a built-in."""
    info = coordination_pb2.ProtocolInfo(
        name=builtin.name, description=builtin.description, builtin=True, iterative=builtin.iterative
    )
    for name, (description, default) in builtin.parameters.items():
        param = info.parameters.add(name=name, description=description)
        if default is not None:
            json_format.ParseDict(default, param.default_value)
        else:
            param.default_value.null_value = 0  # type: ignore[assignment]
    return info
