"""OTP-style restart decisions for supervised agents (pure: no clock, no I/O).

* permanent: restarted after every exit;
* transient: restarted only after an abnormal exit (non-zero code or a signal);
* temporary: never restarted.

Restart intensity as in OTP: at most ``max_restarts`` restarts within any
window of ``period_s`` seconds; the restart that would be one too many gives
up instead, and the agent is marked failed. A deliberate stop or restart
(StopAgent / RestartAgent) is not an exit and does not count.

The delay before a restart doubles from ``backoff_initial_s`` up to
``backoff_max_s`` while restarts keep coming within the window.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum


class Strategy(Enum):
    """When a child is restarted."""

    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


@dataclass(frozen=True)
class RestartPolicy:
    """A child's restart policy; invalid values raise ValueError naming the field."""

    strategy: Strategy = Strategy.PERMANENT
    max_restarts: int = 3
    period_s: float = 5.0
    backoff_initial_s: float = 0.0
    backoff_max_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts: must not be negative (got {self.max_restarts})")
        if self.period_s <= 0:
            raise ValueError(f"period: must be > 0 s (got {self.period_s})")
        if self.backoff_initial_s < 0:
            raise ValueError(f"backoff_initial: must not be negative (got {self.backoff_initial_s})")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max: must be >= backoff_initial")


@dataclass(frozen=True)
class Decision:
    """What to do after an exit."""

    restart: bool
    delay_s: float
    give_up: bool
    reason: str


def describe_exit(exit_code: int | None, signal: int | None) -> str:
    """'exit code 1', 'signal 9' or 'exit code 0'."""
    if signal is not None:
        return f"signal {signal}"
    return f"exit code {exit_code if exit_code is not None else 0}"


@dataclass
class RestartTracker:
    """Applies a policy to a child's exits; feed it the time of each exit."""

    policy: RestartPolicy
    restarts: deque[float] = field(default_factory=deque)
    total_restarts: int = 0

    def on_exit(self, exit_code: int | None, signal: int | None, now: float) -> Decision:
        """Decide after the child exited with ``exit_code`` or was killed by ``signal``."""
        how = describe_exit(exit_code, signal)
        abnormal = signal is not None or (exit_code or 0) != 0
        strategy = self.policy.strategy
        if strategy is Strategy.TEMPORARY:
            return Decision(False, 0.0, False, f"temporary agent exited ({how}); not restarted")
        if strategy is Strategy.TRANSIENT and not abnormal:
            return Decision(False, 0.0, False, f"transient agent exited normally ({how}); not restarted")
        while self.restarts and now - self.restarts[0] >= self.policy.period_s:
            self.restarts.popleft()
        if len(self.restarts) >= self.policy.max_restarts:
            return Decision(
                False,
                0.0,
                True,
                f"restart intensity exceeded: {len(self.restarts)} restarts in "
                f"{self.policy.period_s:g} s, then {how}",
            )
        delay = 0.0
        if self.policy.backoff_initial_s > 0:
            delay = min(self.policy.backoff_initial_s * (2 ** len(self.restarts)), self.policy.backoff_max_s)
        self.restarts.append(now)
        self.total_restarts += 1
        return Decision(True, delay, False, f"restarting after {how}")
