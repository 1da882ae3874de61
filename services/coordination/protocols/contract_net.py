"""Contract Net: announce a task, collect proposals, award the best, reject the rest.

A proposal is valid when its cost is finite and ``>= 0`` (quality in [0, 1]
when given). Criterion ``lowest_cost`` (default): lowest cost wins; ties by
higher quality, then arrival order, then agent id. Criterion ``best_value``:
highest ``quality / (1 + cost)``. Agents that decline are refusals, not
errors. No valid proposal: no award.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from mabeam.services.coordination.protocols.errors import ProtocolParamError

CRITERIA = ("lowest_cost", "best_value")


@dataclass(frozen=True)
class Proposal:
    agent_id: str
    cost: float
    quality: float = 0.0
    eta_s: float = 0.0
    order: int = 0


@dataclass
class Award:
    winner: str | None
    price: float
    rejected_proposals: list[str]
    invalid: dict[str, str] = field(default_factory=dict)
    reason: str = ""


def award(proposals: Sequence[Proposal], criterion: str = "lowest_cost") -> Award:
    """Choose the contractor (see the module docstring)."""
    if criterion not in CRITERIA:
        raise ProtocolParamError("criterion", f"must be one of {', '.join(CRITERIA)}")
    valid: list[Proposal] = []
    invalid: dict[str, str] = {}
    for p in proposals:
        if not math.isfinite(p.cost) or p.cost < 0:
            invalid[p.agent_id] = f"cost {p.cost} must be a finite number >= 0"
        elif not math.isfinite(p.quality) or not 0 <= p.quality <= 1:
            invalid[p.agent_id] = f"quality {p.quality} must be in [0, 1]"
        else:
            valid.append(p)
    if not valid:
        return Award(None, 0.0, [], invalid, "no valid proposal")
    if criterion == "lowest_cost":
        valid.sort(key=lambda p: (p.cost, -p.quality, p.order, p.agent_id))
    else:
        valid.sort(key=lambda p: (-(p.quality / (1 + p.cost)), p.order, p.agent_id))
    best = valid[0]
    return Award(best.agent_id, best.cost, [p.agent_id for p in valid[1:]], invalid)
