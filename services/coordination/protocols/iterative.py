"""English and Dutch auctions: price-driven rounds the engine runs one at a time.

English (ascending): round r announces ``start + (r-1) * increment``; each
active bidder answers accept (stay in) or not (drop out, for good). A bidder
that fails to answer drops out. The auction ends when at most one bidder
stays in a round, or at ``max_rounds``:

* exactly one stays: it wins at that round's price;
* nobody stays: the bidders active at the previous round's price tie there;
  the earliest in arrival order of that previous round wins at the previous
  price (no previous round: no winner);
* the round cap with several still in: the first of them in arrival order
  wins at the last price.

A price below the reserve cannot sell: if the winning price is below the
reserve there is no winner.

Dutch (descending): round r asks ``start - (r-1) * decrement`` (never below
the floor); the first agent to accept, in arrival order within the round,
wins at that price. Nobody accepting by the floor (or the round cap): no
winner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mabeam.services.coordination.protocols.errors import ProtocolParamError


@dataclass
class PriceOutcome:
    """The result of an iterative auction."""

    winner: str | None = None
    price: float = 0.0
    rounds: int = 0
    reason: str = ""


def _finite(value: float, name: str, minimum: float = 0.0, strict: bool = False) -> float:
    if not math.isfinite(value) or value < minimum or (strict and value <= minimum):
        op = ">" if strict else ">="
        raise ProtocolParamError(name, f"must be a finite number {op} {minimum:g} (got {value})")
    return value


@dataclass
class EnglishAuction:
    """Ascending auction state machine."""

    bidders: list[str]
    start_price: float = 0.0
    increment: float = 1.0
    reserve: float = 0.0
    max_rounds: int = 100
    active: list[str] = field(default_factory=list)
    round: int = 0
    done: bool = False
    outcome: PriceOutcome = field(default_factory=PriceOutcome)
    _previous: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _finite(self.start_price, "start_price")
        _finite(self.increment, "increment", strict=True)
        _finite(self.reserve, "reserve_price")
        if self.max_rounds < 1:
            raise ProtocolParamError("max_rounds", "must be at least 1")
        if not self.bidders:
            raise ProtocolParamError("participants", "no bidders")
        self.active = list(self.bidders)

    def price(self, round_number: int | None = None) -> float:
        r = self.round if round_number is None else round_number
        return self.start_price + (r - 1) * self.increment

    def announce(self) -> tuple[int, float, list[str]]:
        """Start the next round: (round, price, who is asked)."""
        self.round += 1
        return self.round, self.price(), list(self.active)

    def receive(self, accepted_in_order: list[str]) -> None:
        """The agents that stayed in this round, in arrival order."""
        staying = [a for a in accepted_in_order if a in self.active]
        self._previous, self.active = self.active, staying
        if len(staying) == 1:
            self._finish(staying[0], self.price())
        elif not staying:
            if self.round == 1:
                self._finish(None, 0.0, "no bidder accepted the opening price")
            else:
                self._finish(self._previous[0], self.price(self.round - 1))
        elif self.round >= self.max_rounds:
            self._finish(staying[0], self.price(), "")

    def _finish(self, winner: str | None, price: float, reason: str = "") -> None:
        self.done = True
        if winner is not None and price < self.reserve:
            winner, reason = None, f"the price {price:g} stayed below the reserve {self.reserve:g}"
        self.outcome = PriceOutcome(winner, price if winner else 0.0, self.round, reason)


@dataclass
class DutchAuction:
    """Descending auction state machine."""

    bidders: list[str]
    start_price: float
    decrement: float = 1.0
    floor_price: float = 0.0
    max_rounds: int = 100
    round: int = 0
    done: bool = False
    outcome: PriceOutcome = field(default_factory=PriceOutcome)

    def __post_init__(self) -> None:
        _finite(self.floor_price, "floor_price")
        _finite(self.decrement, "decrement", strict=True)
        _finite(self.start_price, "start_price")
        if self.start_price <= self.floor_price:
            raise ProtocolParamError("start_price", f"must be above floor_price {self.floor_price:g}")
        if self.max_rounds < 1:
            raise ProtocolParamError("max_rounds", "must be at least 1")
        if not self.bidders:
            raise ProtocolParamError("participants", "no bidders")

    def price(self) -> float:
        return max(self.start_price - (self.round - 1) * self.decrement, self.floor_price)

    def announce(self) -> tuple[int, float, list[str]]:
        self.round += 1
        return self.round, self.price(), list(self.bidders)

    def receive(self, accepted_in_order: list[str]) -> None:
        taking = [a for a in accepted_in_order if a in self.bidders]
        if taking:
            self.done = True
            self.outcome = PriceOutcome(taking[0], self.price(), self.round)
        elif self.price() <= self.floor_price or self.round >= self.max_rounds:
            self.done = True
            self.outcome = PriceOutcome(None, 0.0, self.round, "nobody accepted down to the floor price")
