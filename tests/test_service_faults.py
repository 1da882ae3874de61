"""The production topology under faults (issue 8): three etcd members, two replicas of
every service, agents in processes of their own.

* One replica of each service is SIGKILLed in turn while agents heartbeat,
  auctions run back to back, a counter is compare-and-set through the
  orchestrator and a long goal executes: no agent is lost, every call either
  completes correctly or fails with a clean retryable status, and the goal
  finishes with every step run exactly once.
* An agent process is frozen (SIGSTOP) during an auction and during a goal
  step: the auction finishes within its deadline and names it excluded, the
  step is retried on another agent, and the frozen agent's lease lapses.

Everything is observed through the gRPC API, as a user would.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import duration_pb2, struct_pb2

from harness.fault_agents import bid_value
from harness.wait import eventually
from mabeam import errors
from mabeam.agent import from_value
from mabeam.client import MeshClient
from mabeam.runtime import process
from mabeam.runtime.mesh import LocalMesh, ServiceProcess
from mabeam.v1 import common_pb2, coordination_pb2, orchestrator_pb2, planner_pb2, registry_pb2

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow]

AGENT_TTL = 3.0  # seconds: the agents' registration leases
# What a call may answer while a replica dies: retry it (docs/design.md, "Errors and retries").
RETRYABLE = (errors.Unavailable, errors.Aborted, errors.DeadlineExceeded)
MeshFactory = Callable[..., Awaitable[LocalMesh]]


# -- helpers -------------------------------------------------------------------------------


def spawn_agents(
    registry: Sequence[str], groups: Sequence[str], log_dir: Path, name: str, step_log: Path | None = None
) -> subprocess.Popen[bytes]:
    """An AgentHost in a process of its own (see harness.fault_agents)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        "MABEAM_REGISTRY": ",".join(registry),
        "FAULT_LEASE_TTL": str(AGENT_TTL),
        "PYTHONUNBUFFERED": "1",
    }
    if step_log is not None:
        env["FAULT_STEP_LOG"] = str(step_log)
    argv = [sys.executable, "-m", "mabeam.run_agent", "harness.fault_agents:make_host", *groups]
    with open(log_dir / f"{name}.log", "ab") as log:
        return process.spawn(argv, env=env, stdout=subprocess.DEVNULL, stderr=log)


async def listed(client: MeshClient, capability: str = "") -> set[str]:
    page = await client.registry.ListAgents(
        registry_pb2.ListAgentsRequest(capability=capability, page_size=1000), timeout=10
    )
    return {a.agent_id for a in page.agents}


async def all_listed(client: MeshClient, ids: set[str]) -> bool:
    try:
        return ids <= await listed(client)
    except errors.MabeamError:
        return False


async def sigkill(replica: ServiceProcess) -> None:
    replica.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(replica.proc.wait)


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def value(data: dict[str, Any]) -> struct_pb2.Value:
    v = struct_pb2.Value()
    v.struct_value.update(data)
    return v


def check_sealed_auction(
    session: coordination_pb2.Session, second_price: bool, bidders: set[str]
) -> str | None:
    """Why this auction's result is wrong, or None when it is right."""
    if set(session.participants) != bidders:
        return f"participants {sorted(session.participants)} are not every bidder"
    if session.state != coordination_pb2.SESSION_STATE_DECIDED:
        return f"state {coordination_pb2.SessionState.Name(session.state)}: {session.outcome.reason}"
    answered = sorted(
        (bid_value(a), a) for a in session.participants if a not in {e.agent_id for e in session.excluded}
    )
    if list(session.outcome.winners) != [answered[-1][1]]:
        return f"winners {list(session.outcome.winners)}, expected {answered[-1][1]}"
    price = (answered[-2][0] if len(answered) > 1 else 0.0) if second_price else answered[-1][0]
    if abs(session.outcome.price - price) > 1e-6:
        return f"price {session.outcome.price}, expected {price}"
    return None


