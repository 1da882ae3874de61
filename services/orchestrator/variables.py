"""Variable values and decisions as plain logic: types, constraints, outcomes to values.

Pure (no grpc calls, no etcd): the server validates and converts with these.
"""

from __future__ import annotations

import math
import re
from typing import Any

from google.protobuf import json_format

from mabeam.errors import InvalidArgument
from mabeam.v1 import common_pb2, coordination_pb2, orchestrator_pb2

NAME_RE = re.compile(r"^[A-Za-z0-9._:-][A-Za-z0-9._:/-]{0,255}\Z")
MAX_BYTES = 1 << 20


def check_name(name: str, field: str = "name") -> str:
    """A variable name: 1-256 characters of [A-Za-z0-9._:/-], not starting with '/'."""
    if not name:
        raise InvalidArgument(field, "is required")
    if not NAME_RE.match(name):
        raise InvalidArgument(
            field, f"{name[:300]!r} must be 1-256 characters of [A-Za-z0-9._:/-], not starting with '/'"
        )
    return name


def kind_of(value: common_pb2.Value) -> str:
    """The value's type: number_value, int_value, string_value, ... or '' when empty."""
    return value.WhichOneof("kind") or ""


def check_value(value: common_pb2.Value, field: str = "value") -> common_pb2.Value:
    """A value that can be stored: a kind set, finite numbers, at most 1 MiB of bytes."""
    kind = kind_of(value)
    if not kind:
        raise InvalidArgument(field, "is required (set one of number_value, int_value, string_value, ...)")
    if kind == "number_value" and not math.isfinite(value.number_value):
        raise InvalidArgument(field, "number_value must be finite")
    if kind == "bytes_value" and len(value.bytes_value) > MAX_BYTES:
        raise InvalidArgument(field, f"bytes_value is {len(value.bytes_value)} bytes; at most {MAX_BYTES}")
    return value


def as_number(value: common_pb2.Value) -> float | None:
    """The value as a number, if it is one."""
    kind = kind_of(value)
    if kind == "number_value":
        return value.number_value
    if kind == "int_value":
        return float(value.int_value)
    return None


def python_value(value: common_pb2.Value) -> Any:
    """The value as plain Python, for comparing with allowed values."""
    kind = kind_of(value)
    if kind in ("struct_value", "list_value"):
        return json_format.MessageToDict(getattr(value, kind))
    return getattr(value, kind) if kind else None


def violation(value: common_pb2.Value, constraints: orchestrator_pb2.Constraints) -> str | None:
    """Why ``value`` breaks ``constraints`` (None when it does not)."""
    number = as_number(value)
    if number is None and kind_of(value) == "struct_value" and "size" in value.struct_value:
        number = float(value.struct_value["size"])  # a resource allocation is bounded by its size
    if constraints.HasField("min") or constraints.HasField("max"):
        if number is None:
            return f"a {kind_of(value)} cannot be checked against min/max bounds"
        if constraints.HasField("min") and number < constraints.min:
            return f"{number:g} is below the minimum {constraints.min:g}"
        if constraints.HasField("max") and number > constraints.max:
            return f"{number:g} is above the maximum {constraints.max:g}"
    if constraints.allowed_values:
        allowed = [python_value(v) for v in constraints.allowed_values]
        if python_value(value) not in allowed:
            return f"{python_value(value)!r} is not one of the allowed values {allowed}"
    return None


def decided_value(outcome: coordination_pb2.Outcome, kind: int) -> common_pb2.Value:
    """The value a coordination outcome decides.

    * resource allocation: ``{"winners": [...], "price": p, "size": n}`` where
      ``n`` is the decided number when the decision is one, else the number of
      winners;
    * parameter: the option agreed (a number when it reads as one), else a
      market's price (the single good's, or all of them as a struct), else
      the auction price.
    """
    out = common_pb2.Value()
    if kind == orchestrator_pb2.BINDING_KIND_RESOURCE_ALLOCATION:
        size = _number(outcome.decision)
        out.struct_value.update(
            {
                "winners": list(outcome.winners),
                "price": outcome.price,
                "size": int(size) if size is not None else len(outcome.winners),
            }
        )
        return out
    if outcome.decision:
        number = _number(outcome.decision)
        if number is not None:
            out.number_value = number
        else:
            out.string_value = outcome.decision
    elif len(outcome.prices) == 1:
        out.number_value = next(iter(outcome.prices.values()))
    elif outcome.prices:
        out.struct_value.update(dict(outcome.prices))
    else:
        out.number_value = outcome.price
    return out


