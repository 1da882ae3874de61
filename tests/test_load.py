"""Load: 1,000 agents on four AgentHost processes heartbeating while auctions and goals run.

The four services run as processes (``local_mesh``), and four AgentHost
processes (``harness/load_host.py``) serve 250 agents each, every one with
the SDK's default 5 s lease, so the registry keeps 1,000 leases on four
heartbeat streams. For a bounded time, sealed-bid auctions among 100 agents
(one group, spread over the four hosts) and now and then among all 1,000 run
back to back through the coordination service, while goals (six parallel
steps, one of them assigned by a Contract Net auction, and a join) run
through the planner.

It asserts that no lease was lost: a ``WatchAgents`` stream opened once every
agent was registered sees no removal, and at the end ``ListAgents`` lists the
same 1,000 agents on the same leases; that no heartbeat stream broke; that
every auction and goal completed (or, at worst, answered a retryable status)
with every participant answering (retryable answers at most one in ten);
that the memory (VmRSS) of every service process is flat between the end of
the warm-up and the end of the load (see FLAT_MIB for the bound); and that
no etcd watch was left open (etcd's watcher count is the same at both times).

It reports heartbeat round trips (beat taken by the stream -> its
``HeartbeatResponse``, from :class:`mabeam.agent.HeartbeatStats` of each
host) as p50/p99/max, beats per second, auctions and goals completed, and
each service's RSS after warm-up and at the end, in the "reports" section
of pytest's terminal summary (passed or failed; see tests/conftest.py).

Environment:

* ``MABEAM_LOAD_SECONDS``: how long the load runs (default 60). A developer
  may run a shorter one, e.g. ``MABEAM_LOAD_SECONDS=15 pytest tests/test_load.py``;
  the warm-up is the first ``min(10, seconds / 3)`` seconds of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.wait import eventually
from mabeam import errors
from mabeam.agent import percentile
from mabeam.client import MeshClient, list_all
from mabeam.runtime import process
from mabeam.runtime.embedded_etcd import EmbeddedEtcd
from mabeam.runtime.mesh import LocalMesh
from mabeam.v1 import common_pb2, coordination_pb2, planner_pb2, registry_pb2

LOAD_SECONDS = float(os.environ.get("MABEAM_LOAD_SECONDS", "60"))
WARMUP_SECONDS = min(10.0, LOAD_SECONDS / 3)
HOSTS, PER_HOST, GROUPS = 4, 250, 10
AGENTS = HOSTS * PER_HOST
AUCTION_WORKERS, GOAL_WORKERS = 2, 2
HOST_SCRIPT = str(Path(__file__).resolve().parent / "harness" / "load_host.py")
MiB = 1024 * 1024

# Memory is "flat" when a service grows by at most max(FLAT_MIB, FLAT_FRACTION of its
# warm-up RSS) between the end of the warm-up and the end of the load (the planner
# also by GOAL_CACHE_BYTES per goal, below). After warm-up every bounded structure
# (the registry's caches of the 1,000 agents, channel pools, gRPC buffers, pymalloc
# arenas at their working size) is full; what moves after that is allocator and
# buffer noise, within +-2 MiB over the runs made here. What the bound must catch
# is retention per unit of work, which grows without limit: a 60 s run makes
# ~37,000 heartbeats and ~3,000 auctions of 100 or 1,000 bidders (~800,000 agent
# messages). Keeping a session (>= 10 KiB for 100 bids) per auction is 30+ MiB,
# an object (>= 500 B) per heartbeat 18+ MiB, 100 B per agent message 75 MiB:
# each fails. The planner legitimately grows with the goals it has seen: it keeps
# a watch-fed cache of every goal's summary (state etcd holds; 3-8 KiB of RSS per
# goal measured here), so it is allowed 16 KiB per goal completed.
# A watch stream left open per ExecuteGoal (the leak this test found, ~12 KiB per
# goal) is too small per goal for RSS alone: the etcd watcher count catches it.
FLAT_MIB, FLAT_FRACTION = 12, 0.20
GOAL_CACHE_BYTES = 16 * 1024
# Watchers the mesh may open or close during the load (ExecuteGoal streams in
# flight, a watch resumed): anything beyond is a watch left behind.
WATCHER_SLACK = 16

pytestmark = [pytest.mark.slow, pytest.mark.timeout(LOAD_SECONDS + 120)]


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def etcd_watchers(etcd: EmbeddedEtcd) -> int:
    """Watchers open in etcd now (its ``etcd_debugging_mvcc_watcher_total`` gauge)."""

    def read() -> int:
        with urllib.request.urlopen(f"{etcd.endpoint}/metrics", timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("etcd_debugging_mvcc_watcher_total "):
                    return int(float(line.split()[1]))
        raise AssertionError("etcd reports no etcd_debugging_mvcc_watcher_total")

    return await asyncio.to_thread(read)


@dataclass
class Host:
    """One AgentHost process of the test."""

    index: int
    proc: subprocess.Popen[bytes]
    log: Path
    address: str = ""
    report: dict[str, Any] = field(default_factory=dict)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def spawn_host(index: int, registry: str, log_dir: Path) -> Host:
    log = log_dir / f"host-{index}.log"
    with open(log, "wb") as err:
        proc = process.spawn(
            [
                sys.executable,
                HOST_SCRIPT,
                "--registry",
                registry,
                "--count",
                str(PER_HOST),
                "--first",
                str(index * PER_HOST),
                "--groups",
                str(GROUPS),
                "--prefix",
                f"load-{index}-",
            ],
            env={**os.environ, "MABEAM_LOG_LEVEL": "INFO"},
            stdout=subprocess.PIPE,
            stderr=err,
        )
    return Host(index, proc, log)


async def wait_ready(host: Host) -> None:
    """Until the host says its agents are registered (its 'agents ready on' line)."""
    assert host.proc.stdout is not None
    while True:
        line = (await asyncio.to_thread(host.proc.stdout.readline)).decode(errors="replace").strip()
        if not line:
            raise AssertionError(
                f"load host {host.index} exited before its agents were ready:\n{host.tail()}"
            )
        if line.startswith("agents ready on "):
            host.address = line.removeprefix("agents ready on ")
            return


async def stop_host(host: Host) -> None:
    """SIGTERM; read the JSON report it prints before it deregisters its agents."""
    if host.proc.poll() is None:
        host.proc.terminate()
    assert host.proc.stdout is not None
    out = await asyncio.to_thread(host.proc.stdout.read)
    await process.terminate(host.proc, 15)
    host.proc.stdout.close()
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("{"):
            host.report = json.loads(line)


async def list_agents(client: MeshClient) -> dict[str, registry_pb2.Agent]:
    request = registry_pb2.ListAgentsRequest(capability="load")
    return {a.agent_id: a for a in await list_all(client.registry.ListAgents, request, "agents")}


@dataclass
class Tally:
    """Outcomes of one kind of operation during the load."""

    completed: int = 0
    retryable: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    async def run(self, what: str, op: Callable[[], Awaitable[str | None]]) -> None:
        """Run ``op``; it returns None when the result is right, else what is wrong with it."""
        started = time.monotonic()
        try:
            problem = await op()
        except errors.MabeamError as exc:
            (self.retryable if exc.retryable else self.failures).append(f"{what}: {exc}")
            return
        if problem is None:
            self.completed += 1
            self.latencies.append(time.monotonic() - started)
        else:
            self.failures.append(f"{what}: {problem}")


def auction_request(worker: int, n: int) -> tuple[coordination_pb2.RunAuctionRequest, int]:
    everyone = n % 10 == 9
    capability = "load" if everyone else f"load-g{(worker * 5 + n) % GROUPS}"
    request = coordination_pb2.RunAuctionRequest(
        settings=coordination_pb2.SessionSettings(
            participants=common_pb2.AgentSelector(capability=capability), notify_outcome=n % 2 == 0
        ),
        type=coordination_pb2.AUCTION_TYPE_SECOND_PRICE
        if n % 2
        else coordination_pb2.AUCTION_TYPE_FIRST_PRICE,
        item=f"slot-{worker}-{n}",
    )
    # Generous: under load an agent must be left out only if it is really stuck.
    request.settings.round_timeout.FromSeconds(10)
    request.settings.deadline.FromSeconds(30)
    return request, AGENTS if everyone else AGENTS // GROUPS


def goal_spec(worker: int, n: int) -> planner_pb2.GoalSpec:
    """Six parallel steps on six groups (one assigned by Contract Net among its 100 agents), then a join."""
    steps = [
        planner_pb2.StepSpec(
            step_id=f"part{i}",
            capability=f"load-g{(worker + n + i) % GROUPS}",
            strategy=planner_pb2.ASSIGNMENT_STRATEGY_AUCTION
            if i == 0
            else planner_pb2.ASSIGNMENT_STRATEGY_UNSPECIFIED,
        )
        for i in range(6)
    ]
    steps.append(
        planner_pb2.StepSpec(step_id="join", capability="load", depends_on=[s.step_id for s in steps])
    )
    spec = planner_pb2.GoalSpec(name=f"load-{worker}-{n}", steps=steps)
    spec.deadline.FromSeconds(60)
    return spec


async def test_thousand_agents_keep_their_leases_under_auctions_and_goals(
    local_mesh: Callable[..., Awaitable[LocalMesh]],
    etcd: EmbeddedEtcd,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    started = time.monotonic()
    mesh = await local_mesh()
    client = await MeshClient.connect(
        registry=mesh.address("registry"),
        coordination=mesh.address("coordination"),
        planner=mesh.address("planner"),
    )
    services = {p.kind: p.pid for p in mesh.processes}
    hosts: list[Host] = []
    watch: asyncio.Task[None] | None = None
    report: list[str] = []
    try:
        # -- 1,000 agents on four hosts ------------------------------------------------
        hosts = [spawn_host(i, mesh.address("registry"), tmp_path) for i in range(HOSTS)]
        await asyncio.wait_for(asyncio.gather(*(wait_ready(h) for h in hosts)), 90)
        hosts_started = time.monotonic()
        # Registered, but listed through the registry's watch-fed cache: it may lag a moment.
        listed: dict[str, registry_pb2.Agent] = {}

        async def all_listed() -> bool:
            nonlocal listed
            listed = await list_agents(client)
            return len(listed) >= AGENTS

        with contextlib.suppress(AssertionError):
            await eventually(all_listed, timeout=30, interval=0.2)
        before = listed
        assert len(before) == AGENTS, f"{len(before)} of {AGENTS} agents registered"

        # -- a watch that would see any lease lapse --------------------------------------
        snapshot: set[str] = set()
        removed: list[str] = []
        snapshot_done = asyncio.Event()
        watch_error: list[BaseException] = []

        async def follow() -> None:
            try:
                async for event in client.registry.WatchAgents(
                    registry_pb2.WatchAgentsRequest(capability="load")
                ):
                    if event.type == registry_pb2.AGENT_EVENT_TYPE_EXISTING:
                        snapshot.add(event.agent.agent_id)
                    elif event.type == registry_pb2.AGENT_EVENT_TYPE_SNAPSHOT_DONE:
                        snapshot_done.set()
                    elif event.type == registry_pb2.AGENT_EVENT_TYPE_REMOVED:
                        removed.append(event.agent.agent_id)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                watch_error.append(exc)
                snapshot_done.set()

        watch = asyncio.create_task(follow())
        await asyncio.wait_for(snapshot_done.wait(), 30)
        assert not watch_error, f"WatchAgents failed: {watch_error}"
        assert snapshot == set(before), "the watch's snapshot is not the 1,000 agents"

        # -- the load ------------------------------------------------------------------
        auctions, goals = Tally(), Tally()
        load_started = time.monotonic()
        stop_at = load_started + LOAD_SECONDS
        rss_warm: dict[str, int] = {}
        rss_peak: dict[str, int] = {k: 0 for k in services}
        watchers_warm: list[int] = []
        messages = 0

        async def auction_worker(worker: int) -> None:
            nonlocal messages
            n = 0
            while time.monotonic() < stop_at:
                request, expected = auction_request(worker, n)

                async def one(
                    request: coordination_pb2.RunAuctionRequest = request, expected: int = expected
                ) -> str | None:
                    nonlocal messages
                    session = (await client.coordination.RunAuction(request, timeout=60)).session
                    messages += len(session.participants) * (2 if request.settings.notify_outcome else 1)
                    if (
                        session.state != coordination_pb2.SESSION_STATE_DECIDED
                        or len(session.outcome.winners) != 1
                    ):
                        return f"not decided: {coordination_pb2.SessionState.Name(session.state)} {session.outcome.reason}"
                    if len(session.participants) != expected or session.excluded:
                        return f"{len(session.participants)} participants of {expected}, excluded: {list(session.excluded)[:3]}"
                    return None

                await auctions.run(request.item, one)
                n += 1

        async def goal_worker(worker: int) -> None:
            n = 0
            while time.monotonic() < stop_at:
                spec = goal_spec(worker, n)

                async def one(spec: planner_pb2.GoalSpec = spec) -> str | None:
                    events = [
                        e
                        async for e in client.planner.ExecuteGoal(
                            planner_pb2.ExecuteGoalRequest(goal=spec), timeout=90
                        )
                    ]
                    last = events[-1]
                    if last.goal_state != planner_pb2.GOAL_STATE_SUCCEEDED:
                        return f"ended {planner_pb2.GoalState.Name(last.goal_state)}: {last.error}"
                    if last.steps_done != len(spec.steps):
                        return f"{last.steps_done} of {len(spec.steps)} steps done"
                    return None

                await goals.run(spec.name, one)
                n += 1

        async def sample_memory() -> None:
            while time.monotonic() < stop_at:
                for kind, pid in services.items():
                    rss_peak[kind] = max(rss_peak[kind], rss(pid))
                if not rss_warm and time.monotonic() >= load_started + WARMUP_SECONDS:
                    rss_warm.update({kind: rss(pid) for kind, pid in services.items()})
                    watchers_warm.append(await etcd_watchers(etcd))
                await asyncio.sleep(0.5)

        await asyncio.gather(
            *(auction_worker(w) for w in range(AUCTION_WORKERS)),
            *(goal_worker(w) for w in range(GOAL_WORKERS)),
            sample_memory(),
        )
        load_seconds = time.monotonic() - load_started
        rss_end = {kind: rss(pid) for kind, pid in services.items()}
        for kind in services:
            rss_peak[kind] = max(rss_peak[kind], rss_end[kind])
        etcd_rss = rss(etcd.pid) if etcd.pid is not None else 0
        watchers_end = await etcd_watchers(etcd)

        # -- leases: nothing removed, the same registrations at the end ----------------------
        # A marker agent registered and removed now: once the watch saw it go, it has
        # delivered everything the last beats caused (events come in revision order).
        marker = "load-marker"
        mark = await client.registry.RegisterAgent(
            registry_pb2.RegisterAgentRequest(agent_id=marker, endpoint="127.0.0.1:1", capabilities=["load"])
        )
        await client.registry.DeregisterAgent(
            registry_pb2.DeregisterAgentRequest(agent_id=marker, token=mark.token)
        )
        await eventually(lambda: marker in removed, timeout=30, what="the watch saw the marker go")
        removed.remove(marker)
        after = {k: v for k, v in (await list_agents(client)).items() if k != marker}
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        statuses = {registry_pb2.AgentStatus.Name(a.status) for a in after.values()}
        renewed = sorted(a for a in before if a in after and after[a].lease_id != before[a].lease_id)

        # -- heartbeat figures from the hosts ------------------------------------------------
        stopping = time.monotonic()
        await asyncio.gather(*(stop_host(h) for h in hosts))
        beat_seconds = stopping - hosts_started
        latencies = [ms / 1000 for h in hosts for ms in h.report.get("latencies_ms", [])]
        beats = [h.report.get("heartbeats", {}) for h in hosts]
        acked = sum(int(b.get("acked", 0)) for b in beats)
        breaks = sum(int(b.get("stream_breaks", 0)) for b in beats)
        unanswered = sum(int(b.get("unanswered", 0)) for b in beats)
        refused = sum(int(b.get("refused", 0)) for b in beats)
        held = sum(int(b.get("held", 0)) for b in beats)
        max_beat = max((float(b.get("max_s", 0.0)) for b in beats), default=0.0)

        def ms(seconds: float) -> str:
            return f"{seconds * 1000:.1f} ms"

        report += [
            f"load: {AGENTS} agents on {HOSTS} AgentHost processes, {load_seconds:.1f} s of load "
            f"(warm-up {WARMUP_SECONDS:.0f} s), whole test {time.monotonic() - started:.1f} s",
            f"  heartbeats: {acked} acked, {acked / beat_seconds:.0f} beats/s; round trip "
            f"p50 {ms(percentile(latencies, 50))}, p99 {ms(percentile(latencies, 99))}, max {ms(max_beat)}; "
            f"stream breaks {breaks}, unanswered {unanswered}, refused {refused}, held back {held}",
            f"  auctions: {auctions.completed} completed ({auctions.completed / load_seconds:.1f}/s, "
            f"p50 {ms(percentile(auctions.latencies, 50))}, p99 {ms(percentile(auctions.latencies, 99))}), "
            f"{len(auctions.retryable)} retryable, {len(auctions.failures)} failed; "
            f"~{messages / load_seconds:.0f} agent messages/s",
            f"  goals: {goals.completed} completed ({goals.completed * 7} steps, "
            f"p50 {ms(percentile(goals.latencies, 50))}, p99 {ms(percentile(goals.latencies, 99))}), "
            f"{len(goals.retryable)} retryable, {len(goals.failures)} failed",
            f"  leases: {len(removed)} removed, {len(after)} listed at the end, {len(renewed)} on a new lease; "
            f"statuses {sorted(statuses)}",
            "  RSS after warm-up -> end (peak): "
            + ", ".join(
                f"{kind} {rss_warm.get(kind, 0) / MiB:.1f} -> {rss_end[kind] / MiB:.1f} MiB "
                f"({rss_peak[kind] / MiB:.1f})"
                for kind in services
            )
            + f"; etcd (shared, not asserted) {etcd_rss / MiB:.1f} MiB",
            f"  etcd watchers after warm-up -> end: {watchers_warm[0] if watchers_warm else '?'} -> {watchers_end}",
        ]
        record_property("report", "\n".join(report))

        # -- the assertions ---------------------------------------------------------------
        assert not watch_error, f"WatchAgents failed during the load: {watch_error}"
        assert not removed, f"leases lost: {len(removed)} agents removed, e.g. {removed[:5]}"
        assert set(after) == set(before), f"{len(set(before) - set(after))} agents missing at the end"
        assert not renewed, f"{len(renewed)} agents registered again on a new lease, e.g. {renewed[:5]}"
        assert breaks == 0 and unanswered == 0, (
            f"heartbeat streams broke: {breaks} ({unanswered} beats unanswered)"
        )
        assert all(h.report for h in hosts), "a load host printed no report"
        assert not auctions.failures, f"auctions failed: {auctions.failures[:5]}"
        assert not goals.failures, f"goals failed: {goals.failures[:5]}"
        assert auctions.completed > 0 and goals.completed > 0, "no auction or no goal completed"
        # Clean retryable answers are allowed, but under plain load they must stay rare.
        for name, tally in (("auctions", auctions), ("goals", goals)):
            assert len(tally.retryable) <= tally.completed // 10, f"{name}: {tally.retryable[:5]}"
        assert len(rss_warm) == len(services), "the load ended before the warm-up did"
        assert watchers_end <= watchers_warm[0] + WATCHER_SLACK, (
            f"etcd watchers {watchers_warm[0]} -> {watchers_end}: watches left open during the load"
        )
        for kind in services:
            bound = max(FLAT_MIB * MiB, FLAT_FRACTION * rss_warm[kind])
            if kind == "planner":
                bound += goals.completed * GOAL_CACHE_BYTES
            grew = rss_end[kind] - rss_warm[kind]
            assert grew <= bound, (
                f"{kind} memory not flat: {rss_warm[kind] / MiB:.1f} -> {rss_end[kind] / MiB:.1f} MiB "
                f"(+{grew / MiB:.1f}, bound {bound / MiB:.1f})"
            )
    finally:
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        await asyncio.gather(
            *(stop_host(h) for h in hosts if h.proc.returncode is None), return_exceptions=True
        )
        await client.close()
        if not report:
            record_property(
                "report", "load: did not finish; host logs:\n" + "\n".join(h.tail(5) for h in hosts)
            )