@dataclass
class Workload:
    """What the background users saw; every list of problems must end empty."""

    problems: list[str] = field(default_factory=list)
    auctions_ok: list[tuple[float, str]] = field(default_factory=list)  # (time, session id)
    auctions_retryable: collections.Counter[str] = field(default_factory=collections.Counter)
    excluded: collections.Counter[str] = field(default_factory=collections.Counter)
    cas_acked: int = 0
    cas_uncertain: int = 0
    cas_ok_at: list[float] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    watch_ready: asyncio.Event = field(default_factory=asyncio.Event)
    list_checks: int = 0
    events: dict[int, planner_pb2.ExecuteGoalResponse] = field(default_factory=dict)
    stream_reopened: int = 0


async def run_auctions(client: MeshClient, bidders: set[str], work: Workload, stop: asyncio.Event) -> None:
    """Sealed-bid auctions back to back, alternately first- and second-price."""
    n = 0
    while not stop.is_set():
        n += 1
        second = n % 2 == 0
        request = coordination_pb2.RunAuctionRequest(
            settings=coordination_pb2.SessionSettings(
                participants=common_pb2.AgentSelector(capability="fault-bid"),
                deadline=duration(8),
                round_timeout=duration(3),
            ),
            type=coordination_pb2.AUCTION_TYPE_SECOND_PRICE
            if second
            else coordination_pb2.AUCTION_TYPE_FIRST_PRICE,
            item=f"lot-{n}",
        )
        try:
            session = (await client.coordination.RunAuction(request, timeout=30)).session
        except RETRYABLE as exc:
            work.auctions_retryable[type(exc).__name__] += 1
        except errors.MabeamError as exc:
            work.problems.append(f"auction {n}: {exc.code.name}: {exc.message}")
        else:
            problem = check_sealed_auction(session, second, bidders)
            if problem:
                work.problems.append(f"auction {n} ({session.session_id}): {problem}")
            else:
                work.auctions_ok.append((time.monotonic(), session.session_id))
                work.excluded.update(e.agent_id for e in session.excluded)
        await asyncio.sleep(0.15)


async def run_counter(client: MeshClient, work: Workload, stop: asyncio.Event) -> None:
    """Compare-and-set increments of one variable through the orchestrator (the only writer)."""
    name = "fault-counter"
    orch = client.orchestrator
    while not stop.is_set():
        try:
            try:
                got = (
                    await orch.GetVariable(
                        orchestrator_pb2.GetVariableRequest(
                            name=name, consistency=orchestrator_pb2.CONSISTENCY_STRONG
                        ),
                        timeout=10,
                    )
                ).variable
                current, version = got.value.int_value, got.version
            except errors.NotFound:
                current, version = 0, 0
            await orch.SetVariable(
                orchestrator_pb2.SetVariableRequest(
                    name=name,
                    value=common_pb2.Value(int_value=current + 1),
                    expected_version=version,
                ),
                timeout=10,
            )
            work.cas_acked += 1
            work.cas_ok_at.append(time.monotonic())
        except errors.Aborted:
            # A lost compare-and-set: we are the only writer, so an earlier write
            # whose answer was lost (its replica died) did apply.
            work.cas_uncertain += 1
        except errors.Unavailable:
            work.cas_uncertain += 1
        except errors.DeadlineExceeded:
            work.cas_uncertain += 1
        except errors.MabeamError as exc:
            work.problems.append(f"counter: {exc.code.name}: {exc.message}")
        await asyncio.sleep(0.15)


async def check_listing(
    clients: Sequence[MeshClient], agents: set[str], work: Workload, stop: asyncio.Event
) -> None:
    """Every agent is listed, all the time, through every given client."""
    while not stop.is_set():
        for client in clients:
            try:
                missing = agents - await listed(client)
            except errors.MabeamError as exc:
                work.problems.append(f"ListAgents: {exc.code.name}: {exc.message}")
                continue
            if missing:
                work.problems.append(f"agents not listed: {sorted(missing)}")
        work.list_checks += 1
        await asyncio.sleep(0.2)


async def watch_removals(client: MeshClient, agents: set[str], work: Workload) -> None:
    """Record every REMOVED event of our agents; resume after the last revision if the stream breaks."""
    after = 0
    while True:
        try:
            async for event in client.registry.WatchAgents(
                registry_pb2.WatchAgentsRequest(after_revision=after)
            ):
                if event.type == registry_pb2.AGENT_EVENT_TYPE_SNAPSHOT_DONE:
                    work.watch_ready.set()
                elif event.type == registry_pb2.AGENT_EVENT_TYPE_REMOVED and event.agent.agent_id in agents:
                    work.removed.append(event.agent.agent_id)
                if event.revision:
                    after = max(after, event.revision)
        except errors.MabeamError:
            await asyncio.sleep(0.2)


