"""Sealed-bid auctions: first-price and second-price (Vickrey), with a reserve price.

Rules:

* A bid is valid when its amount is finite and ``>= 0``; an invalid bid is
  rejected with a reason (the engine names the agent) and takes no part.
* Bids below the reserve price cannot win, but a losing bid above the reserve
  still sets the Vickrey price.
* Ranking: highest amount first; ties broken by arrival order (the order the
  engine received the answers in), then by agent id. The winner is the first
  of the ranking whose amount is at least the reserve.
* First price: the winner pays its own bid.
* Second price: the winner pays ``max(second-highest valid bid, reserve)``.
* No valid bid at or above the reserve: no winner (an outcome, not an error).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from mabeam.services.coordination.protocols.errors import ProtocolParamError


class Bid(NamedTuple):
    """One sealed bid. ``order`` is the arrival order (lower = earlier).

    A tuple, not a frozen dataclass: a round of 1,000 bids builds 1,000 of them.
    """

    agent_id: str
    amount: float
    order: int = 0


@dataclass(frozen=True)
class AuctionOutcome:
    """Who won, at what price, and how every bid ranked."""

    winner: str | None
    price: float
    ranking: list[Bid]
    rejected: dict[str, str] = field(default_factory=dict)
    reason: str = ""

    @property
    def decided(self) -> bool:
        return self.winner is not None

    def details(self, top: int = 10) -> dict[str, Any]:
        """The first ``top`` of the ranking and the rejected bids (the transcript has every bid)."""
        return {
            "ranking": [{"agent_id": b.agent_id, "amount": b.amount} for b in self.ranking[:top]],
            "valid_bids": len(self.ranking),
            "rejected": dict(self.rejected),
        }


def check_reserve(reserve: float) -> float:
    """The reserve price, validated."""
    if not math.isfinite(reserve) or reserve < 0:
        raise ProtocolParamError("reserve_price", f"must be a finite number >= 0 (got {reserve})")
    return reserve


def rank(bids: Sequence[Bid]) -> tuple[list[Bid], dict[str, str]]:
    """Valid bids in rank order, and the rejected ones with their reason."""
    valid: list[Bid] = []
    rejected: dict[str, str] = {}
    for bid in bids:
        if not math.isfinite(bid.amount):
            rejected[bid.agent_id] = f"bid {bid.amount} is not a finite number"
        elif bid.amount < 0:
            rejected[bid.agent_id] = f"bid {bid.amount} is negative"
        else:
            valid.append(bid)
    valid.sort(key=lambda b: (-b.amount, b.order, b.agent_id))
    return valid, rejected


def run(bids: Sequence[Bid], *, second_price: bool, reserve: float = 0.0) -> AuctionOutcome:
    """Decide a sealed-bid auction (see the module docstring for the rules)."""
    check_reserve(reserve)
    ranking, rejected = rank(bids)
    if not ranking or ranking[0].amount < reserve:
        reason = "no bids" if not ranking else f"no bid reached the reserve price {reserve:g}"
        return AuctionOutcome(None, 0.0, ranking, rejected, reason)
    winner = ranking[0]
    if second_price:
        runner_up = ranking[1].amount if len(ranking) > 1 else 0.0
        price = max(runner_up, reserve)
    else:
        price = winner.amount
    return AuctionOutcome(winner.agent_id, price, ranking, rejected)
