"""Consensus: majority, supermajority, unanimity and plurality, weighted, with quorum.

* Eligible voters are the participants; each has a weight (default 1).
* Quorum: the total weight of the agents that voted (abstentions count,
  failures and silence do not) must be at least ``quorum`` times the total
  eligible weight; otherwise there is no decision ("no quorum").
* Tallies are the weights of the votes for each option (abstentions excluded);
  ``cast`` is their sum.
* MAJORITY: an option with more than half of ``cast``.
* SUPERMAJORITY: an option with at least ``threshold`` of ``cast``
  (``0.5 < threshold <= 1``).
* UNANIMITY: every non-abstaining vote for the same option (at least one).
* PLURALITY: the option with the largest tally.
* Ties (PLURALITY, or a 50/50 split under no rule): ``no_decision`` (default),
  or ``first_option``: the tied option listed first wins.

With all weights equal, weighted majority is plain majority.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mabeam.services.coordination.protocols.errors import ProtocolParamError

RULES = ("majority", "supermajority", "unanimity", "plurality")


@dataclass(frozen=True)
class Vote:
    agent_id: str
    option: str = ""
    abstain: bool = False


@dataclass
class ConsensusOutcome:
    decision: str | None
    tallies: dict[str, float]
    cast: float
    turnout: float
    reason: str = ""
    rejected: dict[str, str] = field(default_factory=dict)


def check(
    rule: str, threshold: float, quorum: float, options: Sequence[str], weights: Mapping[str, float]
) -> None:
    """Validate the parameters of a vote."""
    if rule not in RULES:
        raise ProtocolParamError("rule", f"must be one of {', '.join(RULES)}")
    if rule == "supermajority" and not (0.5 < threshold <= 1):
        raise ProtocolParamError("threshold", f"must be in (0.5, 1] (got {threshold})")
    if not (math.isfinite(quorum) and 0 <= quorum <= 1):
        raise ProtocolParamError("quorum", f"must be in [0, 1] (got {quorum})")
    if len(options) < 2:
        raise ProtocolParamError("options", "at least two options")
    if len(set(options)) != len(options):
        raise ProtocolParamError("options", "must not repeat an option")
    for agent, w in weights.items():
        if not math.isfinite(w) or w < 0:
            raise ProtocolParamError("weights", f"weight of {agent!r} must be a finite number >= 0")


def decide(
    votes: Sequence[Vote],
    eligible: Sequence[str],
    *,
    options: Sequence[str] = ("yes", "no"),
    rule: str = "majority",
    threshold: float = 2 / 3,
    quorum: float = 0.0,
    weights: Mapping[str, float] | None = None,
    tie_rule: str = "no_decision",
) -> ConsensusOutcome:
    """Tally ``votes`` of ``eligible`` agents under ``rule`` (see the module docstring)."""
    weights = dict(weights or {})
    check(rule, threshold, quorum, options, weights)
    weight = {a: float(weights.get(a, 1.0)) for a in eligible}
    tallies = {o: 0.0 for o in options}
    rejected: dict[str, str] = {}
    voted = 0.0
    seen: set[str] = set()
    for v in votes:
        if v.agent_id not in weight or v.agent_id in seen:
            rejected[v.agent_id] = "not eligible" if v.agent_id not in weight else "voted twice"
            continue
        if not v.abstain and v.option not in tallies:
            rejected[v.agent_id] = f"option {v.option!r} is not one of {list(options)}"
            continue
        seen.add(v.agent_id)
        voted += weight[v.agent_id]
        if not v.abstain:
            tallies[v.option] += weight[v.agent_id]
    total = sum(weight.values())
    cast = sum(tallies.values())
    turnout = voted / total if total else 0.0
    if total == 0 or turnout < quorum:
        return ConsensusOutcome(
            None, tallies, cast, turnout, f"no quorum: turnout {turnout:.2f} < {quorum:.2f}", rejected
        )
    if cast == 0:
        return ConsensusOutcome(None, tallies, cast, turnout, "no votes cast", rejected)
    top = max(tallies.values())
    leaders = [o for o in options if tallies[o] == top]
    if rule == "unanimity":
        nonzero = [o for o in options if tallies[o] > 0]
        if len(nonzero) == 1:
            return ConsensusOutcome(nonzero[0], tallies, cast, turnout, "", rejected)
        return ConsensusOutcome(None, tallies, cast, turnout, "not unanimous", rejected)
    if len(leaders) > 1:
        if tie_rule == "first_option" and rule == "plurality":
            return ConsensusOutcome(leaders[0], tallies, cast, turnout, "", rejected)
        if tie_rule == "first_option" and rule == "majority" and top * 2 >= cast:
            return ConsensusOutcome(leaders[0], tallies, cast, turnout, "", rejected)
        return ConsensusOutcome(None, tallies, cast, turnout, f"tie between {', '.join(leaders)}", rejected)
    leader = leaders[0]
    if rule == "plurality":
        return ConsensusOutcome(leader, tallies, cast, turnout, "", rejected)
    if rule == "majority":
        if top * 2 > cast:
            return ConsensusOutcome(leader, tallies, cast, turnout, "", rejected)
        return ConsensusOutcome(
            None, tallies, cast, turnout, f"no option has more than half of {cast:g}", rejected
        )
    if top >= threshold * cast - 1e-12:
        return ConsensusOutcome(leader, tallies, cast, turnout, "", rejected)
    return ConsensusOutcome(
        None,
        tallies,
        cast,
        turnout,
        f"{leader} has {top / cast:.2f} of the votes, below the threshold {threshold:.2f}",
        rejected,
    )