async def follow_goal(client: MeshClient, goal_id: str, work: Workload) -> planner_pb2.ExecuteGoalResponse:
    """Follow a goal's progress to its end, re-opening the stream when its replica dies."""
    while True:
        try:
            async for event in client.planner.ExecuteGoal(
                planner_pb2.ExecuteGoalRequest(goal_id=goal_id), timeout=120
            ):
                seen = work.events.get(event.sequence)
                if seen is not None and seen != event:
                    work.problems.append(f"event {event.sequence} changed: {seen} -> {event}")
                work.events[event.sequence] = event
                if event.type == planner_pb2.GOAL_EVENT_TYPE_GOAL_FINISHED:
                    return event
        except (errors.Unavailable, errors.Aborted) as exc:
            work.stream_reopened += 1
            print(f"ExecuteGoal stream broke ({exc.code.name}: {exc.message}); re-opening")
            await asyncio.sleep(0.2)


async def goal_state(client: MeshClient, goal_id: str) -> planner_pb2.Goal | None:
    try:
        return (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=goal_id), timeout=10)).goal
    except RETRYABLE:
        return None


# -- 1. one replica of each service killed in turn --------------------------------------------

BIDDERS = {f"fb{i}" for i in range(6)}
WORKERS = {f"fw{i}" for i in range(4)}
CHAINS, CHAIN_LENGTH, STEP_SLEEP = 4, 22, 0.6


def long_goal() -> planner_pb2.GoalSpec:
    """CHAINS parallel chains of CHAIN_LENGTH steps (each adds 1) joined by a last step."""
    steps = []
    for c in range(CHAINS):
        for k in range(CHAIN_LENGTH):
            steps.append(
                planner_pb2.StepSpec(
                    step_id=f"c{c}-{k:02d}",
                    capability="fault-work",
                    input=value({"sleep": STEP_SLEEP, "n": 1}),
                    depends_on=[f"c{c}-{k - 1:02d}"] if k else [],
                    strategy=planner_pb2.ASSIGNMENT_STRATEGY_AUCTION
                    if c % 2
                    else planner_pb2.ASSIGNMENT_STRATEGY_LEAST_LOADED,
                )
            )
    steps.append(
        planner_pb2.StepSpec(
            step_id="join",
            capability="fault-work",
            input=value({"n": 0}),
            depends_on=[f"c{c}-{CHAIN_LENGTH - 1:02d}" for c in range(CHAINS)],
        )
    )
    # Half the chains are assigned by Contract Net through the coordination
    # service (a worker's cost depends on the step, so they spread over the
    # workers), half to the least loaded worker.
    return planner_pb2.GoalSpec(name="spans the kills", steps=steps, deadline=duration(150))


