"""``mabeam bench soak``: a mesh kept busy for a while, to show that what it holds stays flat.

The soak starts a mesh of its own — an embedded etcd whose auto-compaction
keeps half a retention period of history, the four services with every
retention (``MABEAM_SESSION_RETENTION``, ``MABEAM_GOAL_RETENTION``,
``MABEAM_SUPERVISED_RETENTION``) set to ``--retention``, auth on — and an
AgentHost process with ``--agents`` agents (1,000 by default), then for
``--duration`` keeps it busy at fixed rates:

============  ==========================================================================
load          what
============  ==========================================================================
auctions      sealed-bid rounds of mixed sizes, one after the other, 12 a second: 10 and 100
              agents named at random, and every agent by capability (sizes 10, 100, 10, 1,000, ...)
goals         small goals (a chain of 2 steps, then 2 steps in parallel), one after the other,
              5 a second, each followed to its end with ``ExecuteGoal``
CAS writes    compare-and-set ``SetVariable`` on 16 variables in turn, 80 a second
watches       4 ``WatchVariables`` streams on those variables, each closed after 2-8 s and
              opened again
============  ==========================================================================

Every ``--sample-every`` seconds it records, beside the operations done and
the errors so far: etcd's database size (and the part in use) and revision
(Maintenance Status), the key count under the mesh prefix and per first path
segment (a keys-only range, paged), etcd's open watches and watch streams
(``etcd_debugging_mvcc_watcher_total``, ``etcd_debugging_mvcc_watch_stream_total``
from its ``/metrics``, with the raft entries it applied and the snapshots it
saved), and the RSS of every process (etcd, each service, the AgentHost,
this driver) with psutil.

Each load but the watches runs at a fixed rate (:data:`RATES`, about 70 % of
what one loop did back to back on the quiet 2-core machine), not as fast as
the mesh answers: what the mesh keeps is rate x retention, and a rate that
follows the machine's other work (the first 30-minute runs: tens of percent)
moves the kept data by as much, which no flatness goal can tell from a leak.
A loop that falls behind its schedule runs back to back until it catches up
(the rates reached are in ``operations``).

The flatness window starts once both what the mesh keeps and what etcd
keeps of its history are in their steady state: after the first retention
window plus one retention bucket (:class:`mabeam.runtime.retention.Retention`)
and then two of etcd's compaction periods (its periodic compactor keeps
between one and two periods of history: the first 30-minute run, with
compaction at half the retention and the window at the retention, saw the
database still growing until the second compaction after it), at the first
sample from then on. Per series the row gives the value there (``start``), at
the end (``end``), ``ratio`` = end / start and the largest value in the
window; its own ``ratio`` is the database size's, with the goal ``ratio <=
1.05`` (and the same for the key count and each process's RSS beside it);
``met`` says whether every one of them and zero errors hold. The revision
grows with every write by design: for it the row gives the write rate in
the two halves of the window instead.

Only by name (``mabeam bench soak``): it runs for minutes. ``--quick`` is the
short version (90 s, retention 20 s); the full one is 30 minutes with a
12-minute retention, longer than the 10-11 minutes request-id records are
kept (:data:`mabeam.runtime.idempotency.WINDOW_S`), so every kind of record
has reached its steady state when the window opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd.rpc
import psutil
from google.protobuf import struct_pb2

from mabeam import auth
from mabeam.bench.core import BenchContext, benchmark
from mabeam.client import MeshClient
from mabeam.config import SERVICES, ConfigError, MeshConfig
from mabeam.runtime import process
from mabeam.runtime.embedded_etcd import EmbeddedEtcd
from mabeam.runtime.etcd import EtcdClient, connect
from mabeam.runtime.etcd.maintenance import member_status
from mabeam.runtime.idempotency import WINDOW_S
from mabeam.runtime.mesh import LocalMesh
from mabeam.runtime.retention import DEFAULT_PERIODS, Retention, parse_period

# The goal of every flat series, and how it is written in the row.
FLAT_RATIO = 1.05
GOAL = "ratio <= 1.05"
AUCTION_SIZES = (10, 100, 10, 1000, 10, 100)
VARIABLES = 16
WATCHERS = 4
WATCH_LIFE_S = (2.0, 8.0)
# Operations a second of each paced load (see the module doc).
RATES = {"auction": 12.0, "goal": 5.0, "cas": 80.0}
# After an error a loop waits this long before its next operation (no hot loop on a dead service).
ERROR_PAUSE_S = 0.2
KEY_PAGE = 5000
# etcd's /metrics: open watches and watch streams; raft entries applied and snapshots saved (its
# raft log is kept in memory until a snapshot, every 100,000 entries by default: its RSS before
# the first snapshot is not comparable with after).
_METRICS = {
    b"etcd_debugging_mvcc_watcher_total": "etcd_watchers",
    b"etcd_debugging_mvcc_watch_stream_total": "etcd_watch_streams",
    b"etcd_server_proposals_applied_total": "etcd_raft_applied",
    b"etcd_debugging_snap_save_total_duration_seconds_count": "etcd_snapshots",
}
_METRIC = re.compile(rb"^(" + b"|".join(_METRICS) + rb")\s+(\S+)", re.M)


@dataclass(frozen=True)
class SoakSettings:
    """How long, how short a retention, how many agents, how often a sample."""

    duration_s: int = 1800
    retention_s: int = 720
    agents: int = 1000
    sample_every_s: int = 0  # 0: a sixtieth of the duration, between 2 and 30 s

    @property
    def every_s(self) -> int:
        return self.sample_every_s or min(30, max(2, self.duration_s // 60))

    @property
    def bucket_s(self) -> int:
        """The retention bucket: objects finished within one share an expiry lease."""
        return Retention.load("session", {}, f"{self.retention_s}s").bucket_s

    @property
    def window_start_s(self) -> int:
        """Where the flatness window opens: the first retention window plus one bucket, then two
        compaction periods (etcd's history reaches its steady band of one to two periods)."""
        return self.retention_s + self.bucket_s + 2 * self.compaction_retention_s

    @property
    def compaction_retention_s(self) -> int:
        """etcd's periodic auto-compaction period: a quarter of the retention (it keeps one to two
        periods of history, at most half a retention)."""
        return max(1, self.retention_s // 4)

    @staticmethod
    def parse(
        duration: str | None, retention: str | None, agents: int | None, sample_every: str | None, quick: bool
    ) -> SoakSettings:
        """The settings from ``mabeam bench soak``'s flags (None: the default of the mode); ConfigError names the flag."""
        base = QUICK if quick else FULL
        settings = SoakSettings(
            duration_s=parse_period(duration, "--duration") if duration else base.duration_s,
            retention_s=parse_period(retention, "--retention") if retention else base.retention_s,
            agents=base.agents if agents is None else agents,
            sample_every_s=parse_period(sample_every, "--sample-every") if sample_every else 0,
        )
        if settings.duration_s < 10:
            raise ConfigError(f"--duration {duration}: at least 10s")
        if settings.retention_s < 1:
            raise ConfigError(f"--retention {retention}: at least 1s (a soak needs a retention)")
        if settings.duration_s <= settings.window_start_s:
            raise ConfigError(
                f"--duration {duration or settings.duration_s}: longer than where flatness is measured from, "
                f"{settings.window_start_s} s (retention + bucket + two etcd compaction periods)"
            )
        if not 10 <= settings.agents <= 10_000:
            raise ConfigError(f"--agents {agents}: between 10 and 10000")
        return settings


FULL = SoakSettings()
QUICK = SoakSettings(duration_s=90, retention_s=20)


def _series(values: list[tuple[float, float]], window_start: float) -> dict[str, Any]:
    """start / end / ratio / max of one series over the window (value at the first sample in it)."""
    inside = [(t, v) for t, v in values if t >= window_start]
    doc: dict[str, Any] = {"first": values[0][1] if values else None, "start": None, "end": None}
    if values:
        doc["end"] = values[-1][1]
    if len(inside) >= 2:
        start = inside[0][1]
        doc["start"] = start
        doc["max"] = max(v for _, v in inside)
        doc["ratio"] = round(values[-1][1] / start, 4) if start else None
    else:
        doc["ratio"] = None
    return doc


@dataclass
class SoakResult:
    """The soak's row: settings, operations, errors, samples and the per-series verdict."""

    settings: SoakSettings
    elapsed_s: float
    operations: Counter[str]
    errors: Counter[str]
    error_messages: list[str]
    samples: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        s = self.settings
        window = float(s.window_start_s)
        samples = self.samples

        def track(get: Any) -> list[tuple[float, float]]:
            return [(x["t_s"], float(get(x))) for x in samples if get(x) is not None]

        series: dict[str, Any] = {
            "etcd_db_size_bytes": _series(track(lambda x: x["etcd_db_size_bytes"]), window),
            "etcd_db_size_in_use_bytes": _series(track(lambda x: x["etcd_db_size_in_use_bytes"]), window),
            "etcd_keys": _series(track(lambda x: x["etcd_keys"]), window),
            "etcd_watchers": _series(track(lambda x: x["etcd_watchers"]), window),
            "etcd_watch_streams": _series(track(lambda x: x["etcd_watch_streams"]), window),
        }
        processes = sorted({name for x in samples for name in x["rss_bytes"]})
        rss = {
            name: _series(track(lambda x, name=name: x["rss_bytes"].get(name)), window) for name in processes
        }
        prefixes = sorted({p for x in samples for p in x["etcd_keys_by_prefix"]})
        keys_by_prefix = {
            p: _series(track(lambda x, p=p: x["etcd_keys_by_prefix"].get(p, 0)), window) for p in prefixes
        }
        # The revision grows with every write: its rate in each half of the window instead.
        revision: dict[str, Any] = {"end": samples[-1]["etcd_revision"] if samples else None}
        load: dict[str, Any] = {}
        inside = [x for x in samples if x["t_s"] >= window]
        if len(inside) >= 3:
            mid = inside[len(inside) // 2]

            def rate(a: dict[str, Any], b: dict[str, Any], what: str) -> float:
                return round((b[what] - a[what]) / max(1e-9, b["t_s"] - a["t_s"]), 1)

            revision["writes_per_s_first_half"] = rate(inside[0], mid, "etcd_revision")
            revision["writes_per_s_second_half"] = rate(mid, inside[-1], "etcd_revision")
            # What is kept is rate x retention: a load that slowed keeps less (not a leak fixed).
            load["operations_per_s_first_half"] = rate(inside[0], mid, "operations")
            load["operations_per_s_second_half"] = rate(mid, inside[-1], "operations")
        series["etcd_revision"] = revision

        # Flat: every series within the goal. Watches may legitimately be 0 -> 0.
        def flat(doc: dict[str, Any]) -> bool | None:
            if doc.get("start") is None:
                return None
            if doc["start"] == 0:
                return bool(doc["end"] == 0)
            return bool(doc["ratio"] is not None and doc["ratio"] <= FLAT_RATIO)

        checked = {name: series[name] for name in ("etcd_db_size_bytes", "etcd_keys", "etcd_watchers")}
        checked.update({f"rss_{name}": doc for name, doc in rss.items()})
        verdicts = {name: flat(doc) for name, doc in checked.items()}
        errors = sum(self.errors.values())
        notes = list(self.notes)
        first_snapshot = next((x["t_s"] for x in samples if (x.get("etcd_snapshots") or 0) > 0), None)
        if first_snapshot is None or first_snapshot > window:
            when = (
                "no snapshot" if first_snapshot is None else f"its first snapshot at {first_snapshot:.0f} s"
            )
            notes.append(
                f"etcd saved {when}, not before the window opened: until a snapshot its RSS"
                " holds its raft log (--snapshot-count, 10,000 entries)"
            )
        if any(v is None for v in verdicts.values()):
            notes.append(
                f"the window opens at {window:.0f} s (retention {s.retention_s} s + bucket {s.bucket_s} s);"
                " the run ended with fewer than two samples in it: no verdict"
            )
        return {
            "duration_s": s.duration_s,
            "elapsed_s": round(self.elapsed_s, 1),
            "agents": s.agents,
            "retention_s": s.retention_s,
            "retention_bucket_s": s.bucket_s,
            "etcd_compaction_retention_s": s.compaction_retention_s,
            "request_record_window_s": WINDOW_S,
            "sample_every_s": s.every_s,
            "window_start_s": window,
            "baseline": "the same series at the first sample after the first retention window (+ one bucket) "
            "and two etcd compaction periods",
            "ratio": series["etcd_db_size_bytes"]["ratio"],
            "goal": GOAL,
            "key_ratio": series["etcd_keys"]["ratio"],
            "rss_ratio": {name: doc["ratio"] for name, doc in rss.items()},
            "watcher_ratio": series["etcd_watchers"]["ratio"],
            "flat": verdicts,
            "met": errors == 0 and all(v is True for v in verdicts.values()),
            "paced_per_s": dict(RATES),
            "operations": dict(sorted(self.operations.items())),
            "operations_total": sum(self.operations.values()),
            "operations_per_s": round(sum(self.operations.values()) / max(1e-9, self.elapsed_s), 1),
            "window_load": load,
            "errors": errors,
            "errors_by_kind": dict(sorted(self.errors.items())),
            "error_messages": self.error_messages,
            "series": series,
            "rss_bytes": rss,
            "etcd_keys_by_prefix": keys_by_prefix,
            "notes": notes,
            "samples": samples,
        }


def _metrics(endpoint: str) -> dict[str, int]:
    url = endpoint if endpoint.startswith("http") else f"http://{endpoint}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url.rstrip("/") + "/metrics", timeout=5) as reply:
        body = reply.read()
    return {_METRICS[m.group(1)]: int(float(m.group(2))) for m in _METRIC.finditer(body)}


async def _keys_by_prefix(client: EtcdClient, prefix: str) -> Counter[str]:
    """Keys under ``prefix`` counted by their first path segment (a keys-only range, paged)."""
    await client.connect()
    assert client.kvstub is not None
    start = prefix.rstrip("/").encode() + b"/"
    end = start[:-1] + b"0"  # "/" + 1
    key = start
    counts: Counter[str] = Counter()
    while True:
        request = aetcd.rpc.RangeRequest(
            key=key, range_end=end, keys_only=True, limit=KEY_PAGE, serializable=True
        )
        reply = await client.kvstub.Range(request, timeout=30, metadata=client.metadata)
        for kv in reply.kvs:
            counts[kv.key[len(start) :].split(b"/", 1)[0].decode(errors="replace")] += 1
        if not reply.more or not reply.kvs:
            return counts
        key = reply.kvs[-1].key + b"\0"


class SoakRun:
    """One soak: its mesh, its load and its samples."""

    def __init__(self, settings: SoakSettings, tmp: Path) -> None:
        self.settings = settings
        self.tmp = tmp
        self.etcd: EmbeddedEtcd | None = None
        self.mesh: LocalMesh | None = None
        self.host: subprocess.Popen[bytes] | None = None
        self.client: MeshClient | None = None
        self.store: EtcdClient | None = None
        self.operations: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.error_messages: list[str] = []
        self.samples: list[dict[str, Any]] = []
        self.t0 = 0.0
        self.agent_ids: list[str] = []
        self._token_before: str | None = None
        self._procs: dict[str, psutil.Process] = {}

    async def start(self) -> None:
        s = self.settings
        self.etcd = EmbeddedEtcd(
            self.tmp / "etcd" / "data",
            unsafe_no_fsync=True,
            compaction_retention=f"{s.compaction_retention_s}s",
        )
        await self.etcd.start()
        period = f"{s.retention_s}s"
        env = {f"MABEAM_{kind.upper()}_RETENTION": period for kind in DEFAULT_PERIODS}
        self.mesh = LocalMesh(
            MeshConfig(
                etcd_endpoints=(self.etcd.endpoint,),
                data_dir=self.tmp / "mesh",
                ports={name: 0 for name in SERVICES},
                grace=0.5,
            ),
            log_dir=self.tmp / "logs",
            extra_env=env,
        )
        await self.mesh.start()
        self._token_before = os.environ.get(auth.TOKEN_ENV)
        os.environ[auth.TOKEN_ENV] = self.mesh.admin_token or ""
        prefix = "soak-"
        self.host = process.spawn(
            process.python_module_argv(
                "mabeam.bench.agent_host",
                "--registry",
                self.mesh.address("registry"),
                "--count",
                str(s.agents),
                "--prefix",
                prefix,
                "--capability",
                "soak",
            ),
            stdout=subprocess.PIPE,
        )
        assert self.host.stdout is not None
        line = (await asyncio.to_thread(self.host.stdout.readline)).decode().strip()
        if not line.startswith("agents ready on "):
            raise RuntimeError(f"soak: the agent host did not start: {line!r}")
        self.agent_ids = [f"{prefix}{i:05d}" for i in range(s.agents)]
        self.client = await MeshClient.connect(
            registry=self.mesh.address("registry"),
            orchestrator=self.mesh.address("orchestrator"),
            coordination=self.mesh.address("coordination"),
            planner=self.mesh.address("planner"),
        )
        self.store = await connect([self.etcd.endpoint])
        pids = {"etcd": self.etcd.pid, "agent_host": self.host.pid, "driver": os.getpid()}
        pids.update({p.name: p.pid for p in self.mesh.processes})
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items() if pid is not None}

    async def stop(self) -> None:
        if self._token_before is None:
            os.environ.pop(auth.TOKEN_ENV, None)
        else:
            os.environ[auth.TOKEN_ENV] = self._token_before
        if self.client is not None:
            await self.client.close()
        if self.store is not None:
            await self.store.close()
        if self.host is not None:
            await process.terminate(self.host, 5)
            if self.host.stdout is not None:
                self.host.stdout.close()
        if self.mesh is not None:
            await self.mesh.stop()
        if self.etcd is not None:
            await self.etcd.stop()

    def _failed(self, kind: str, exc: BaseException) -> None:
        self.errors[kind] += 1
        if len(self.error_messages) < 20:
            self.error_messages.append(
                f"{kind} at {time.monotonic() - self.t0:.1f} s: {type(exc).__name__}: {exc}"
            )

    # -- the load ---------------------------------------------------------------

    async def _paced(self, kind: str, i: int) -> None:
        """Wait for the ``i``-th operation's turn at ``RATES[kind]`` a second from the start."""
        due = self.t0 + i / RATES[kind]
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _auctions(self) -> None:
        from mabeam.v1 import common_pb2, coordination_pb2

        assert self.client is not None
        rng = random.Random(1)
        for i in itertools.count():
            await self._paced("auction", i)
            size = min(AUCTION_SIZES[i % len(AUCTION_SIZES)], len(self.agent_ids))
            if size >= len(self.agent_ids):
                selector = common_pb2.AgentSelector(capability="soak")
            else:
                selector = common_pb2.AgentSelector(agent_ids=rng.sample(self.agent_ids, size))
            request = coordination_pb2.RunAuctionRequest(
                settings=coordination_pb2.SessionSettings(participants=selector),
                type=coordination_pb2.AUCTION_TYPE_SECOND_PRICE,
                item=f"soak-{i}",
            )
            request.settings.round_timeout.FromSeconds(10)
            request.settings.deadline.FromSeconds(30)
            request.settings.view = coordination_pb2.SESSION_VIEW_BASIC
            kind = f"auction_{size}"
            try:
                reply = await self.client.coordination.RunAuction(request)
                if not reply.session.outcome.decided or reply.session.excluded:
                    raise RuntimeError(
                        f"{len(reply.session.excluded)} excluded, decided={reply.session.outcome.decided}:"
                        f" {reply.session.outcome.reason}"
                    )
                self.operations[kind] += 1
            except Exception as exc:
                self._failed(kind, exc)
                await asyncio.sleep(ERROR_PAUSE_S)

    async def _goals(self) -> None:
        from mabeam.v1 import planner_pb2

        assert self.client is not None
        for i in itertools.count():
            await self._paced("goal", i)
            steps = [
                planner_pb2.StepSpec(step_id="a", capability="soak"),
                planner_pb2.StepSpec(step_id="b", capability="soak", depends_on=["a"]),
                planner_pb2.StepSpec(step_id="c", capability="soak", depends_on=["b"]),
                planner_pb2.StepSpec(step_id="d", capability="soak", depends_on=["b"]),
            ]
            steps[0].input.CopyFrom(struct_pb2.Value(string_value=f"goal {i}"))
            goal = planner_pb2.GoalSpec(name=f"soak-{i}", steps=steps)
            try:
                last = None
                async for event in self.client.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal=goal)):
                    last = event
                if last is None or last.goal_state != planner_pb2.GOAL_STATE_SUCCEEDED:
                    raise RuntimeError(f"the goal ended {last.goal_state if last else 'without events'}")
                self.operations["goal"] += 1
            except Exception as exc:
                self._failed("goal", exc)
                await asyncio.sleep(ERROR_PAUSE_S)

    async def _cas(self) -> None:
        from mabeam.v1 import common_pb2, orchestrator_pb2

        assert self.client is not None
        versions = [0] * VARIABLES
        for i in itertools.count():
            await self._paced("cas", i)
            n = i % VARIABLES
            try:
                reply = await self.client.orchestrator.SetVariable(
                    orchestrator_pb2.SetVariableRequest(
                        name=f"soak/v{n}", value=common_pb2.Value(int_value=i), expected_version=versions[n]
                    )
                )
                versions[n] = reply.variable.version
                self.operations["cas"] += 1
            except Exception as exc:
                self._failed("cas", exc)
                with contextlib.suppress(Exception):  # the version to compare with next time
                    got = await self.client.orchestrator.GetVariable(
                        orchestrator_pb2.GetVariableRequest(name=f"soak/v{n}")
                    )
                    versions[n] = got.variable.version
                await asyncio.sleep(ERROR_PAUSE_S)

    async def _watch(self, seed: int) -> None:
        from mabeam.v1 import orchestrator_pb2

        assert self.client is not None
        rng = random.Random(seed)
        while True:
            call = self.client.orchestrator.WatchVariables(
                orchestrator_pb2.WatchVariablesRequest(prefix="soak/")
            )
            life = rng.uniform(*WATCH_LIFE_S)

            async def read(call: Any = call) -> None:
                async for _ in call:
                    self.operations["watch_events"] += 1

            try:
                # Ends by its time (the normal case), or early with an error.
                await asyncio.wait_for(read(), life)
                raise RuntimeError("the watch ended by itself")
            except TimeoutError:
                self.operations["watch"] += 1
            except Exception as exc:
                self._failed("watch", exc)
                await asyncio.sleep(ERROR_PAUSE_S)
            finally:
                # The SDK's stream is an async generator over the call: closing it cancels the call.
                await call.aclose()

    # -- the samples -------------------------------------------------------------

    async def sample(self) -> dict[str, Any]:
        assert self.etcd is not None and self.store is not None and self.mesh is not None
        t = time.monotonic() - self.t0
        status = await member_status(self.etcd.endpoint)
        keys = await _keys_by_prefix(self.store, self.mesh.config.prefix)
        try:
            metrics = await asyncio.to_thread(_metrics, self.etcd.endpoint)
        except OSError as exc:
            self._failed("sample", exc)
            metrics = {}
        rss: dict[str, int] = {}
        for name, proc in self._procs.items():
            with contextlib.suppress(psutil.Error):
                rss[name] = int(proc.memory_info().rss)
        return {
            "t_s": round(t, 2),
            "etcd_db_size_bytes": status.db_size,
            "etcd_db_size_in_use_bytes": status.db_size_in_use,
            "etcd_revision": status.revision,
            "etcd_keys": sum(keys.values()),
            "etcd_keys_by_prefix": dict(sorted(keys.items())),
            "etcd_watchers": metrics.get("etcd_watchers"),
            "etcd_watch_streams": metrics.get("etcd_watch_streams"),
            "etcd_raft_applied": metrics.get("etcd_raft_applied"),
            "etcd_snapshots": metrics.get("etcd_snapshots"),
            "rss_bytes": rss,
            "operations": sum(self.operations.values()),
            "errors": sum(self.errors.values()),
        }

    async def _sampler(self, deadline: float) -> None:
        every = self.settings.every_s
        n = 0
        while True:
            n += 1
            await asyncio.sleep(max(0.0, self.t0 + n * every - time.monotonic()))
            if time.monotonic() >= deadline:
                return
            await self._record()

    async def _record(self) -> None:
        try:
            x = await self.sample()
        except Exception as exc:
            self._failed("sample", exc)
            return
        self.samples.append(x)
        print(
            f"soak {x['t_s']:7.1f}s ops={x['operations']} errors={x['errors']} db={x['etcd_db_size_bytes']}"
            f" in_use={x['etcd_db_size_in_use_bytes']} keys={x['etcd_keys']} rev={x['etcd_revision']}"
            f" watchers={x['etcd_watchers']}",
            file=sys.stderr,
            flush=True,
        )

    async def drive(self) -> float:
        """Run the load for the duration, sampling as it goes; seconds it ran."""
        self.t0 = time.monotonic()
        deadline = self.t0 + self.settings.duration_s
        await self._record()
        loads = [
            asyncio.create_task(self._auctions()),
            asyncio.create_task(self._goals()),
            asyncio.create_task(self._cas()),
            *(asyncio.create_task(self._watch(seed)) for seed in range(WATCHERS)),
        ]
        sampler = asyncio.create_task(self._sampler(deadline))
        try:
            done, _ = await asyncio.wait([*loads, sampler], timeout=max(0.0, deadline - time.monotonic()))
            for task in done:  # a load loop never ends by itself: one that did raised
                if task is not sampler:
                    task.result()  # raises what ended it
        finally:
            for task in [*loads, sampler]:
                task.cancel()
            await asyncio.gather(*loads, sampler, return_exceptions=True)
        elapsed = time.monotonic() - self.t0
        await self._record()  # the last sample: the end of the run
        return elapsed


@benchmark(
    "soak",
    "1,000 agents kept busy (auctions, goals, CAS writes, watches), retention short: etcd and RSS stay flat",
    default=False,
    baselines=False,
)
async def soak(ctx: BenchContext) -> SoakResult:
    settings = ctx.options.get("soak") or (QUICK if ctx.quick else FULL)
    print(
        f"soak: {settings.duration_s} s, retention {settings.retention_s} s, {settings.agents} agents,"
        f" a sample every {settings.every_s} s; flatness from {settings.window_start_s} s",
        file=sys.stderr,
        flush=True,
    )
    run = SoakRun(settings, ctx.tmp / "soak")
    try:
        await run.start()
        elapsed = await run.drive()
    finally:
        await run.stop()
    notes = []
    if settings.window_start_s < 1.1 * WINDOW_S:
        notes.append(
            f"request-id records are kept {WINDOW_S}-{int(WINDOW_S * 1.1)} s whatever the retention"
            " (mabeam.runtime.idempotency): in a shorter run they grow through the window (see etcd_keys_by_prefix)"
        )
    return SoakResult(settings, elapsed, run.operations, run.errors, run.error_messages, run.samples, notes)
