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