@pytest.mark.timeout(180)
async def test_killing_one_replica_of_each_service_in_turn_loses_nothing(
    mesh_cluster: MeshFactory, tmp_path: Path
) -> None:
    mesh = await mesh_cluster()
    step_log = tmp_path / "steps.log"
    everyone = BIDDERS | WORKERS
    agents = spawn_agents(
        mesh.addresses("registry"),
        ["bid:" + ":".join(sorted(BIDDERS)), "work:" + ":".join(sorted(WORKERS))],
        tmp_path,
        "agents",
        step_log,
    )
    # Users find the services through etcd; the observer talks to the registry
    # replica that stays up.
    client = await MeshClient.connect(etcd=list(mesh.etcd_endpoints))
    registry_victim, registry_survivor = mesh.replicas_of("registry")
    observer = await MeshClient.connect(registry=registry_survivor.address)
    work = Workload()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    try:
        await eventually(lambda: all_listed(observer, everyone), timeout=40, what="every agent listed")
        tasks.append(asyncio.create_task(watch_removals(observer, everyone, work)))
        await asyncio.wait_for(work.watch_ready.wait(), 20)
        tasks += [
            asyncio.create_task(check_listing([observer, client], everyone, work, stop)),
            asyncio.create_task(run_auctions(client, BIDDERS, work, stop)),
            asyncio.create_task(run_counter(client, work, stop)),
        ]
        goal_id = "spans-the-kills"
        await client.planner.SubmitGoal(
            planner_pb2.SubmitGoalRequest(goal=long_goal(), goal_id=goal_id), timeout=30
        )
        follower = asyncio.create_task(follow_goal(client, goal_id, work))
        tasks.append(follower)

        async def steps_done(n: int) -> bool:
            goal = await goal_state(client, goal_id)
            return (
                goal is not None and sum(s.state == planner_pb2.STEP_STATE_SUCCEEDED for s in goal.steps) >= n
            )

        await eventually(lambda: steps_done(CHAINS), timeout=40, what="the goal's first steps done")
        await eventually(lambda: len(work.auctions_ok) >= 2, timeout=30, what="auctions run")

        async def still_working(kind: str, killed_at: float) -> None:
            """After a kill, auctions and compare-and-sets succeed again (the survivors serve)."""
            await eventually(
                lambda: any(t > killed_at for t, _ in work.auctions_ok),
                timeout=30,
                what=f"an auction after {kind}",
            )
            await eventually(
                lambda: any(t > killed_at for t in work.cas_ok_at), timeout=30, what=f"a CAS after {kind}"
            )

        for kind in ("registry", "orchestrator", "coordination"):
            victim = registry_victim if kind == "registry" else mesh.replicas_of(kind)[0]
            print(f"SIGKILL {kind} replica {victim.address} (pid {victim.pid})")
            await sigkill(victim)
            killed_at = time.monotonic()
            await still_working(kind, killed_at)
            await asyncio.sleep(max(0.0, 2.5 - (time.monotonic() - killed_at)))

        # The planner replica running the goal dies mid-goal; the other resumes it.
        # It is killed when the step in flight of each least-loaded chain is
        # recorded as running and has time left: a step dispatched less than
        # 50 ms before its owner dies is not recorded yet (runner.START_WRITE_DELAY_S),
        # and the replica resuming it may send it to another agent.
        async def quiet_moment() -> planner_pb2.Goal | None:
            goal = await goal_state(client, goal_id)
            now = time.time()
            if goal is None or goal.state != planner_pb2.GOAL_STATE_RUNNING:
                return goal
            for c in range(0, CHAINS, 2):
                current = next(
                    (
                        s
                        for s in goal.steps
                        if s.step_id.startswith(f"c{c}-") and s.state != planner_pb2.STEP_STATE_SUCCEEDED
                    ),
                    None,
                )
                if current is None:
                    return goal
                started = current.attempts[-1].started_at.ToNanoseconds() / 1e9 if current.attempts else 0.0
                if current.state != planner_pb2.STEP_STATE_RUNNING or now - started > STEP_SLEEP / 2:
                    return None
            return goal

        goal = await eventually(quiet_moment, timeout=30, interval=0.02, what="steps in flight recorded")
        assert goal.state == planner_pb2.GOAL_STATE_RUNNING, (
            f"the goal is {planner_pb2.GoalState.Name(goal.state)} before the planner kill: make it longer"
        )
        done_before = sum(s.state == planner_pb2.STEP_STATE_SUCCEEDED for s in goal.steps)
        assert done_before < len(goal.steps) - CHAINS, "the goal is nearly done before the planner kill"
        owner = next(p for p in mesh.replicas_of("planner") if f"-{p.pid}-" in goal.owner)
        print(
            f"SIGKILL planner replica {owner.address} (pid {owner.pid}) running the goal, {done_before} steps done"
        )
        await sigkill(owner)
        killed_at = time.monotonic()
        await still_working("planner", killed_at)

        finished = await asyncio.wait_for(asyncio.shield(follower), 120)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks[1:]), 30)  # the loops watching `stop` end
        final = await eventually(lambda: goal_state(client, goal_id), timeout=20, what="GetGoal answers")

        # Nothing a background user saw was wrong (see Workload.problems).
        assert work.problems == []
        # The goal: succeeded, resumed once by the other replica, every step's output right.
        assert finished.goal_state == planner_pb2.GOAL_STATE_SUCCEEDED, finished
        assert final.state == planner_pb2.GOAL_STATE_SUCCEEDED, final.error
        assert final.resumed_count >= 1
        outputs = {s.step_id: from_value(s.output) for s in final.steps}
        for c in range(CHAINS):
            for k in range(CHAIN_LENGTH):
                assert outputs[f"c{c}-{k:02d}"]["sum"] == k + 1, (c, k, outputs[f"c{c}-{k:02d}"])
        assert outputs["join"]["sum"] == CHAINS * CHAIN_LENGTH
        assert all(s.state == planner_pb2.STEP_STATE_SUCCEEDED for s in final.steps)
        # The progress history is gapless and reports each step's success once.
        events = [work.events[n] for n in sorted(work.events)]
        assert sorted(work.events) == list(range(1, len(events) + 1))
        succeeded = collections.Counter(
            e.step_id for e in events if e.type == planner_pb2.GOAL_EVENT_TYPE_STEP_SUCCEEDED
        )
        assert succeeded == {s.step_id: 1 for s in final.steps}
        # Each step really ran once: the agents' own record of their executions.
        ran_on = collections.defaultdict(list)
        for line in step_log.read_text().splitlines():
            step_key, agent_id = line.split()
            ran_on[step_key].append(agent_id)
        attempts = {s.step_id: [(a.agent_id, a.error) for a in s.attempts] for s in final.steps}
        not_once = {k: (v, attempts[k.split("/", 1)[1]]) for k, v in ran_on.items() if len(v) != 1}
        assert not not_once, f"steps not run exactly once (ran on, attempts): {not_once}"
        assert set(ran_on) == {f"{goal_id}/{s}" for s in attempts}

        # Agents: never unlisted, never removed (their leases never lapsed).
        assert work.list_checks > 10
        assert work.removed == []
        assert await listed(observer) >= everyone
        # Auctions and compare-and-sets: right or cleanly retryable, and durable.
        for _, session_id in work.auctions_ok:
            kept = (
                await client.coordination.GetSession(
                    coordination_pb2.GetSessionRequest(session_id=session_id)
                )
            ).session
            assert kept.state == coordination_pb2.SESSION_STATE_DECIDED
        counter = (
            await client.orchestrator.GetVariable(orchestrator_pb2.GetVariableRequest(name="fault-counter"))
        ).variable.value.int_value
        assert work.cas_acked <= counter <= work.cas_acked + work.cas_uncertain
        print(
            f"auctions: {len(work.auctions_ok)} decided, retryable errors {dict(work.auctions_retryable)}, "
            f"exclusions {dict(work.excluded)}; CAS: {work.cas_acked} acked, {work.cas_uncertain} uncertain, "
            f"counter {counter}; goal: {len(final.steps)} steps, resumed {final.resumed_count}x, "
            f"stream re-opened {work.stream_reopened}x; {work.list_checks} listing checks"
        )
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await process.terminate(agents, 3)
        await client.close()
        await observer.close()


