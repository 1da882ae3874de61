"""How long finished things stay in etcd, and the leases that end them.

Finished sessions, finished goals (with their steps and events) and stopped
supervised records are kept for a retention period, then deleted by etcd
itself: the write that finishes them binds their keys to an *expiry lease*
whose TTL is the period. No replica scans anything to delete them, no wall
clock of one host is compared with another's (etcd counts the TTL), and a
replica that dies loses nothing: the lease is etcd's.

One lease per finished object would be one lease object per session in
etcd; instead, everything a replica finishes within a *bucket* of time
(``bucket_s``, by its own monotonic clock) shares one lease granted with TTL
``period_s + bucket_s``: an object is kept at least the period and at most
the period plus a bucket. Leases are never refreshed; they simply run out.

:class:`Retention` is the setting per kind (flags, :func:`add_flags` and :func:`from_flags`, and environment, e.g.
``MABEAM_SESSION_RETENTION=7d``, and an optional cap on how many are kept,
``MABEAM_SESSION_RETENTION_COUNT``, which the elected replica of the service
enforces by deleting the oldest); :class:`ExpiryLeases` hands out the
current bucket's lease. ``0`` keeps finished objects for good (the lease is
None: the finishing write binds nothing).

Note: etcd resets a lease's remaining TTL to the full TTL when its leader
changes unless it runs with ``--experimental-enable-lease-checkpoint`` (the
embedded etcd and compose's do), and etcd 3.5.1 (the embedded one) resets it
on a restart of the whole cluster even then (fixed in 3.5.3 by
``--experimental-enable-lease-checkpoint-persist``). So the period is a lower
bound: an object is deleted at least ``period_s`` after it finished, and at
most a bucket later unless etcd was restarted in between.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mabeam.config import ConfigError
from mabeam.runtime.etcd import EtcdClient

# The kinds with a retention, and their defaults (seconds).
DEFAULT_PERIODS: dict[str, int] = {
    "session": 7 * 86_400,
    "goal": 7 * 86_400,
    "supervised": 7 * 86_400,
}
# What each kind's flags keep, in their help.
KEPT: dict[str, str] = {
    "session": "finished sessions",
    "goal": "finished goals",
    "supervised": "stopped and failed supervised records",
}
# etcd's largest lease TTL is about 285 years; a period beyond ten years is a typo.
MAX_PERIOD_S = 10 * 365 * 86_400
_UNITS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 7 * 86_400}
_DURATION = re.compile(r"^(\d+)([smhdw]?)$")


def parse_period(raw: str, name: str) -> int:
    """``"7d"``, ``"36h"``, ``"90m"``, ``"600s"``, ``"600"`` or ``"0"`` (keep for good) in seconds."""
    match = _DURATION.fullmatch(raw.strip().lower())
    if match is None:
        raise ConfigError(f"{name}={raw!r}: a duration such as 7d, 36h, 90m or 600s (0 keeps for good)")
    seconds = int(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds > MAX_PERIOD_S:
        raise ConfigError(f"{name}={raw!r}: at most {MAX_PERIOD_S // 86_400} days")
    return seconds


MAX_COUNT = 10_000_000


def parse_count(raw: str, name: str) -> int:
    """A cap on finished objects kept: a whole number, 0 for none, at most ``MAX_COUNT``."""
    text = raw.strip().replace("_", "")
    if not text.isdigit() or int(text) > MAX_COUNT:
        raise ConfigError(f"{name}={raw!r}: a whole number of objects, at most {MAX_COUNT:,} (0: no cap)")
    return int(text)


@dataclass(frozen=True)
class Retention:
    """How long finished objects of one kind are kept (``period_s``; 0 = for good)."""

    kind: str
    period_s: int
    bucket_s: int
    max_count: int = 0  # keep at most this many finished objects (0: no cap), oldest deleted first

    @property
    def keeps_forever(self) -> bool:
        return self.period_s == 0

    def describe(self) -> str:
        """For messages: ``"7 days"``, ``"36 hours"``, ``"10 minutes"``, ``"45 s"`` or ``"for good"``."""
        s = self.period_s
        if s == 0:
            return "for good"
        for unit, name in ((86_400, "day"), (3_600, "hour"), (60, "minute")):
            if s % unit == 0:
                n = s // unit
                return f"{n} {name}{'s' if n != 1 else ''}"
        return f"{s} s"

    @staticmethod
    def load(
        kind: str, env: Mapping[str, str], given: str | None = None, given_count: str | None = None
    ) -> Retention:
        """The retention of ``kind``: ``given`` (a flag), else ``MABEAM_<KIND>_RETENTION``, else the default;
        the cap ``given_count``, else ``MABEAM_<KIND>_RETENTION_COUNT``, else none.

        The bucket is a hundredth of the period, between 1 s and 1 h.
        """
        name = f"MABEAM_{kind.upper()}_RETENTION"
        raw = given if given is not None else env.get(name)
        period = parse_period(raw, name) if raw else DEFAULT_PERIODS[kind]
        count_name = f"{name}_COUNT"
        raw_count = given_count if given_count is not None else env.get(count_name)
        return Retention(
            kind,
            period,
            bucket_s=min(3_600, max(1, period // 100)),
            max_count=parse_count(raw_count, count_name) if raw_count else 0,
        )


def add_flags(parser: argparse.ArgumentParser, kind: str) -> None:
    """``--<kind>-retention PERIOD`` and ``--<kind>-retention-count N`` in a group of their own;
    :func:`from_flags` reads them."""
    name, kept = f"MABEAM_{kind.upper()}_RETENTION", KEPT[kind]
    default = DEFAULT_PERIODS[kind]
    default_text = f"{default // 86_400}d" if default % 86_400 == 0 else f"{default}s"
    g = parser.add_argument_group(f"retention of {kept}")
    g.add_argument(
        f"--{kind}-retention",
        metavar="PERIOD",
        help=f"keep {kept} this long, then etcd deletes them: 7d, 36h, 90m, 600s; 0 keeps them "
        f"for good (env {name}; default {default_text})",
    )
    g.add_argument(
        f"--{kind}-retention-count",
        metavar="N",
        help=f"keep at most N {kept}, the oldest deleted first; 0: no cap (env {name}_COUNT; default 0)",
    )


def from_flags(kind: str, args: argparse.Namespace, env: Mapping[str, str]) -> Retention:
    """The retention of ``kind`` from the flags :func:`add_flags` added, over ``env``."""
    return Retention.load(
        kind,
        env,
        given=getattr(args, f"{kind}_retention"),
        given_count=getattr(args, f"{kind}_retention_count"),
    )


class ExpiryLeases:
    """The current bucket's expiry lease of one kind, granted on first use in each bucket.

    Example::

        expiry = ExpiryLeases(client, Retention.load("session", os.environ))
        lease = await expiry.lease()          # None: kept for good
        await client.put(key, value, lease=lease)
    """

    def __init__(
        self, client: EtcdClient, retention: Retention, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.retention = retention
        self._client = client
        self._clock = clock
        self._lease_id: int | None = None
        self._granted_at = 0.0

    async def lease(self) -> int | None:
        """The lease to bind a finished object's keys to (None when they are kept for good).

        A new lease is granted when the bucket's has been in use for ``bucket_s``
        (or was forgotten with :meth:`forget`); one that etcd no longer knows
        makes the write fail (``LeaseNotFound``-like errors from etcd): call
        :meth:`forget` and write again.
        """
        r = self.retention
        if r.keeps_forever:
            return None
        now = self._clock()
        if self._lease_id is None or now - self._granted_at >= r.bucket_s:
            granted = await self._client.lease(r.period_s + r.bucket_s)
            self._lease_id, self._granted_at = int(granted.id), now
        return self._lease_id

    def forget(self) -> None:
        """Drop the current lease (etcd said it is gone); the next :meth:`lease` grants another."""
        self._lease_id = None


def expired_message(what: str, retention: Retention) -> str:
    """The NOT_FOUND text for an object that may have expired, e.g. a session id not in etcd."""
    if retention.keeps_forever and not retention.max_count:
        return f"{what} not found"
    reasons = []
    if not retention.keeps_forever:
        reasons.append(f"it finished more than {retention.describe()} ago")
    if retention.max_count:
        reasons.append(f"it was among the oldest beyond the {retention.max_count:,} kept")
    return f"{what} not found: it never existed, or {' or '.join(reasons)} (retention)"


__all__ = [
    "DEFAULT_PERIODS",
    "MAX_COUNT",
    "ExpiryLeases",
    "Retention",
    "expired_message",
    "parse_count",
    "parse_period",
]