def _number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def metric_crosses(value: float, rule: orchestrator_pb2.AdaptationRule) -> bool:
    """True when the metric is past the rule's threshold."""
    if rule.comparison == orchestrator_pb2.COMPARISON_ABOVE:
        return value > rule.threshold
    if rule.comparison == orchestrator_pb2.COMPARISON_BELOW:
        return value < rule.threshold
    return False


# -- adaptation metrics ------------------------------------------------------------------
#
# ``agents.<field>.<aggregate>`` over the participants' latest heartbeats (any numeric
# field of mabeam.v1.AgentLoad), ``var:<name>`` (a numeric variable), or
# ``sessions:<protocol>.<statistic>`` over that protocol's latest finished sessions.

AGENT_FIELDS = {"load": "load", "queue": "queue_length", "queue_length": "queue_length",
                "memory_bytes": "memory_bytes", "cpu_fraction": "cpu_fraction"}  # fmt: skip
AGGREGATES = ("mean", "max", "min", "sum")
SESSION_STATISTICS = ("decided_ratio", "excluded_mean", "participants_mean")
SESSIONS_LOOKED_AT = 20  # the latest finished sessions a sessions: metric is computed over
PROTOCOL_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
METRIC_HELP = (
    "use agents.<field>.<aggregate> (field: load, queue_length, memory_bytes, cpu_fraction; aggregate: "
    "mean, max, min, sum), var:<name>, or sessions:<protocol>.<decided_ratio|excluded_mean|participants_mean>"
)


def parse_metric(metric: str, field: str = "metric") -> tuple[str, str, str]:
    """``(kind, subject, statistic)``: ``("agents", "load", "mean")``, ``("var", name, "")`` or
    ``("sessions", protocol, "decided_ratio")``; INVALID_ARGUMENT naming ``field`` otherwise."""
    if metric.startswith("var:"):
        return "var", check_name(metric[4:], field), ""
    if metric.startswith("sessions:"):
        protocol, _, statistic = metric[len("sessions:") :].rpartition(".")
        if PROTOCOL_RE.match(protocol) and statistic in SESSION_STATISTICS:
            return "sessions", protocol, statistic
        raise InvalidArgument(field, f"{metric[:300]!r}: {METRIC_HELP}")
    parts = metric.split(".")
    if len(parts) == 3 and parts[0] == "agents" and parts[1] in AGENT_FIELDS and parts[2] in AGGREGATES:
        return "agents", AGENT_FIELDS[parts[1]], parts[2]
    raise InvalidArgument(field, f"{metric[:300]!r}: {METRIC_HELP}")


def aggregate(values: list[float], how: str) -> float | None:
    """``mean``, ``max``, ``min`` or ``sum`` of ``values`` (None when there are none)."""
    if not values:
        return None
    if how == "mean":
        return math.fsum(values) / len(values)
    if how == "sum":
        return math.fsum(values)
    return max(values) if how == "max" else min(values)


def session_statistic(sessions: list[coordination_pb2.Session], statistic: str) -> float | None:
    """A statistic over finished sessions: the share decided, or the mean excluded or invited."""
    if not sessions:
        return None
    if statistic == "decided_ratio":
        return sum(1 for s in sessions if s.outcome.decided) / len(sessions)
    if statistic == "excluded_mean":
        return sum(len(s.excluded) for s in sessions) / len(sessions)
    return sum(len(s.participants) for s in sessions) / len(sessions)