# -- 2. an agent frozen during an auction and during a goal step ------------------------------


@pytest.mark.timeout(120)
async def test_frozen_agent_is_left_out_retried_around_and_dropped(
    mesh_cluster: MeshFactory, tmp_path: Path
) -> None:
    mesh = await mesh_cluster(services=("registry", "coordination", "planner"))
    registry = mesh.addresses("registry")
    # The frozen process hosts a bidder and the worker first fit picks; the
    # healthy one the others.
    frozen_ids = {"fb0-ice", "fw0-ice"}
    healthy_bidders, healthy_workers = {"fb1", "fb2", "fb3"}, {"fw1", "fw2"}
    frozen = spawn_agents(registry, ["bid:fb0-ice", "work:fw0-ice"], tmp_path, "frozen")
    healthy = spawn_agents(
        registry,
        ["bid:" + ":".join(sorted(healthy_bidders)), "work:" + ":".join(sorted(healthy_workers))],
        tmp_path,
        "healthy",
    )
    client = await MeshClient.connect(etcd=list(mesh.etcd_endpoints))
    everyone = frozen_ids | healthy_bidders | healthy_workers
    work = Workload()
    watcher: asyncio.Task[None] | None = None
    try:
        await eventually(lambda: all_listed(client, everyone), timeout=40, what="every agent listed")
        watcher = asyncio.create_task(watch_removals(client, everyone, work))
        await asyncio.wait_for(work.watch_ready.wait(), 20)

        # (b) A step that first fit gives to the soon frozen worker; frozen mid-step.
        step_timeout = 3.0
        spec = planner_pb2.GoalSpec(
            steps=[
                planner_pb2.StepSpec(
                    step_id="slow",
                    capability="fault-work",
                    input=value({"sleep": 2.0, "n": 5}),
                    timeout=duration(step_timeout),
                )
            ],
            strategy=planner_pb2.ASSIGNMENT_STRATEGY_FIRST_FIT,
        )
        goal_id = (await client.planner.SubmitGoal(planner_pb2.SubmitGoalRequest(goal=spec))).goal.goal_id

        async def running_on_frozen() -> bool:
            goal = await goal_state(client, goal_id)
            return (
                goal is not None
                and goal.steps[0].state == planner_pb2.STEP_STATE_RUNNING
                and goal.steps[0].agent_id == "fw0-ice"
            )

        await eventually(running_on_frozen, timeout=20, interval=0.02, what="the step running on fw0-ice")
        os.kill(frozen.pid, signal.SIGSTOP)

        # (a) An auction among every bidder, the frozen one included, right away.
        bidders = sorted(healthy_bidders | {"fb0-ice"})
        deadline_s, round_timeout_s = 6.0, 1.5
        session = (
            await client.coordination.RunAuction(
                coordination_pb2.RunAuctionRequest(
                    settings=coordination_pb2.SessionSettings(
                        participants=common_pb2.AgentSelector(agent_ids=bidders),
                        deadline=duration(deadline_s),
                        round_timeout=duration(round_timeout_s),
                    ),
                    type=coordination_pb2.AUCTION_TYPE_FIRST_PRICE,
                    item="while frozen",
                ),
                timeout=60,
            )
        ).session
        took = (session.finished_at.ToNanoseconds() - session.started_at.ToNanoseconds()) / 1e9
        assert took <= deadline_s, f"the session ran {took:.2f} s, past its {deadline_s} s deadline"
        assert session.state == coordination_pb2.SESSION_STATE_DECIDED, session.outcome.reason
        exclusions = {e.agent_id: e for e in session.excluded}
        assert set(exclusions) == {"fb0-ice"}, session.excluded
        assert exclusions["fb0-ice"].reason in (
            coordination_pb2.EXCLUSION_REASON_TIMEOUT,
            coordination_pb2.EXCLUSION_REASON_UNAVAILABLE,
        )
        assert check_sealed_auction(session, False, set(bidders)) is None
        assert list(session.outcome.winners) == [max(healthy_bidders, key=bid_value)]
        reason = coordination_pb2.ExclusionReason.Name(exclusions["fb0-ice"].reason)
        print(f"auction with a frozen bidder: {took:.2f} s, fb0-ice excluded ({reason})")

        # (b) The step times out on the frozen worker and is retried on another one.
        events = [
            e
            async for e in client.planner.ExecuteGoal(
                planner_pb2.ExecuteGoalRequest(goal_id=goal_id), timeout=60
            )
        ]
        goal = (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=goal_id))).goal
        assert events[-1].goal_state == planner_pb2.GOAL_STATE_SUCCEEDED, goal.error
        attempts = goal.steps[0].attempts
        assert attempts[0].agent_id == "fw0-ice" and attempts[0].error, attempts
        assert attempts[-1].agent_id in healthy_workers and not attempts[-1].error, attempts
        assert from_value(goal.steps[0].output)["sum"] == 5

        # (c) The frozen agents' leases lapse: gone from the listing, and watchers told.
        await eventually(
            lambda: _none_listed(client, frozen_ids), timeout=AGENT_TTL + 12, what="frozen agents removed"
        )
        await eventually(lambda: set(work.removed) >= frozen_ids, timeout=10, what="REMOVED events")
        assert set(work.removed) == frozen_ids  # and only them
        assert await listed(client) >= healthy_bidders | healthy_workers
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen.pid, signal.SIGCONT)
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        frozen.kill()
        await asyncio.to_thread(frozen.wait)
        await process.terminate(healthy, 3)
        await client.close()


async def _none_listed(client: MeshClient, ids: set[str]) -> bool:
    try:
        return not ids & await listed(client)
    except errors.MabeamError:
        return False
