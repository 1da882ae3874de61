"""`mabeam bench` prints one JSON document: baselines and benchmarks with their ratios."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

pytestmark = pytest.mark.timeout(240)

NAMES = [
    "lookup",
    "auction_10",
    "auction_100",
    "auction_1000",
    "var_read",
    "var_cas",
    "planner_step",
    "agent_removal",
    "supervised_restart",
    "goal_resume",
    "publish_1000",
    "soak",
]


async def run(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mabeam.cli",
        "bench",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_every_design_benchmark_is_there() -> None:
    code, out, _ = await run("--list")
    assert code == 0
    assert sorted(line.split()[0] for line in out.splitlines()) == sorted(NAMES)


async def test_quick_run_prints_the_document() -> None:
    code, out, err = await run("--quick", "auction_10", "var_read")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["machine"]["cpus"] >= 1
    assert {"ping", "fanout_10", "fanout_100", "fanout_1000", "etcd_get", "etcd_put", "etcd_txn"} <= set(
        doc["baselines"]
    )
    for name in ("auction_10", "var_read"):
        result = doc["benchmarks"][name]
        assert result["median_s"] > 0 and result["baseline_median_s"] > 0
        assert result["ratio"] == pytest.approx(result["median_s"] / result["baseline_median_s"])


async def test_unknown_benchmark_is_refused() -> None:
    code, _, err = await run("nope")
    assert code == 2 and "nope" in err and "lookup" in err


async def test_short_soak_reports_flat_series_and_no_errors() -> None:
    """The CI version of the soak: every kind of load ran, no error, samples over time, finished work expired."""
    code, out, err = await run(
        "soak", "--duration", "30s", "--retention", "8s", "--agents", "200", "--sample-every", "3s"
    )
    assert code == 0, err[-3000:]
    doc = json.loads(out)
    assert doc["baselines"] == {}  # the soak alone needs no latency baseline
    row = doc["benchmarks"]["soak"]
    assert row["errors"] == 0, row["error_messages"]
    assert (
        row["goal"] == "ratio <= 1.05" and row["window_start_s"] == 8 + 1 + 2 * 2
    )  # retention + bucket + two compaction periods
    ops = row["operations"]
    for kind in ("auction_10", "auction_100", "auction_200", "goal", "cas", "watch", "watch_events"):
        assert ops.get(kind, 0) > 0, (kind, ops)
    samples = row["samples"]
    times = [s["t_s"] for s in samples]
    assert len(samples) >= 8 and times == sorted(times) and times[-1] >= 29, times
    for sample in samples:
        assert sample["etcd_db_size_bytes"] > 0 and sample["etcd_keys"] >= 3 * 200  # 3 keys per agent
        assert sample["etcd_watchers"] > 0 and sample["etcd_watch_streams"] > 0
        assert sample["etcd_raft_applied"] > 0 and sample["etcd_snapshots"] is not None
        assert {"etcd", "registry-0", "orchestrator-0", "coordination-0", "planner-0", "agent_host"} <= set(
            sample["rss_bytes"]
        )
    db = row["series"]["etcd_db_size_bytes"]
    assert row["ratio"] == pytest.approx(db["end"] / db["start"], rel=1e-3)
    assert row["key_ratio"] is not None and set(row["rss_ratio"]) >= {"etcd", "registry-0"}
    assert all(v is not None for v in row["rss_ratio"].values())
    # Finished sessions and goals are deleted after the retention: far fewer left than were run.
    keys = row["etcd_keys_by_prefix"]
    auctions = sum(n for kind, n in ops.items() if kind.startswith("auction_"))
    assert keys["sessions"]["end"] < auctions / 2, (keys["sessions"], auctions)
    assert keys["goals"]["end"] < ops["goal"] / 2, (keys["goals"], ops["goal"])


async def test_soak_flags_are_checked() -> None:
    code, out, err = await run("soak", "--duration", "5x")
    assert code == 2 and out == "" and "--duration" in err
    code, _, err = await run("lookup", "--retention", "10s")
    assert code == 2 and "soak" in err
    # A run that ends before the flatness window opens would measure nothing.
    code, _, err = await run("soak", "--duration", "15m", "--retention", "12m")
    assert code == 2 and "1087 s" in err, err
