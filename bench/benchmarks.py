"""The benchmarks of docs/design.md, each beside its raw baseline (see bench/README.md).

Each issue adds its benchmarks here with :func:`mabeam.bench.core.benchmark`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mabeam.bench.core import BenchContext, Result, benchmark, interleaved, timed
from mabeam.client import MeshClient
from mabeam.runtime import process
from mabeam.v1 import registry_pb2

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WORKER = str(EXAMPLES / "worker.py")


async def _registry_client(ctx: BenchContext) -> MeshClient:
    mesh = await ctx.mesh()
    return await MeshClient.connect(registry=mesh.address("registry"))


async def _wait_for(predicate, timeout: float = 30.0, interval: float = 0.005) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(interval)


@benchmark("lookup", "ListAgents by capability (10 matches among 1,000 agents) vs a raw gRPC ping")
async def lookup(ctx: BenchContext) -> Result:
    await ctx.agent_host(1000, prefix="lk", capability="lookup-hit", every=100)
    client = await _registry_client(ctx)
    try:
        request = registry_pb2.ListAgentsRequest(capability="lookup-hit")

        async def ready() -> bool:
            return len((await client.registry.ListAgents(request)).agents) == 10

        await _wait_for(ready)
        await asyncio.sleep(1.0)  # let the registrations' burst settle
        ping = await ctx.ping_fn()
        samples, pings = await interleaved(
            lambda: client.registry.ListAgents(request), ping, n=ctx.n(2000, 400)
        )
    finally:
        await client.close()
    return Result(samples, "raw gRPC ping (interleaved)", statistics.median(pings), goal="ratio <= 1.3")


def _spawn_worker(agent_id: str, registry: str, ttl: float) -> subprocess.Popen[bytes]:
    return process.spawn(
        [sys.executable, WORKER, "--id", agent_id, "--registry", registry, "--lease-ttl", str(ttl)],
        env={**os.environ, "MABEAM_LOG_LEVEL": "WARNING"},
        stdout=subprocess.DEVNULL,
    )


async def _listed(client: MeshClient, agent_id: str) -> bool:
    page = await client.registry.ListAgents(
        registry_pb2.ListAgentsRequest(capability="compute", page_size=1000)
    )
    return any(a.agent_id == agent_id for a in page.agents)


@benchmark("agent_removal", "agent SIGKILLed -> gone from ListAgents, vs its lease TTL (as granted by etcd)")
async def agent_removal(ctx: BenchContext) -> Result:
    mesh = await ctx.mesh()
    client = await _registry_client(ctx)
    ttl = 1.0
    samples: list[float] = []
    try:
        for i in range(ctx.n(10, 3)):
            agent_id = f"removal-{i}"
            proc = _spawn_worker(agent_id, mesh.address("registry"), ttl)

            async def present(agent_id: str = agent_id) -> bool:
                return await _listed(client, agent_id)

            async def absent(agent_id: str = agent_id) -> bool:
                return not await _listed(client, agent_id)

            await _wait_for(present)
            granted = (await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id))).agent
            ttl = float(granted.lease_ttl.seconds)  # etcd grants at least its minimum TTL
            await asyncio.sleep(ttl)  # a few heartbeats in
            killed = time.perf_counter()
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
            await _wait_for(absent)
            samples.append(time.perf_counter() - killed)
    finally:
        await client.close()
    return Result(
        samples, "lease TTL", ttl, goal="median_s <= TTL + 1 s", extra={"ttl_s": ttl, "requested_ttl_s": 1.0}
    )


@benchmark("supervised_restart", "supervised agent SIGKILLed -> registered again, vs starting it by hand")
async def supervised_restart(ctx: BenchContext) -> Result:
    mesh = await ctx.mesh()
    client = await _registry_client(ctx)
    rounds = ctx.n(10, 5)
    by_hand: list[float] = []
    samples: list[float] = []
    try:
        launch = registry_pb2.LaunchSpec(kind="worker", args=["--lease-ttl=2"])  # bench.core.BENCH_CATALOG
        policy = registry_pb2.RestartPolicy(max_restarts=rounds + 5)
        policy.period.FromSeconds(3600)
        start = registry_pb2.StartAgentRequest(agent_id="sup", launch=launch, restart_policy=policy)
        record = (await client.registry.StartAgent(start)).agent
        # Alternate the two, round by round, so both see the same machine.
        for i in range(rounds):
            agent_id = f"hand-{i}"
            started = time.perf_counter()
            proc = _spawn_worker(agent_id, mesh.address("registry"), 2.0)

            async def present(agent_id: str = agent_id) -> bool:
                return await _listed(client, agent_id)

            await _wait_for(present)
            by_hand.append(time.perf_counter() - started)
            await process.terminate(proc, 2)

            old_pid = record.pid
            killed = time.perf_counter()
            os.kill(old_pid, signal.SIGKILL)

            async def back(old_pid: int = old_pid) -> bool:
                page = await client.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
                rec = next(a for a in page.agents if a.agent_id == "sup")
                return rec.state == registry_pb2.SUPERVISION_STATE_RUNNING and rec.pid not in (0, old_pid)

            await _wait_for(back)
            samples.append(time.perf_counter() - killed)
            page = await client.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
            record = next(a for a in page.agents if a.agent_id == "sup")
        await client.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id="sup"))
    finally:
        await client.close()
    return Result(
        samples,
        "starting the same agent by hand (alternated)",
        statistics.median(by_hand),
        goal="ratio <= 1.2",
    )


def _auction(n: int) -> None:
    @benchmark(
        f"auction_{n}",
        f"sealed-bid round among {n} agents on one AgentHost, through the coordination service, outcome in etcd",
    )
    async def run(ctx: BenchContext) -> Result:
        from mabeam.v1 import common_pb2, coordination_pb2

        mesh = await ctx.mesh()
        capability = f"auction{n}"
        await ctx.agent_host(n, prefix=f"au{n}-", capability=capability)
        client = await MeshClient.connect(
            registry=mesh.address("registry"), coordination=mesh.address("coordination")
        )
        request = coordination_pb2.RunAuctionRequest(
            settings=coordination_pb2.SessionSettings(
                participants=common_pb2.AgentSelector(capability=capability)
            ),
            type=coordination_pb2.AUCTION_TYPE_SECOND_PRICE,
            item="bench",
        )
        request.settings.round_timeout.FromSeconds(10)
        request.settings.deadline.FromSeconds(30)
        # The caller wants the outcome; the transcript is written to etcd all the
        # same (it is part of the durable session), just not sent back.
        request.settings.view = coordination_pb2.SESSION_VIEW_BASIC

        async def auction() -> None:
            reply = await client.coordination.RunAuction(request)
            if len(reply.session.participants) != n or reply.session.excluded:
                raise RuntimeError(f"auction_{n}: {len(reply.session.excluded)} agents excluded")
            if not reply.session.outcome.decided:
                raise RuntimeError(f"auction_{n}: no decision: {reply.session.outcome.reason}")

        try:
            rounds = max(15, ctx.n(3000, 600) // n)
            # The fan-out is timed alternately with the auctions: the baseline
            # that dominates sees the same machine as the auctions do.
            samples, fans = await interleaved(auction, await ctx.fanout_fn(n), n=min(rounds, 200), warmup=3)
        finally:
            await client.close()
        baseline = await ctx.baseline("ping") + statistics.median(fans) + await ctx.baseline("etcd_put")
        goal = "ratio <= 1.3; with batching <= 0.2" if n == 1000 else "ratio <= 1.3"
        return Result(
            samples,
            f"raw ping + raw fan-out of {n} pings (interleaved) + one etcd put",
            baseline,
            goal=goal,
            extra={
                "fanout_median_s": statistics.median(fans),
                "agent_messages_per_s": n / statistics.median(samples),
            },
        )


for _n in (10, 100, 1000):
    _auction(_n)


@benchmark(
    "publish_1000",
    "Publish to a topic of 1,000 subscribers on one AgentHost, through the messaging service "
    "(subscribers read from etcd, batched DeliverBatch per host)",
)
async def publish_1000(ctx: BenchContext) -> Result:
    n = 1000
    mesh = await ctx.mesh()
    await ctx.agent_host(n, prefix="pub-", capability="publish1000")
    client = await MeshClient.connect(
        registry=mesh.address("registry"), coordination=mesh.address("coordination")
    )
    from mabeam.v1 import messaging_pb2

    try:
        ids = [f"pub-{i:05d}" for i in range(n)]  # as bench.agent_host names them
        for start in range(0, n, 50):  # subscribe 50 at a time
            await asyncio.gather(
                *(
                    client.messaging.Subscribe(messaging_pb2.SubscribeRequest(agent_id=a, topic="bench"))
                    for a in ids[start : start + 50]
                )
            )
        counter = itertools.count()

        async def publish() -> None:
            reply = await client.publish("bench", {"n": next(counter)}, sender="bench", timeout=30)
            if reply.delivered != n:
                raise RuntimeError(
                    f"publish_1000: {reply.delivered} delivered, {reply.dropped} dropped, {reply.failed} failed"
                )

        rounds = ctx.n(200, 40)
        samples, fans = await interleaved(publish, await ctx.fanout_fn(n), n=rounds, warmup=3)
    finally:
        await client.close()
    baseline = await ctx.baseline("ping") + statistics.median(fans)
    return Result(
        samples,
        f"raw ping + raw fan-out of {n} pings (interleaved)",
        baseline,
        goal="ratio <= 1.3 (batched per host)",
        extra={
            "fanout_median_s": statistics.median(fans),
            "deliveries_per_s": n / statistics.median(samples),
        },
    )


async def _orchestrator_client(ctx: BenchContext) -> MeshClient:
    mesh = await ctx.mesh()
    return await MeshClient.connect(orchestrator=mesh.address("orchestrator"))


@benchmark("var_read", "strong GetVariable vs a raw ping + a raw etcd get (interleaved)")
async def var_read(ctx: BenchContext) -> Result:
    from mabeam.v1 import common_pb2, orchestrator_pb2

    client = await _orchestrator_client(ctx)
    etcd = await ctx.etcd()
    ping = await ctx.ping_fn()
    try:
        await client.orchestrator.SetVariable(
            orchestrator_pb2.SetVariableRequest(name="bench/read", value=common_pb2.Value(number_value=1))
        )
        await etcd.put(b"/bench/raw/read", b"v")
        request = orchestrator_pb2.GetVariableRequest(name="bench/read")
        ours, pings, gets = await interleaved(
            lambda: client.orchestrator.GetVariable(request),
            ping,
            lambda: etcd.get(b"/bench/raw/read"),
            n=ctx.n(2000, 400),
        )
    finally:
        await client.close()
    baseline = statistics.median(pings) + statistics.median(gets)
    return Result(ours, "raw ping + raw etcd get (interleaved)", baseline, goal="ratio <= 1.3")


@benchmark("var_cas", "compare-and-set SetVariable vs a raw ping + a raw etcd txn (interleaved)")
async def var_cas(ctx: BenchContext) -> Result:
    from mabeam.v1 import common_pb2, orchestrator_pb2

    client = await _orchestrator_client(ctx)
    etcd = await ctx.etcd()
    ping = await ctx.ping_fn()
    version = 0

    async def cas() -> None:
        nonlocal version
        reply = await client.orchestrator.SetVariable(
            orchestrator_pb2.SetVariableRequest(
                name="bench/cas", value=common_pb2.Value(int_value=version), expected_version=version
            )
        )
        version = reply.variable.version

    key = b"/bench/raw/cas"
    await etcd.put(key, b"0")

    async def txn() -> None:
        await etcd.transaction(
            compare=[etcd.transactions.version(key) > 0],
            success=[etcd.transactions.put(key, b"1")],
            failure=[],
        )

    try:
        ours, pings, txns = await interleaved(cas, ping, txn, n=ctx.n(2000, 400))
    finally:
        await client.close()
    baseline = statistics.median(pings) + statistics.median(txns)
    return Result(ours, "raw ping + raw etcd txn (interleaved)", baseline, goal="ratio <= 1.3")


def _chain(n: int, capability: str) -> Any:
    from mabeam.v1 import planner_pb2

    steps = [planner_pb2.StepSpec(step_id="s0", capability=capability)]
    steps += [
        planner_pb2.StepSpec(step_id=f"s{i}", capability=capability, depends_on=[f"s{i - 1}"])
        for i in range(1, n)
    ]
    return planner_pb2.GoalSpec(steps=steps, max_parallelism=1)


@benchmark(
    "planner_step",
    "per-step cost of a 1,000-step goal (a chain) vs a direct ExecuteStep + one etcd put per step",
)
async def planner_step(ctx: BenchContext) -> Result:
    from google.protobuf import timestamp_pb2

    from mabeam.v1 import agent_pb2, agent_pb2_grpc, planner_pb2

    mesh = await ctx.mesh()
    address = await ctx.agent_host(4, prefix="pl-", capability="plan-step")
    client = await MeshClient.connect(planner=mesh.address("planner"))
    n = ctx.n(1000, 1000)
    # The baseline does by hand what the planner does per step: run it, record it.
    # Measured before and after the goal (a goal cannot be interleaved call by call).
    stub = agent_pb2_grpc.AgentServiceStub(ctx.channel(address))
    etcd = await ctx.etcd()
    # As the planner calls an agent: with the service token, which the agent checks.
    as_the_mesh = ctx.service_metadata()

    async def direct() -> None:
        await stub.ExecuteStep(
            agent_pb2.ExecuteStepRequest(agent_id="pl-00000", step_id="x", capability="plan-step"),
            metadata=as_the_mesh,
        )
        await etcd.put(b"/bench/raw/step", b"done")

    before = await timed(direct, ctx.n(1000, 300))
    try:
        events = [
            e
            async for e in client.planner.ExecuteGoal(
                planner_pb2.ExecuteGoalRequest(goal=_chain(n, "plan-step"))
            )
        ]
    finally:
        await client.close()
    if events[-1].goal_state != planner_pb2.GOAL_STATE_SUCCEEDED:
        raise RuntimeError(f"planner_step: the goal ended {events[-1].goal_state}: {events[-1].error}")
    finished = [e.time for e in events if e.type == planner_pb2.GOAL_EVENT_TYPE_STEP_SUCCEEDED]

    def t(ts: timestamp_pb2.Timestamp) -> float:
        return ts.ToNanoseconds() / 1e9

    samples = [t(b) - t(a) for a, b in itertools.pairwise(finished)]
    baseline = statistics.median(before + await timed(direct, ctx.n(1000, 300)))
    return Result(
        samples, "direct ExecuteStep + one etcd put", baseline, goal="ratio <= 1.5", extra={"steps": n}
    )


@benchmark(
    "goal_resume", "planner replica SIGKILLed mid-goal -> the goal running again on another, vs the lease TTL"
)
async def goal_resume(ctx: BenchContext) -> Result:
    from mabeam.v1 import planner_pb2

    mesh = await ctx.mesh()
    await ctx.agent_host(2, prefix="gr-", capability="resume-step")
    await mesh.start_replica("planner", port=0)
    ttl = 2.0
    samples: list[float] = []
    for round_number in range(ctx.n(5, 3)):
        planners = [p for p in mesh.processes if p.kind == "planner" and p.proc.poll() is None]
        client = await MeshClient.connect(planner=[p.address for p in planners])
        try:
            goal_id = f"resume-{round_number}"
            spec = _chain(400, "resume-step")
            await client.planner.SubmitGoal(planner_pb2.SubmitGoalRequest(goal=spec, goal_id=goal_id))

            async def owned(goal_id: str = goal_id, client: MeshClient = client) -> bool:
                goal = (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=goal_id))).goal
                return (
                    bool(goal.owner)
                    and sum(s.state == planner_pb2.STEP_STATE_SUCCEEDED for s in goal.steps) > 5
                )

            await _wait_for(owned, interval=0.02)
            goal = (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=goal_id))).goal
            owner = next(p for p in planners if f"-{p.pid}-" in goal.owner)
            killed = time.perf_counter()
            owner.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(owner.proc.wait)
            survivor = await MeshClient.connect(planner=[p.address for p in planners if p is not owner])

            async def resumed(
                goal_id: str = goal_id, dead: str = goal.owner, survivor: MeshClient = survivor
            ) -> bool:
                g = (await survivor.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=goal_id))).goal
                return g.resumed_count >= 1 and g.owner not in ("", dead)

            await _wait_for(resumed, interval=0.01)
            samples.append(time.perf_counter() - killed)
            await survivor.planner.CancelGoal(planner_pb2.CancelGoalRequest(goal_id=goal_id))
            await survivor.close()
            mesh.processes.remove(owner)
            await mesh.start_replica("planner", port=0)
        finally:
            await client.close()
    return Result(samples, "lease TTL", ttl, goal="median_s <= TTL + 1 s", extra={"ttl_s": ttl})
