"""Heartbeat round trips as an agent host sees them, and the one nearest-rank percentile.

An :class:`~mabeam.agent.AgentHost` times every beat it sends until the
registry answers for that agent (``host.heartbeat_stats``); the load test and
the heartbeat tests read these figures. Apart from the host because measuring
is not hosting: the host only calls :meth:`HeartbeatStats.beat_sent`,
:meth:`~HeartbeatStats.beat_acked`, :meth:`~HeartbeatStats.beat_refused` and
:meth:`~HeartbeatStats.stream_broke`, and counts ``held``.
:mod:`mabeam.agent` re-exports both names.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0-100, nearest rank) of ``values``; 0.0 when there are none."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))]


class HeartbeatStats:
    """Heartbeat round trips of an :class:`AgentHost` (``host.heartbeat_stats``).

    A beat is timed from the moment the heartbeat stream takes it to the
    registry's ``HeartbeatResponse`` for that agent: the time a lease refresh
    takes as the agent sees it. ``sent``, ``acked`` and ``max_s`` cover every
    beat since the host started (or :meth:`reset`); ``latencies`` keeps the
    last ``keep`` round trips (seconds), for percentiles. ``stream_breaks``
    counts heartbeat streams that ended in an error (each one reconnects);
    ``unanswered`` the beats such a break left without an answer; ``refused``
    the beats the registry answered with a refusal (the agent's lease had
    lapsed, or its token was replaced: the host registers it again); ``held``
    the beats not sent because the agent's last one was still unanswered
    (the registry was slower than the beats).

    Example::

        stats = host.heartbeat_stats
        print(stats.acked, stats.percentile(99), stats.max_s)
    """

    def __init__(self, keep: int = 100_000) -> None:
        self.latencies: collections.deque[float] = collections.deque(maxlen=keep)
        self.sent = 0
        self.acked = 0
        self.max_s = 0.0
        self.stream_breaks = 0
        self.unanswered = 0
        self.refused = 0
        self.held = 0
        self._pending: dict[str, collections.deque[float]] = {}

    def reset(self) -> None:
        """Forget the figures so far (beats in flight are still timed)."""
        self.latencies.clear()
        self.sent = self.acked = self.stream_breaks = self.unanswered = self.refused = self.held = 0
        self.max_s = 0.0

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100, nearest rank) of the kept round trips; 0.0 with none."""
        return percentile(self.latencies, q)

    def summary(self) -> dict[str, float]:
        """The figures as plain numbers (latencies in seconds), e.g. for a JSON report."""
        return {
            "sent": self.sent,
            "acked": self.acked,
            "p50_s": self.percentile(50),
            "p99_s": self.percentile(99),
            "max_s": self.max_s,
            "stream_breaks": self.stream_breaks,
            "unanswered": self.unanswered,
            "refused": self.refused,
            "held": self.held,
        }

    def beat_sent(self, agent_id: str) -> None:
        self.sent += 1
        # Per agent, oldest first: an answer is matched with the agent's oldest beat in flight.
        self._pending.setdefault(agent_id, collections.deque(maxlen=64)).append(time.monotonic())

    def beat_acked(self, agent_id: str) -> None:
        sent_at = self._answered(agent_id)
        if sent_at is None:
            return
        latency = time.monotonic() - sent_at
        self.acked += 1
        self.latencies.append(latency)
        self.max_s = max(self.max_s, latency)

    def beat_refused(self, agent_id: str) -> None:
        """The registry refused the agent's oldest beat in flight (counted, not timed)."""
        if self._answered(agent_id) is not None:
            self.refused += 1

    def _answered(self, agent_id: str) -> float | None:
        pending = self._pending.get(agent_id)
        if not pending:
            return None
        sent_at = pending.popleft()
        if not pending:
            del self._pending[agent_id]
        return sent_at

    def stream_broke(self, agent_ids: Iterable[str] | None = None) -> None:
        """A stream ended in an error: the beats in flight of ``agent_ids`` (every agent's when
        None) will not be answered."""
        self.stream_breaks += 1
        for agent_id in list(self._pending) if agent_ids is None else agent_ids:
            self.unanswered += len(self._pending.pop(agent_id, ()))
