"""What every benchmark shares: timing, statistics, the mesh and the raw baselines.

A benchmark is an async function registered with :func:`benchmark`; it gets a
:class:`BenchContext` that starts, once per run and only when asked, the mesh
(embedded etcd + the four services), a raw ping server and an etcd client.
Raw baselines (:data:`BASELINES`) are measured in the same run, on the same
etcd and the same machine, and cached for the run, so a benchmark's ratio is
``our median / baseline median`` with both taken minutes apart at most.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from grpc import aio

from mabeam import auth
from mabeam.bench.ping_server import PING_METHOD
from mabeam.config import SERVICES, MeshConfig
from mabeam.runtime import process
from mabeam.runtime.etcd import EtcdClient, connect
from mabeam.runtime.mesh import LocalMesh

# The agent kinds the benchmark mesh's registry may launch (its --agent-catalog).
BENCH_CATALOG = {
    "worker": {
        "argv": [sys.executable, str(Path(__file__).resolve().parent.parent / "examples" / "worker.py")],
        "allowed_args": ["--lease-ttl="],
    }
}


def summarize(samples: list[float]) -> dict[str, float | int]:
    """Median, p99, mean and count of samples in seconds."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * (len(ordered) - 1))))]
    return {
        "median_s": statistics.median(ordered),
        "p99_s": p99,
        "mean_s": statistics.fmean(ordered),
        "n": len(ordered),
    }


async def timed(fn: Callable[[], Awaitable[Any]], n: int, warmup: int = 5) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``n`` times, one after the other; seconds each."""
    for _ in range(warmup):
        await fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - t0)
    return samples


async def interleaved(*fns: Callable[[], Awaitable[Any]], n: int, warmup: int = 50) -> list[list[float]]:
    """Time ``fns`` alternately, call by call, so all see the same noise; samples per function."""
    for _ in range(warmup):
        for fn in fns:
            await fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(n):
        for fn, out in zip(fns, samples, strict=True):
            t0 = time.perf_counter()
            await fn()
            out.append(time.perf_counter() - t0)
    return samples


@dataclass
class Result:
    """One benchmark's measurement beside its baseline."""

    samples: list[float]
    baseline: str
    baseline_median_s: float
    goal: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = dict(summarize(self.samples))
        doc["baseline"] = self.baseline
        doc["baseline_median_s"] = self.baseline_median_s
        doc["ratio"] = doc["median_s"] / self.baseline_median_s if self.baseline_median_s > 0 else None
        if self.goal:
            doc["goal"] = self.goal
        doc.update(self.extra)
        return doc


class Row(Protocol):
    """What a benchmark returns: its row of the JSON document (:class:`Result`, or the soak's own)."""

    def to_json(self) -> dict[str, Any]: ...


