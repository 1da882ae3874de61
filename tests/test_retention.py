"""Retention by expiry leases on a real etcd: finished objects end by themselves, without a scan."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from harness.wait import eventually
from mabeam.config import ConfigError
from mabeam.runtime.etcd import EtcdClient
from mabeam.runtime.retention import ExpiryLeases, Retention, expired_message, parse_period


def test_periods_parse_with_units_and_refuse_garbage() -> None:
    assert parse_period("7d", "X") == 7 * 86_400
    assert parse_period("36h", "X") == 36 * 3_600
    assert parse_period("90m", "X") == 5_400
    assert parse_period("600", "X") == parse_period("600s", "X") == 600
    assert parse_period("0", "X") == 0
    for bad in ("", "7 days", "-1d", "1y", "1.5h", "99999w"):
        with pytest.raises(ConfigError, match="X="):
            parse_period(bad, "X")


def test_retention_comes_from_the_flag_then_the_environment_then_the_default() -> None:
    assert Retention.load("session", {}).period_s == 7 * 86_400
    env = {"MABEAM_SESSION_RETENTION": "36h"}
    assert Retention.load("session", env).period_s == 36 * 3_600
    assert Retention.load("session", env, given="10m").period_s == 600
    r = Retention.load("goal", {"MABEAM_GOAL_RETENTION": "100s"})
    assert (r.period_s, r.bucket_s) == (100, 1)
    assert Retention.load("goal", {"MABEAM_GOAL_RETENTION": "30d"}).bucket_s == 3_600
    assert "more than 36 hours ago" in expired_message("session 's1'", Retention.load("session", env))
    assert (
        expired_message("goal 'g'", Retention.load("goal", {"MABEAM_GOAL_RETENTION": "0"}))
        == "goal 'g' not found"
    )


async def test_objects_finished_in_one_bucket_share_a_lease_and_vanish_after_the_period(
    etcd_client: EtcdClient,
) -> None:
    now = [0.0]
    expiry = ExpiryLeases(etcd_client, Retention("session", period_s=2, bucket_s=1), clock=lambda: now[0])
    first = await expiry.lease()
    assert first is not None and await expiry.lease() == first  # same bucket, same lease
    await etcd_client.put(b"/retention-test/a", b"done", lease=first)
    now[0] += 1.0
    second = await expiry.lease()
    assert second is not None and second != first  # the next bucket
    await etcd_client.put(b"/retention-test/b", b"done", lease=second)
    assert await etcd_client.get(b"/retention-test/a") is not None
    # The lease's TTL is the period plus a bucket, counted by etcd.
    assert 2 <= (await etcd_client.get_lease_info(first)).TTL <= 3

    async def gone() -> bool:
        a = await etcd_client.get(b"/retention-test/a")
        b = await etcd_client.get(b"/retention-test/b")
        return a is None and b is None

    # etcd ends them itself: period + bucket = 3 s at the most (plus etcd's expiry tick).
    await eventually(gone, timeout=8, interval=0.2, what="finished objects deleted by their lease")


async def test_kept_for_good_means_no_lease(etcd_client: EtcdClient) -> None:
    expiry = ExpiryLeases(etcd_client, Retention("goal", period_s=0, bucket_s=1))
    assert await expiry.lease() is None


def test_the_readme_retention_command_sets_what_the_services_read() -> None:
    """The README's Retention example: every variable it sets is one the services read, as it says."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Retention", 1)[1].split("\n## ", 1)[0]
    (command,) = re.findall(r"```\n(MABEAM_.*?)\n```", section)
    words = shlex.split(command)
    env = dict(w.split("=", 1) for w in words if "=" in w)
    assert words[len(env) :] == ["mabeam", "up"]
    assert Retention.load("session", env).period_s == 36 * 3_600
    assert Retention.load("session", env).max_count == 100_000
    assert Retention.load("goal", env).period_s == 3 * 86_400
    known = {
        f"MABEAM_{k.upper()}_RETENTION{s}" for k in ("session", "goal", "supervised") for s in ("", "_COUNT")
    }
    assert set(env) <= known, set(env) - known
