"""The production topology under faults: a 3-member etcd and 2 replicas of each service.

Everything goes through the services' gRPC API (the SDK's MeshClient with
every replica's address, grpc.health.v1, discovery through etcd); only etcd
members are killed, stopped and started.

* The etcd leader is SIGKILLed (twice) under compare-and-set increments from
  three client processes: no acknowledged increment is lost, none is applied
  twice, and the increments go on after each kill. Each attempt names itself
  in the variable's ``writer``, so the variable's history (WatchVariables from
  its creation) says exactly which attempts with an unknown outcome (a timeout)
  landed.
* The whole etcd cluster is stopped and started again (data kept) under a
  running agent, open WatchVariables / WatchAgents streams and a writer that
  keeps writing: every stored write reaches the watch once and in order,
  resuming with ``after_revision`` gives exactly what was missed, the agent is
  listed again by itself, and every replica is healthy, answers, is found by
  discovery again, and the services work together (prober, auction, goal).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from harness.wait import eventually
from mabeam import discovery, errors, health_check
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient
from mabeam.config import SERVICE_NAMES, SERVICES
from mabeam.runtime.mesh import LocalMesh
from mabeam.v1 import agent_pb2, common_pb2, coordination_pb2, orchestrator_pb2, planner_pb2, registry_pb2

pytestmark = [pytest.mark.slow]

MeshFactory = Callable[..., Awaitable[LocalMesh]]

# Outcomes that say "etcd or a replica could not be reached": retry after a re-read.
TRANSIENT = (errors.Unavailable, errors.DeadlineExceeded)


# --- 1. the etcd leader killed during concurrent compare-and-set increments ----------

# One incrementing client, in its own process. Each attempt writes the counter's
# value + 1 with compare-and-set on the version read, and names itself in
# `writer` ("<client>:<attempt>"), so the variable's history (WatchVariables
# from its creation) tells which attempts landed. Outcomes per attempt:
# acked (OK), lost (ABORTED / FAILED_PRECONDITION: the server says the CAS
# failed), ambiguous (UNAVAILABLE, DEADLINE_EXCEEDED, ...: it may have landed).
# It runs until its stdin closes (or a hard cap), then prints them as JSON.
INCREMENTER = """
import asyncio, json, sys, threading, time
from mabeam import discovery, errors
from mabeam.runtime import etcd as mabeam_etcd
from mabeam.client import MeshClient
from mabeam.v1 import common_pb2, orchestrator_pb2