BenchFn = Callable[["BenchContext"], Awaitable[Row]]


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark.

    ``default``: run when no name is given (the soak, which runs for minutes, is
    run only by name); ``baselines``: the run measures the raw baselines for it.
    """

    name: str
    fn: BenchFn
    description: str
    default: bool = True
    baselines: bool = True


BENCHMARKS: dict[str, Benchmark] = {}


def benchmark(
    name: str, description: str, *, default: bool = True, baselines: bool = True
) -> Callable[[BenchFn], BenchFn]:
    """Register ``fn`` as the benchmark ``name`` (listed in order of registration)."""

    def register(fn: BenchFn) -> BenchFn:
        BENCHMARKS[name] = Benchmark(name, fn, description, default, baselines)
        return fn

    return register


class BenchContext:
    """The mesh, the raw ping server and the baselines of one run; started lazily."""

    def __init__(self, quick: bool, options: Mapping[str, Any] | None = None) -> None:
        self.quick = quick
        # Settings of one benchmark given on the command line (``"soak"``: its SoakSettings).
        self.options: Mapping[str, Any] = options or {}
        self._tmp = tempfile.TemporaryDirectory(prefix="mabeam-bench-")
        self._mesh: LocalMesh | None = None
        self._etcd: EtcdClient | None = None
        self._ping_proc: subprocess.Popen[bytes] | None = None
        self._ping_address: str | None = None
        self._channels: dict[str, aio.Channel] = {}
        self._baselines: dict[str, list[float]] = {}
        self._hosts: list[subprocess.Popen[bytes]] = []
        self._token_before: str | None = None

    def n(self, full: int, quick: int) -> int:
        """Iterations for this run's mode."""
        return quick if self.quick else full

    @property
    def tmp(self) -> Path:
        return Path(self._tmp.name)

    async def mesh(self) -> LocalMesh:
        """The mesh of this run: embedded etcd and one replica of each service."""
        if self._mesh is None:
            from mabeam.runtime.embedded_etcd import free_port

            config = MeshConfig(
                data_dir=self.tmp / "etcd",
                ports={s: 0 for s in SERVICES},
                grace=0.5,
            )
            # Service leases of 2 s (goal_resume measures a planner replica's
            # lease lapsing); agents' leases are their own.
            # The registry launches the worker as users' registries do: a kind of its catalog.
            catalog_file = self.tmp / "agents.yaml"
            catalog_file.write_text(json.dumps(BENCH_CATALOG))  # JSON is YAML
            self._mesh = LocalMesh(
                config,
                etcd_client_port=free_port(),
                etcd_peer_port=free_port(),
                # fsync off for the mesh and the raw etcd baseline alike: the
                # shared disk's fsync noise would drown the ratios.
                unsafe_no_fsync=True,
                log_dir=self.tmp / "logs",
                extra_env={"MABEAM_SERVICE_TTL": "2"},
                agent_catalog=str(catalog_file),
            )
            await self._mesh.start()
            # Auth on, as users run it: this run's clients and agent hosts present the admin token.
            self._token_before = os.environ.get(auth.TOKEN_ENV)
            os.environ[auth.TOKEN_ENV] = self._mesh.admin_token or ""
        return self._mesh

    async def etcd(self) -> EtcdClient:
        """A client of the mesh's etcd, as the services use it."""
        if self._etcd is None:
            mesh = await self.mesh()
            self._etcd = await connect(mesh.etcd_endpoints)
        return self._etcd

    def service_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata the mesh's services present to agents (the agent-call token); none without auth."""
        assert self._mesh is not None, "mesh not started"
        credentials = self._mesh.credentials
        if credentials is None:
            return ()
        return auth.call_metadata(auth.agent_call_token(auth.read_token_file(credentials.service_file)))

    def channel(self, address: str) -> aio.Channel:
        """A reused channel to ``address``."""
        channel = self._channels.get(address)
        if channel is None:
            channel = aio.insecure_channel(address)
            self._channels[address] = channel
        return channel

    async def ping_address(self) -> str:
        """The raw ping server (a separate process, as the services are)."""
        if self._ping_address is None:
            proc = process.spawn(
                process.python_module_argv("mabeam.bench.ping_server"), stdout=subprocess.PIPE
            )
            assert proc.stdout is not None
            line = (await asyncio.to_thread(proc.stdout.readline)).decode().strip()
            if not line.startswith("ping serving on "):
                raise RuntimeError(f"ping server did not start: {line!r}")
            self._ping_proc = proc
            self._ping_address = line.removeprefix("ping serving on ")
        return self._ping_address

    async def ping_fn(self) -> Callable[[], Awaitable[bytes]]:
        """A raw unary ping over a reused channel."""
        call = self.channel(await self.ping_address()).unary_unary(PING_METHOD, None, None)

        async def ping() -> bytes:
            return await call(b"x")  # type: ignore[no-any-return]

        return ping

    async def agent_host(self, count: int, *, prefix: str, capability: str, every: int = 1) -> str:
        """Start an AgentHost process with ``count`` agents; returns its address once all registered."""
        mesh = await self.mesh()
        proc = process.spawn(
            process.python_module_argv(
                "mabeam.bench.agent_host",
                "--registry",
                mesh.address("registry"),
                "--count",
                str(count),
                "--prefix",
                prefix,
                "--capability",
                capability,
                "--every",
                str(every),
            ),
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        line = (await asyncio.to_thread(proc.stdout.readline)).decode().strip()
        if not line.startswith("agents ready on "):
            await process.terminate(proc, 2)
            raise RuntimeError(f"agent host did not start: {line!r}")
        self._hosts.append(proc)
        return line.removeprefix("agents ready on ")

    async def fanout_fn(self, width: int) -> Callable[[], Awaitable[None]]:
        """One raw fan-out: ``width`` concurrent pings over one reused channel."""
        ping = await self.ping_fn()

        async def fan() -> None:
            await asyncio.gather(*(ping() for _ in range(width)))

        return fan

    async def baseline(self, name: str) -> float:
        """The median of a raw baseline (measured once per run)."""
        if name not in self._baselines:
            self._baselines[name] = await BASELINES[name](self)
        return float(statistics.median(self._baselines[name]))

    def baselines_json(self) -> dict[str, dict[str, float | int]]:
        """Every baseline measured in this run."""
        return {name: summarize(samples) for name, samples in self._baselines.items()}

    async def close(self) -> None:
        """Stop everything this run started."""
        if self._mesh is not None:
            if self._token_before is None:
                os.environ.pop(auth.TOKEN_ENV, None)
            else:
                os.environ[auth.TOKEN_ENV] = self._token_before
        for channel in self._channels.values():
            await channel.close(None)
        if self._etcd is not None:
            await self._etcd.close()
        for host in self._hosts:
            await process.terminate(host, 5)
            if host.stdout is not None:
                host.stdout.close()
        if self._ping_proc is not None:
            await process.terminate(self._ping_proc, 2)
            if self._ping_proc.stdout is not None:
                self._ping_proc.stdout.close()
        if self._mesh is not None:
            await self._mesh.stop()
        self._tmp.cleanup()


async def _ping(ctx: BenchContext) -> list[float]:
    return await timed(await ctx.ping_fn(), ctx.n(2000, 300))


def _fanout(width: int) -> Callable[[BenchContext], Awaitable[list[float]]]:
    async def measure(ctx: BenchContext) -> list[float]:
        rounds = max(5, ctx.n(20000, 3000) // width)
        return await timed(await ctx.fanout_fn(width), min(rounds, 200), warmup=2)

    return measure


async def _etcd_get(ctx: BenchContext) -> list[float]:
    client = await ctx.etcd()
    await client.put(b"/bench/raw/get", b"v")
    return await timed(lambda: client.get(b"/bench/raw/get"), ctx.n(2000, 300))


async def _etcd_put(ctx: BenchContext) -> list[float]:
    client = await ctx.etcd()
    return await timed(lambda: client.put(b"/bench/raw/put", b"v"), ctx.n(2000, 300))


async def _etcd_txn(ctx: BenchContext) -> list[float]:
    # The transaction a compare-and-set makes: compare a key's version, then put.
    client = await ctx.etcd()
    key = b"/bench/raw/txn"
    await client.put(key, b"0")

    async def txn() -> None:
        await client.transaction(
            compare=[client.transactions.version(key) > 0],
            success=[client.transactions.put(key, b"1")],
            failure=[],
        )

    return await timed(txn, ctx.n(2000, 300))


BASELINES: dict[str, Callable[[BenchContext], Awaitable[list[float]]]] = {
    "ping": _ping,
    "fanout_10": _fanout(10),
    "fanout_100": _fanout(100),
    "fanout_1000": _fanout(1000),
    "etcd_get": _etcd_get,
    "etcd_put": _etcd_put,
    "etcd_txn": _etcd_txn,
}
