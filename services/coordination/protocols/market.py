"""Markets: Walrasian tatonnement over one or more goods, and a one-shot call market.

Tatonnement. Each round announces a price per good; each agent reports its
net demand per good (demand minus supply). Excess demand ``z_g`` is the sum
over agents. If every ``|z_g| <= tolerance`` the market has converged at
these prices. Otherwise prices move with excess demand,
``p_g <- max(min_price, p_g * (1 + step * z_g / n))`` with ``n`` the number of
agents that answered (relative steps keep the rule scale-free), and another
round follows, up to ``max_rounds``; then the result reports non-convergence
with the last prices and residuals — it is never hidden.

Call market (uniform-price double auction). Buy and sell limit orders with
quantities. The clearing price maximises the matched volume; among the
prices that do, the midpoint of the interval of such prices is taken. At that
price every buyer with a limit ``>=`` price and every seller with a limit
``<=`` price may trade; the short side trades in full, the long side is
rationed by priority (better limit first, then arrival order). So no buyer
trades above its limit and no seller below its limit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mabeam.services.coordination.protocols.errors import ProtocolParamError


@dataclass
class MarketOutcome:
    """Prices found, whether they clear the market, and the residual excess demand."""

    converged: bool
    prices: dict[str, float]
    excess_demand: dict[str, float]
    rounds: int
    reason: str = ""


@dataclass
class Tatonnement:
    """Tatonnement state machine: announce prices, receive demands, repeat."""

    goods: list[str]
    initial_prices: Mapping[str, float] = field(default_factory=dict)
    step: float = 0.1
    tolerance: float = 0.01
    max_rounds: int = 100
    min_price: float = 1e-4
    prices: dict[str, float] = field(default_factory=dict)
    round: int = 0
    done: bool = False
    outcome: MarketOutcome | None = None

    def __post_init__(self) -> None:
        if not self.goods:
            raise ProtocolParamError("goods", "at least one good")
        if len(set(self.goods)) != len(self.goods):
            raise ProtocolParamError("goods", "must not repeat a good")
        for name, value, strict in (
            ("step", self.step, True),
            ("tolerance", self.tolerance, True),
            ("min_price", self.min_price, False),
        ):
            if not math.isfinite(value) or value < 0 or (strict and value == 0):
                raise ProtocolParamError(
                    name, f"must be a finite number {'>' if strict else '>='} 0 (got {value})"
                )
        if self.max_rounds < 1:
            raise ProtocolParamError("max_rounds", "must be at least 1")
        for good in self.initial_prices:
            if good not in self.goods:
                raise ProtocolParamError("initial_prices", f"{good!r} is not one of the goods")
        self.prices = {}
        for good in self.goods:
            p = float(self.initial_prices.get(good, 1.0))
            if not math.isfinite(p) or p <= 0:
                raise ProtocolParamError("initial_prices", f"price of {good!r} must be > 0 (got {p})")
            self.prices[good] = p

    def validate_demand(self, demand: Mapping[str, float]) -> str | None:
        """Why a reported demand is malformed (None when it is fine)."""
        missing = [g for g in self.goods if g not in demand]
        if missing:
            return f"no demand for {', '.join(missing)}"
        bad = [g for g in self.goods if not math.isfinite(demand[g])]
        if bad:
            return f"demand for {', '.join(bad)} is not a finite number"
        return None

    def announce(self) -> tuple[int, dict[str, float]]:
        self.round += 1
        return self.round, dict(self.prices)

    def receive(self, demands: Sequence[Mapping[str, float]]) -> None:
        """The valid demands of this round."""
        if not demands:
            self.done = True
            self.outcome = MarketOutcome(
                False, dict(self.prices), {}, self.round, "no agent reported a demand"
            )
            return
        z = {g: sum(float(d[g]) for d in demands) for g in self.goods}
        if all(abs(v) <= self.tolerance for v in z.values()):
            self.done = True
            self.outcome = MarketOutcome(True, dict(self.prices), z, self.round)
            return
        if self.round >= self.max_rounds:
            self.done = True
            worst = max(abs(v) for v in z.values())
            self.outcome = MarketOutcome(
                False,
                dict(self.prices),
                z,
                self.round,
                f"did not converge in {self.max_rounds} rounds (largest |excess demand| {worst:.4g} > tolerance {self.tolerance:g})",
            )
            return
        n = len(demands)
        for g in self.goods:
            factor = max(1.0 + self.step * z[g] / n, 0.1)  # at most a 90 % cut per round
            self.prices[g] = max(self.min_price, self.prices[g] * factor)


@dataclass(frozen=True)
class Order:
    """A limit order."""

    agent_id: str
    side: str  # "buy" or "sell"
    price: float
    quantity: float
    order: int = 0


@dataclass
class CallOutcome:
    """Clearing of a call market."""

    price: float | None
    volume: float
    trades: list[dict[str, Any]]
    rejected: dict[str, str]
    reason: str = ""


def validate_order(order: Order) -> str | None:
    """Why an order is malformed (None when fine)."""
    if order.side not in ("buy", "sell"):
        return f"side {order.side!r} is neither buy nor sell"
    if not math.isfinite(order.price) or order.price < 0:
        return f"limit price {order.price} must be a finite number >= 0"
    if not math.isfinite(order.quantity) or order.quantity <= 0:
        return f"quantity {order.quantity} must be a finite number > 0"
    return None


def clear(orders: Sequence[Order]) -> CallOutcome:
    """Clear a uniform-price double auction (see the module docstring)."""
    rejected: dict[str, str] = {}
    valid = []
    for o in orders:
        why = validate_order(o)
        if why:
            rejected[o.agent_id] = why
        else:
            valid.append(o)
    buys = [o for o in valid if o.side == "buy"]
    sells = [o for o in valid if o.side == "sell"]
    candidates = sorted({o.price for o in valid})

    def volume(p: float) -> float:
        demand = sum(o.quantity for o in buys if o.price >= p)
        supply = sum(o.quantity for o in sells if o.price <= p)
        return min(demand, supply)

    best = max((volume(p) for p in candidates), default=0.0)
    if best <= 0:
        return CallOutcome(None, 0.0, [], rejected, "no buy and sell orders cross")
    best_prices = [p for p in candidates if volume(p) == best]
    price = (best_prices[0] + best_prices[-1]) / 2
    # The midpoint may fall between two candidates where volume is lower: keep the best candidate then.
    if volume(price) < best:
        price = best_prices[0]
    eligible_buys = sorted(
        (o for o in buys if o.price >= price), key=lambda o: (-o.price, o.order, o.agent_id)
    )
    eligible_sells = sorted(
        (o for o in sells if o.price <= price), key=lambda o: (o.price, o.order, o.agent_id)
    )
    trades: list[dict[str, Any]] = []
    for side, book in (("buy", eligible_buys), ("sell", eligible_sells)):
        left = best
        for o in book:
            if left <= 0:
                break
            qty = min(o.quantity, left)
            left -= qty
            trades.append({"agent_id": o.agent_id, "side": side, "quantity": qty, "price": price})
    return CallOutcome(price, best, trades, rejected)