async def main(name, me, addresses, cap_s):
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    def wait_for_eof():
        sys.stdin.read()
        loop.call_soon_threadsafe(stop.set)
    threading.Thread(target=wait_for_eof, daemon=True).start()
    out = {"acked": [], "lost": [], "ambiguous": [], "read_errors": 0, "codes": {}}
    deadline = time.monotonic() + cap_s
    attempt = 0
    async with await MeshClient.connect(orchestrator=addresses.split(",")) as mesh:
        o = mesh.orchestrator
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                current = (await o.GetVariable(orchestrator_pb2.GetVariableRequest(name=name), timeout=5)).variable
            except errors.MabeamError as exc:
                out["read_errors"] += 1
                await asyncio.sleep(0.05)
                continue
            attempt += 1
            tag = f"{me}:{attempt}"
            request = orchestrator_pb2.SetVariableRequest(
                name=name,
                value=common_pb2.Value(int_value=current.value.int_value + 1),
                expected_version=current.version,
                writer=tag,
            )
            try:
                await o.SetVariable(request, timeout=5)
                out["acked"].append(tag)
            except (errors.Aborted, errors.FailedPrecondition):
                out["lost"].append(tag)
            except errors.MabeamError as exc:
                out["ambiguous"].append(tag)
                code = exc.code.name
                out["codes"][code] = out["codes"].get(code, 0) + 1
                await asyncio.sleep(0.05)
    print(json.dumps(out), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
"""


async def _version(client: MeshClient, name: str) -> int:
    try:
        reply = await client.orchestrator.GetVariable(
            orchestrator_pb2.GetVariableRequest(name=name), timeout=5
        )
    except TRANSIENT:
        return 0
    return int(reply.variable.version)


async def _history(
    client: MeshClient, name: str, after_revision: int, until_version: int
) -> list[orchestrator_pb2.Variable]:
    """Every write to ``name`` after ``after_revision`` up to ``until_version``, from WatchVariables."""
    seen: list[orchestrator_pb2.Variable] = []
    async with asyncio.timeout(60):
        while not seen or seen[-1].version < until_version:
            resume = seen[-1].mod_revision if seen else after_revision
            try:
                request = orchestrator_pb2.WatchVariablesRequest(prefix=name, after_revision=resume)
                async for event in client.orchestrator.WatchVariables(request):
                    if event.variable.name == name:
                        seen.append(event.variable)
                    if seen and seen[-1].version >= until_version:
                        break
            except TRANSIENT:
                await asyncio.sleep(0.2)
    return seen


@pytest.mark.timeout(240)
async def test_killing_the_etcd_leader_loses_no_acknowledged_increment(mesh_cluster: MeshFactory) -> None:
    mesh = await mesh_cluster(services=("orchestrator",))
    cluster = mesh.etcd_cluster
    assert cluster is not None and len(cluster.members) == 3
    addresses = mesh.addresses("orchestrator")
    assert len(addresses) == 2
    name = "faults/counter"
    client = await MeshClient.connect(orchestrator=addresses)
    procs: list[asyncio.subprocess.Process] = []
    try:
        created = (
            await client.orchestrator.SetVariable(
                orchestrator_pb2.SetVariableRequest(
                    name=name, value=common_pb2.Value(int_value=0), writer="init"
                )
            )
        ).variable
        assert created.version == 1
        for i in range(3):
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    INCREMENTER,
                    name,
                    f"c{i}",
                    ",".join(addresses),
                    "150",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            )

        async def version_at_least(n: int) -> bool:
            return await _version(client, name) >= n

        await eventually(lambda: version_at_least(31), timeout=90, what="30 increments before the kill")
        killed: list[int] = []
        progress: list[float] = []
        # Twice: kill the leader, see progress, bring the member back (so the
        # second round kills a leader elected among members that were restarted).
        for _ in range(2):
            before_kill = await _version(client, name)
            assert before_kill >= 31
            leader = await cluster.leader_index()
            cluster.members[leader].kill()
            killed_at = time.monotonic()
            killed.append(leader)

            async def new_leader(old: int = leader) -> bool:
                try:
                    return await cluster.leader_index() != old
                except RuntimeError:
                    return False

            await eventually(new_leader, timeout=30, what="a new etcd leader")
            # Progress after the kill: 30 more increments (at most 3 were in flight at the kill).
            await eventually(
                lambda b=before_kill: version_at_least(b + 30),  # type: ignore[misc]
                timeout=90,
                what="30 increments after the leader was killed",
            )
            progress.append(time.monotonic() - killed_at)
            await cluster.members[leader].restart(timeout=30)
    finally:
        outs: list[dict[str, Any]] = []
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in procs:
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise
            outs.append(json.loads(out.decode().strip().splitlines()[-1]))
    try:
        final = (
            await eventually(
                lambda: _get_or_none(client, name), timeout=30, what="the counter readable at the end"
            )
        ).variable
        history = await _history(client, name, created.mod_revision, final.version)
    finally:
        await client.close()

    acked = [t for o in outs for t in o["acked"]]
    lost = {t for o in outs for t in o["lost"]}
    ambiguous = {t for o in outs for t in o["ambiguous"]}
    codes: dict[str, int] = {}
    for o in outs:
        for code, n in o["codes"].items():
            codes[code] = codes.get(code, 0) + n
    writers = [v.writer for v in history]
    landed_ambiguous = [t for t in writers if t in ambiguous]
    print(
        f"\nacked {len(acked)}, lost CAS {len(lost)}, ambiguous {len(ambiguous)} "
        f"({codes}; {len(landed_ambiguous)} landed), read errors {sum(o['read_errors'] for o in outs)}, "
        f"final value {final.value.int_value}; killed members {killed}, "
        f"30 increments {', '.join(f'{p:.1f}' for p in progress)} s after each kill"
    )
    # The history is the whole chain of writes: versions 2..final, each once, each +1.
    assert [v.version for v in history] == list(range(2, final.version + 1))
    assert [v.value.int_value for v in history] == list(range(1, final.version))
    assert len(set(writers)) == len(writers), "one attempt landed twice"
    # Every acknowledged increment is there; nothing the server called lost is;
    # whatever else landed is an attempt whose outcome the client could not know.
    assert not set(acked) - set(writers), "acknowledged increments missing from the history"
    assert not lost & set(writers), (
        f"writes reported as a lost CAS that did land: {sorted(lost & set(writers))}"
    )
    assert set(writers) <= set(acked) | ambiguous, "writes nobody attempted"
    # The final value is exactly the acknowledged increments plus the ambiguous ones that landed.
    assert final.value.int_value == len(acked) + len(landed_ambiguous)
    assert len(ambiguous) <= 0.25 * len(acked) + 10, f"{len(ambiguous)} ambiguous outcomes: {codes}"


async def _get_or_none(client: MeshClient, name: str) -> orchestrator_pb2.GetVariableResponse | None:
    try:
        return await client.orchestrator.GetVariable(
            orchestrator_pb2.GetVariableRequest(name=name), timeout=5
        )
    except TRANSIENT:
        return None


# --- 2. the whole etcd cluster stopped and started again ----------------------------


class Keeper(Agent):
    """Bids 7 in every auction and runs any step it is given."""

    capabilities = ("keep",)

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        return agent_pb2.CoordinationResponse(bid=agent_pb2.Bid(amount=7.0))

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        return {"ran": request.step_id}


class Watch:
    """A watch consumed as a user would: on an error, resume after the last revision seen."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.resumes: list[str] = []
        self.task: asyncio.Task[None] | None = None

    def start(self, open_stream: Callable[[int], AsyncIterator[Any]], after_revision: int) -> None:
        async def run() -> None:
            last = after_revision
            while True:
                try:
                    async for event in open_stream(last):
                        self.events.append(event)
                        last = event.revision
                    self.resumes.append("ended")
                except (errors.Unavailable, errors.DeadlineExceeded, errors.Cancelled, errors.Unknown) as exc:
                    self.resumes.append(exc.code.name)
                await asyncio.sleep(0.2)

        self.task = asyncio.create_task(run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            if not self.task.cancelled() and self.task.exception() is not None:
                raise self.task.exception()  # type: ignore[misc]


def _replay(events: list[registry_pb2.WatchAgentsResponse]) -> set[str]:
    """The agents a WatchAgents consumer believes exist after these events."""
    present: set[str] = set()
    for e in events:
        if e.type in (
            registry_pb2.AGENT_EVENT_TYPE_EXISTING,
            registry_pb2.AGENT_EVENT_TYPE_ADDED,
            registry_pb2.AGENT_EVENT_TYPE_UPDATED,
        ):
            present.add(e.agent.agent_id)
        elif e.type == registry_pb2.AGENT_EVENT_TYPE_REMOVED:
            present.discard(e.agent.agent_id)
    return present


async def _listed(client: MeshClient) -> set[str] | None:
    try:
        reply = await client.registry.ListAgents(registry_pb2.ListAgentsRequest(page_size=1000), timeout=5)
    except errors.MabeamError:
        return None
    return {a.agent_id for a in reply.agents}


async def _set_exactly_once(client: MeshClient, name: str, number: int) -> orchestrator_pb2.Variable:
    """Write ``number`` (this test is the only writer): after an ambiguous failure, re-read
    to see whether it landed before writing again, so each value is stored once."""
    request = orchestrator_pb2.SetVariableRequest(
        name=name, value=common_pb2.Value(int_value=number), writer=f"w{number}"
    )
    async with asyncio.timeout(60):
        while True:
            try:
                return (await client.orchestrator.SetVariable(request, timeout=5)).variable
            except TRANSIENT:
                pass
            while True:
                try:
                    current = (
                        await client.orchestrator.GetVariable(
                            orchestrator_pb2.GetVariableRequest(name=name), timeout=5
                        )
                    ).variable
                    break
                except TRANSIENT:
                    await asyncio.sleep(0.2)
            if current.value.int_value == number:
                return current


async def _answers(kind: str, address: str) -> bool:
    """One real call (an etcd read behind it) to this replica alone."""
    client = await MeshClient.connect(**{kind: address})
    try:
        if kind == "registry":
            await client.registry.ListAgents(registry_pb2.ListAgentsRequest(), timeout=5)
        elif kind == "orchestrator":
            await client.orchestrator.ListVariables(orchestrator_pb2.ListVariablesRequest(), timeout=5)
        elif kind == "coordination":
            await client.coordination.ListSessions(coordination_pb2.ListSessionsRequest(), timeout=5)
        else:
            await client.planner.ListGoals(planner_pb2.ListGoalsRequest(), timeout=5)
    except errors.MabeamError:
        return False
    finally:
        await client.close()
    return True


async def _published(etcd: tuple[str, ...], mesh: LocalMesh) -> bool:
    """Discovery through etcd finds every replica of every service (they re-published)."""
    try:
        async with asyncio.timeout(15):
            return await _all_published(etcd, mesh)
    except grpc.RpcError:
        return False


async def _all_published(etcd: tuple[str, ...], mesh: LocalMesh) -> bool:
    for kind in SERVICES:
        resolver = discovery.EndpointResolver(etcd, "/mabeam", kind)
        try:
            await resolver.start()
            if sorted(resolver.addresses()) != sorted(mesh.addresses(kind)):
                return False
        finally:
            await resolver.stop()
    return True


@pytest.mark.timeout(300)
async def test_a_full_etcd_restart_loses_no_watch_event_and_everything_comes_back(
    mesh_cluster: MeshFactory,
) -> None:
    mesh = await mesh_cluster()
    cluster = mesh.etcd_cluster
    assert cluster is not None
    client = await MeshClient.connect(**{kind: mesh.addresses(kind) for kind in SERVICES})
    host = AgentHost([Keeper("keeper")], registry=mesh.addresses("registry"), lease_ttl=2.0)
    var_watch, agent_watch = Watch(), Watch()
    name = "restart/seq"
    busy_task: asyncio.Task[None] | None = None
    busy_stop = asyncio.Event()
    try:
        await host.start()
        # Registered by hand on a long lease, deregistered after the outage.
        register = registry_pb2.RegisterAgentRequest(
            agent_id="doomed", endpoint="127.0.0.1:9", capabilities=["idle"]
        )
        register.lease_ttl.FromSeconds(120)
        doomed = await client.registry.RegisterAgent(register)
        await eventually(
            lambda: _listed_has(client, {"keeper", "doomed"}), timeout=30, what="both agents listed"
        )
        first = await _set_exactly_once(client, name, 0)
        var_watch.start(
            lambda after: client.orchestrator.WatchVariables(
                orchestrator_pb2.WatchVariablesRequest(prefix="restart/", after_revision=after)
            ),
            first.mod_revision,
        )
        agent_watch.start(
            lambda after: client.registry.WatchAgents(registry_pb2.WatchAgentsRequest(after_revision=after)),
            0,
        )
        for i in range(1, 11):
            await _set_exactly_once(client, name, i)
        await eventually(lambda: len(var_watch.events) >= 10, timeout=30, what="10 events before the outage")
        # Meanwhile another writer keeps writing "restart/busy" straight through the outage.
        busy: dict[str, list[int]] = {"acked": [], "ambiguous": []}
        busy_task = asyncio.create_task(_write_through(client, "restart/busy", busy_stop, busy))
        await eventually(lambda: len(busy["acked"]) >= 5, timeout=30, what="busy writes before the outage")

        # etcd goes away entirely for longer than every lease's TTL (agents' and services').
        await asyncio.gather(*(m.stop(timeout=2) for m in cluster.members))
        down_at = time.monotonic()
        with pytest.raises((errors.Unavailable, errors.DeadlineExceeded)):
            await client.orchestrator.GetVariable(orchestrator_pb2.GetVariableRequest(name=name), timeout=5)
        await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - down_at)))
        await asyncio.gather(*(m.restart(timeout=30) for m in cluster.members))
        back_at = time.monotonic()
        beats_at_restart = host.heartbeat_stats.acked
        busy_at_restart = len(busy["acked"])

        for i in range(11, 21):
            await _set_exactly_once(client, name, i)
        late = AgentHost([Keeper("late")], registry=mesh.addresses("registry"), lease_ttl=2.0)
        await late.start()
        await late.stop()  # deregisters: ADDED then REMOVED
        await client.registry.DeregisterAgent(
            registry_pb2.DeregisterAgentRequest(agent_id="doomed", token=doomed.token)
        )
        await eventually(
            lambda: len(busy["acked"]) >= busy_at_restart + 10,
            timeout=60,
            what="busy writes after the restart",
        )
        busy_stop.set()
        await busy_task
        await _set_exactly_once(client, name, 21)  # the last one: all before it were delivered

        # Every variable write seen exactly once, in order: no gap, no duplicate.
        def events_of(var: str) -> list[orchestrator_pb2.WatchVariablesResponse]:
            return [e for e in var_watch.events if e.variable.name == var]

        await eventually(
            lambda: any(e.variable.value.int_value == 21 for e in events_of(name)),
            timeout=60,
            what="the last write seen on the watch",
        )
        assert all(e.type == orchestrator_pb2.VARIABLE_EVENT_TYPE_PUT for e in var_watch.events)
        values = [e.variable.value.int_value for e in events_of(name)]
        assert values == list(range(1, 22)), values
        assert [e.variable.version for e in events_of(name)] == list(range(2, 23))
        # The busy variable: every version etcd stored is on the watch, once, in
        # order; each is a write the writer made (acknowledged, or timed out
        # during the outage and landed anyway), and every acknowledged write is there.
        busy_final = (
            await client.orchestrator.GetVariable(
                orchestrator_pb2.GetVariableRequest(name="restart/busy"), timeout=10
            )
        ).variable
        busy_events = events_of("restart/busy")
        assert [e.variable.version for e in busy_events] == list(range(1, busy_final.version + 1))
        busy_values = [e.variable.value.int_value for e in busy_events]
        assert len(set(busy_values)) == len(busy_values), busy_values
        assert set(busy["acked"]) <= set(busy_values), sorted(set(busy["acked"]) - set(busy_values))
        assert set(busy_values) <= set(busy["acked"]) | set(busy["ambiguous"])

        # The agent is back by itself, and the agents watch agrees with the listing.
        async def agents_agree() -> set[str] | None:
            listed = await _listed(client)
            if listed is None or "keeper" not in listed or _replay(agent_watch.events) != listed:
                return None
            return listed

        listed = await eventually(agents_agree, timeout=60, what="keeper listed, watch == listing")
        assert listed == {"keeper"}
        changes = [e for e in agent_watch.events if e.type != registry_pb2.AGENT_EVENT_TYPE_EXISTING]
        seen = [(e.revision, e.type, e.agent.agent_id) for e in changes]
        assert len(set(seen)) == len(seen), f"duplicate agent events: {seen}"
        assert [r for r, _, _ in seen] == sorted(r for r, _, _ in seen), f"out of order: {seen}"
        said = {(t, a) for _, t, a in seen}
        assert {
            (registry_pb2.AGENT_EVENT_TYPE_ADDED, "late"),
            (registry_pb2.AGENT_EVENT_TYPE_REMOVED, "late"),
        } <= said
        assert (registry_pb2.AGENT_EVENT_TYPE_REMOVED, "doomed") in said

        # A client that went away before the outage resumes from the last revision
        # it saw (the documented after_revision) and gets exactly what it missed.
        before_outage = events_of(name)[9]
        assert before_outage.variable.value.int_value == 10
        resumed: list[int] = []
        async with asyncio.timeout(60):
            request = orchestrator_pb2.WatchVariablesRequest(
                prefix="restart/", after_revision=before_outage.revision
            )
            async for event in client.orchestrator.WatchVariables(request):
                if event.variable.name == name:
                    resumed.append(event.variable.value.int_value)
                    if resumed[-1] == 21:
                        break
        assert resumed == list(range(11, 22))
        snapshot_done = agent_watch.events[0]
        for e in agent_watch.events:
            if e.type == registry_pb2.AGENT_EVENT_TYPE_SNAPSHOT_DONE:
                snapshot_done = e
                break
        assert snapshot_done.type == registry_pb2.AGENT_EVENT_TYPE_SNAPSHOT_DONE
        replayed: list[tuple[int, int, str]] = []
        async with asyncio.timeout(60):
            request_agents = registry_pb2.WatchAgentsRequest(after_revision=snapshot_done.revision)
            async for agent_event in client.registry.WatchAgents(request_agents):
                replayed.append((agent_event.revision, agent_event.type, agent_event.agent.agent_id))
                if agent_event.revision >= seen[-1][0]:
                    break
        live = [x for x in seen if x[1] != registry_pb2.AGENT_EVENT_TYPE_SNAPSHOT_DONE]
        assert replayed == live, f"resumed {replayed}, live {live}"

        # Every replica of every service is healthy and answers a real call,
        # and discovery through etcd finds them all again.
        for kind in SERVICES:
            for address in mesh.addresses(kind):
                await eventually(
                    lambda a=address, k=kind: health_check.check(a, SERVICE_NAMES[k], timeout=3),  # type: ignore[misc]
                    timeout=30,
                    what=f"{kind} at {address} healthy",
                )
                await eventually(
                    lambda a=address, k=kind: _answers(k, a),  # type: ignore[misc]
                    timeout=30,
                    what=f"{kind} at {address} answering",
                )
        await eventually(lambda: _published(mesh.etcd_endpoints, mesh), timeout=30, what="all re-published")
        # The registry's elected health prober runs again: it sees the agent go
        # NOT_SERVING on grpc.health.v1 and come back.
        for serving, status in (
            (False, registry_pb2.AGENT_STATUS_NOT_SERVING),
            (True, registry_pb2.AGENT_STATUS_SERVING),
        ):
            await host.set_serving(serving)
            await eventually(
                lambda st=status: _status_is(client, "keeper", st),  # type: ignore[misc]
                timeout=30,
                what=f"keeper probed as {registry_pb2.AgentStatus.Name(status)}",
            )
        # Work that crosses the services: an auction and a goal run on the agent.
        settings = coordination_pb2.SessionSettings(participants=common_pb2.AgentSelector(capability="keep"))
        settings.round_timeout.FromSeconds(5)
        auction = await client.coordination.RunAuction(
            coordination_pb2.RunAuctionRequest(
                settings=settings, type=coordination_pb2.AUCTION_TYPE_FIRST_PRICE, item="after-restart"
            )
        )
        assert list(auction.session.outcome.winners) == ["keeper"]
        events = [
            e
            async for e in client.planner.ExecuteGoal(
                planner_pb2.ExecuteGoalRequest(
                    goal=planner_pb2.GoalSpec(steps=[planner_pb2.StepSpec(step_id="s", capability="keep")])
                )
            )
        ]
        goal = (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=events[0].goal_id))).goal
        assert goal.state == planner_pb2.GOAL_STATE_SUCCEEDED
        # The agent's lease is kept again: its heartbeats are answered, and three
        # TTLs after the restart it is still listed.
        await eventually(
            lambda: host.heartbeat_stats.acked >= beats_at_restart + 3, timeout=30, what="heartbeats answered"
        )
        await asyncio.sleep(max(0.0, 6.0 - (time.monotonic() - back_at)))
        assert await eventually(
            lambda: _listed_has(client, {"keeper"}), timeout=30, what="keeper still listed"
        )
        print(
            f"\nback {time.monotonic() - back_at:.1f} s after etcd restarted; "
            f"watch resumes: variables {var_watch.resumes}, agents {agent_watch.resumes}; agent events {seen}; "
            f"heartbeat stream breaks {host.heartbeat_stats.stream_breaks}; busy writes acked "
            f"{len(busy['acked'])}, ambiguous {len(busy['ambiguous'])} ({len(set(busy_values) & set(busy['ambiguous']))} landed)"
        )
    finally:
        if busy_task is not None:
            busy_stop.set()
            await asyncio.gather(busy_task, return_exceptions=True)
        await var_watch.stop()
        await agent_watch.stop()
        await host.stop()
        await client.close()


async def _listed_has(client: MeshClient, ids: set[str]) -> bool:
    listed = await _listed(client)
    return listed is not None and ids <= listed


async def _status_is(client: MeshClient, agent_id: str, status: int) -> bool:
    try:
        reply = await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id), timeout=5)
    except errors.MabeamError:
        return False
    return bool(reply.agent.status == status)


async def _write_through(
    client: MeshClient, name: str, stop: asyncio.Event, out: dict[str, list[int]]
) -> None:
    """Write 1, 2, 3, ... to ``name`` until told to stop, whatever etcd does; sort the outcomes."""
    i = 0
    while not stop.is_set():
        i += 1
        request = orchestrator_pb2.SetVariableRequest(
            name=name, value=common_pb2.Value(int_value=i), writer=f"busy{i}"
        )
        try:
            await client.orchestrator.SetVariable(request, timeout=3)
            out["acked"].append(i)
        except errors.MabeamError:
            out["ambiguous"].append(i)
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.02)
