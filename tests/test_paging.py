"""Paging that pages: list calls read one bounded range of etcd per page; no service keeps the history.

* ``ListGoals``, ``ListVariables``, ``ListBindings`` and ``ListSupervisedAgents``
  read ``page_size + 1`` keys per etcd range (the stores count their range
  reads: :class:`mabeam.runtime.paging.ScanStats`), return every item exactly
  once and in order, and answer a bad page token INVALID_ARGUMENT.
* The planner keeps the unfinished goals only (2,000 finished goals: none in
  memory), and the supervisor the active records only (2,000 stopped: none).
* Internal callers page through every agent: with 1,100 agents on one
  AgentHost, the planner's candidates are all 1,100 and an orchestrator
  metric sees the agent that sorts past the first 1,000.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from harness.wait import eventually
from mabeam import errors
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient, list_all
from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient, connect
from mabeam.runtime.paging import ScanStats, last_keys
from mabeam.server import MeshServer
from mabeam.services.orchestrator import server as orchestrator_server
from mabeam.services.orchestrator.coordinate import Coordinator
from mabeam.services.orchestrator.store import VariableStore
from mabeam.services.planner import server as planner_server
from mabeam.services.planner.assignment import Assigner
from mabeam.services.planner.store import GoalStore
from mabeam.services.registry import supervisor as registry_supervisor
from mabeam.services.registry.store import RegistryStore
from mabeam.v1 import common_pb2, orchestrator_pb2, planner_pb2, registry_pb2

pytestmark = pytest.mark.timeout(120)
FINISHED_GOALS = 2000


@pytest.fixture
async def etcd_client(mesh_config: MeshConfig) -> AsyncIterator[EtcdClient]:
    client = await connect(mesh_config.etcd_endpoints)
    yield client
    await client.close()


def _capture(monkeypatch: pytest.MonkeyPatch, cls: Any) -> list[Any]:
    """The instances of ``cls`` whose ``start`` runs (the servicer a service builds)."""
    started: list[Any] = []
    original = cls.start

    async def start(self: Any) -> None:
        started.append(self)
        await original(self)

    monkeypatch.setattr(cls, "start", start)
    return started


def _goal(n: int, state: int) -> planner_pb2.Goal:
    goal = planner_pb2.Goal(goal_id=f"g{n:05d}", state=state)  # type: ignore[arg-type]
    goal.spec.steps.add(step_id="s", capability="add")
    goal.created_at.FromNanoseconds(1_700_000_000_000_000_000 + n * 1000)
    return goal


async def _pages(call: Callable[[Any], Awaitable[Any]], request: Any, field: str) -> list[list[Any]]:
    pages = []
    while True:
        reply = await call(request)
        pages.append(list(getattr(reply, field)))
        if not reply.next_page_token:
            return pages
        request.page_token = reply.next_page_token


def _bounded(stats: ScanStats, size: int) -> None:
    assert stats.ranges > 0
    assert stats.largest <= size + 1, f"a range read returned {stats.largest} keys for pages of {size}"
    assert max(stats.limits) <= size + 1


async def test_list_goals_pages_250_goals_100_at_a_time_newest_first(
    service: Callable[..., Awaitable[MeshServer]],
    mesh_config: MeshConfig,
    etcd_client: EtcdClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seeding = GoalStore(etcd_client, mesh_config)
    states = (planner_pb2.GOAL_STATE_SUCCEEDED, planner_pb2.GOAL_STATE_FAILED)
    goals = [_goal(n, states[n % 2]) for n in range(250)]
    await asyncio.gather(*(seeding.create(g) for g in goals))
    started = _capture(monkeypatch, planner_server.PlannerServicer)
    planner = await service("planner")
    (servicer,) = started
    client = await MeshClient.connect(planner=planner.address)
    try:
        pages = await _pages(client.planner.ListGoals, planner_pb2.ListGoalsRequest(page_size=100), "goals")
        assert [len(p) for p in pages] == [100, 100, 50]
        listed = [g.goal_id for p in pages for g in p]
        assert listed == [g.goal_id for g in reversed(goals)]  # all, once, newest first
        assert all(len(g.steps) == 1 for p in pages for g in p)  # full goals, step statuses included
        _bounded(servicer.store.scans, 100)
        assert servicer.store.scans.keys <= 3 * 101

        # A state filter (not in the key range): bounded ranges too, every match once, in order.
        servicer.store.scans = ScanStats()
        request = planner_pb2.ListGoalsRequest(page_size=100, state=planner_pb2.GOAL_STATE_FAILED)
        failed = [g.goal_id for p in await _pages(client.planner.ListGoals, request, "goals") for g in p]
        assert failed == [g.goal_id for g in reversed(goals) if g.state == planner_pb2.GOAL_STATE_FAILED]
        _bounded(servicer.store.scans, 100)

        # Bad tokens: not ours, or issued for another filter.
        for bad in (
            planner_pb2.ListGoalsRequest(page_token="garbage!"),
            planner_pb2.ListGoalsRequest(page_token="eyJhIjogMX0"),
        ):
            with pytest.raises(errors.InvalidArgument, match="page_token"):
                await client.planner.ListGoals(bad)
        first = await client.planner.ListGoals(planner_pb2.ListGoalsRequest(page_size=10))
        with pytest.raises(errors.InvalidArgument, match="different filter"):
            await client.planner.ListGoals(
                planner_pb2.ListGoalsRequest(
                    page_token=first.next_page_token, state=planner_pb2.GOAL_STATE_FAILED
                )
            )
    finally:
        await client.close()


async def test_the_planner_holds_only_unfinished_goals(
    service: Callable[..., Awaitable[MeshServer]],
    mesh_config: MeshConfig,
    etcd_client: EtcdClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """2,000 finished goals (50 of them stored before the indexes existed): none in memory."""
    seeding = GoalStore(etcd_client, mesh_config)
    finished = [_goal(n, planner_pb2.GOAL_STATE_SUCCEEDED) for n in range(FINISHED_GOALS)]
    for i in range(0, FINISHED_GOALS, 200):
        await asyncio.gather(*(seeding.create(g) for g in finished[i : i + 200]))
    old_layout = [_goal(FINISHED_GOALS + n, planner_pb2.GOAL_STATE_CANCELLED) for n in range(50)]
    for g in old_layout:  # as the planner wrote goals before goal-order/ and goal-active/
        await etcd_client.put(seeding.goal_key(g.goal_id), g.SerializeToString())
    started = _capture(monkeypatch, planner_server.PlannerServicer)
    planner = await service("planner")
    (servicer,) = started
    assert len(servicer.active) == 0  # was 2,050: every goal ever, rescanned each pass
    client = await MeshClient.connect(planner=planner.address)
    try:
        listed = await list_all(client.planner.ListGoals, planner_pb2.ListGoalsRequest(), "goals")
        assert len(listed) == FINISHED_GOALS + 50  # the backfill indexed the old ones
        assert listed[0].goal_id == old_layout[-1].goal_id
        _bounded(servicer.store.scans, 1000)
    finally:
        await client.close()


async def test_orchestrator_lists_read_one_bounded_range_per_page(
    service: Callable[..., Awaitable[MeshServer]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = _capture(monkeypatch, orchestrator_server.OrchestratorServicer)
    orchestrator = await service("orchestrator")
    (servicer,) = started
    client = await MeshClient.connect(orchestrator=orchestrator.address)
    try:
        names = [f"p/v{n:03d}" for n in range(250)]
        for i in range(0, len(names), 50):
            await asyncio.gather(
                *(
                    client.orchestrator.SetVariable(
                        orchestrator_pb2.SetVariableRequest(name=n, value=common_pb2.Value(number_value=1))
                    )
                    for n in names[i : i + 50]
                )
            )
        await client.orchestrator.SetVariable(
            orchestrator_pb2.SetVariableRequest(name="q", value=common_pb2.Value(number_value=1))
        )
        servicer.store.scans = ScanStats()
        request = orchestrator_pb2.ListVariablesRequest(prefix="p/", page_size=100)
        pages = await _pages(client.orchestrator.ListVariables, request, "variables")
        assert [len(p) for p in pages] == [100, 100, 50]
        assert [v.name for p in pages for v in p] == names
        _bounded(servicer.store.scans, 100)
        relaxed = orchestrator_pb2.ListVariablesRequest(
            prefix="p/v1", page_size=7, consistency=orchestrator_pb2.CONSISTENCY_RELAXED
        )
        got = [
            v.name for p in await _pages(client.orchestrator.ListVariables, relaxed, "variables") for v in p
        ]
        assert got == [n for n in names if n.startswith("p/v1")]
        listed = await client.orchestrator.ListBindings(orchestrator_pb2.ListBindingsRequest(page_size=5))
        assert not listed.bindings and not listed.next_page_token
        for call, req in (
            (client.orchestrator.ListVariables, orchestrator_pb2.ListVariablesRequest(page_token="x")),
            (client.orchestrator.ListBindings, orchestrator_pb2.ListBindingsRequest(page_token="x")),
        ):
            with pytest.raises(errors.InvalidArgument, match="page_token"):
                await call(req)
        first = await client.orchestrator.ListVariables(
            orchestrator_pb2.ListVariablesRequest(prefix="p/", page_size=10)
        )
        with pytest.raises(errors.InvalidArgument, match="different filter"):
            await client.orchestrator.ListVariables(
                orchestrator_pb2.ListVariablesRequest(prefix="q", page_token=first.next_page_token)
            )
    finally:
        await client.close()


async def test_the_supervisor_holds_only_active_records(
    service: Callable[..., Awaitable[MeshServer]],
    mesh_config: MeshConfig,
    etcd_client: EtcdClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """2,000 stopped supervision records: none cached, none rescanned; listed from etcd, paged."""
    keys = RegistryStore(etcd_client, mesh_config).keys
    ids = [f"old-{n:05d}" for n in range(2000)]
    for i in range(0, len(ids), 200):
        await asyncio.gather(
            *(
                etcd_client.put(
                    keys.supervised_agent(a),
                    registry_pb2.SupervisedAgent(
                        agent_id=a,
                        state=registry_pb2.SUPERVISION_STATE_STOPPED
                        if n % 4
                        else registry_pb2.SUPERVISION_STATE_FAILED,
                    ).SerializeToString(),
                )
                for n, a in enumerate(ids[i : i + 200], start=i)
            )
        )
    started = _capture(monkeypatch, registry_supervisor.Supervisor)
    registry = await service("registry")
    (supervisor,) = started
    assert len(supervisor.records) == 0  # was 2,000, walked by every pass
    client = await MeshClient.connect(registry=registry.address)
    try:
        pages = await _pages(
            client.registry.ListSupervisedAgents,
            registry_pb2.ListSupervisedAgentsRequest(page_size=300),
            "agents",
        )
        assert [a.agent_id for p in pages for a in p] == ids
        failed = await list_all(
            client.registry.ListSupervisedAgents,
            registry_pb2.ListSupervisedAgentsRequest(state=registry_pb2.SUPERVISION_STATE_FAILED),
            "agents",
        )
        assert [a.agent_id for a in failed] == ids[::4]
        _bounded(supervisor.store.scans, 1000)
        with pytest.raises(errors.InvalidArgument, match="page_token"):
            await client.registry.ListSupervisedAgents(
                registry_pb2.ListSupervisedAgentsRequest(page_token="nope")
            )
    finally:
        await client.close()


class Busy(Agent):
    """Offers ``count``; reports the load it was given."""

    capabilities = ("count",)

    def __init__(self, agent_id: str, load: float = 0.0) -> None:
        super().__init__(agent_id)
        self.fixed_load = load

    def load(self) -> common_pb2.AgentLoad:
        return common_pb2.AgentLoad(load=self.fixed_load)


async def test_internal_callers_page_past_a_thousand_agents(
    service: Callable[..., Awaitable[MeshServer]], mesh_config: MeshConfig, etcd_client: EtcdClient
) -> None:
    registry = await service("registry")
    agents = [Busy(f"a-{n:04d}") for n in range(1099)] + [Busy("z-last", load=1.0)]
    host = AgentHost(list(agents), registry=registry.address)
    client = await MeshClient.connect(registry=registry.address)
    await host.start()
    try:
        # The planner's candidates for a capability: all 1,100, not the first 1,000.
        assigner = Assigner(lambda: client, "goal", planner_pb2.ASSIGNMENT_STRATEGY_FIRST_FIT)
        candidates = await eventually(
            lambda: _when(assigner, 1100), timeout=60, what="1,100 candidates listed"
        )
        assert {a.agent_id for a in candidates} == {a.agent_id for a in agents}

        # An adaptation metric over the agents: the one past the first 1,000 counts.
        coordinator = Coordinator(VariableStore(etcd_client, mesh_config), lambda: client, "test")
        binding = orchestrator_pb2.OrchestrationBinding(variable="v")
        binding.participants.capability = "count"
        binding.adaptation.metric = "agents.load.max"

        async def metric_is_one() -> bool:
            value, _ = await coordinator._metric(binding)
            return value == 1.0

        await eventually(metric_is_one, timeout=30, what="z-last's load seen by the metric")
    finally:
        await client.close()
        await host.stop()


async def _when(assigner: Assigner, count: int) -> list[registry_pb2.Agent] | None:
    assigner._candidates.clear()
    agents = await assigner.candidates("count")
    return agents if len(agents) == count else None


# -- the last keys of a range (what the retention pruners delete first) ---------------------------


async def _put_all(client: EtcdClient, keys: list[bytes]) -> None:
    for at in range(0, len(keys), 100):
        await client.transaction(
            compare=[],
            success=[client.transactions.put(k, b"v" + k[-4:]) for k in keys[at : at + 100]],
            failure=[],
        )


async def test_last_keys_reads_a_bounded_tail_of_a_few_thousand_keys(
    etcd_client: EtcdClient, key_prefix: bytes
) -> None:
    """3,000 keys of a newest-first index (20-digit positions over days, some sharing one; ids
    after them): the last N in key order, exactly, for N from 1 to past the whole; etcd returns
    at most 2 N + 1 keys in all, and a few dozen count-only ranges."""
    index = key_prefix + b"index/"
    base = (1 << 63) - 1_764_000_000 * 10**9
    keys = sorted(
        index + f"{base - (n // 3) * 86_400_000_000 // 1000 - (n % 3 == 0) * n:020d}/s{n:05d}".encode()
        for n in range(3000)
    )
    await _put_all(etcd_client, keys)
    try:
        for limit in (1, 7, 100, 1000, 2999, 3000, 5000):
            stats = ScanStats()
            got = await last_keys(etcd_client, index, None, limit, stats=stats)
            assert [bytes(kv.key) for kv in got] == keys[-limit:], limit
            assert all(bytes(kv.value) == b"v" + bytes(kv.key)[-4:] for kv in got)
            print(f"\nlast {limit}: {stats.ranges} reads, {stats.keys} keys, {stats.counts} count-only")
            assert stats.keys <= max(2 * min(limit, 3000), 64) + 1, (limit, stats)
            assert stats.counts <= 100, (limit, stats)
        # A range that ends before the index does (the pruner's next window), keys only.
        before = keys[2000]
        stats = ScanStats()
        got = await last_keys(etcd_client, index, before, 100, keys_only=True, stats=stats)
        assert [bytes(kv.key) for kv in got] == keys[1900:2000]
        assert all(not kv.value for kv in got)
        assert stats.keys <= 201, stats
        assert await last_keys(etcd_client, key_prefix + b"empty/", None, 10) == []
    finally:
        await etcd_client.delete_prefix(key_prefix)


async def test_last_keys_of_arbitrary_bytes(etcd_client: EtcdClient, key_prefix: bytes) -> None:
    """Keys of any bytes (0x00 and 0xff in them, one a prefix of another): still exactly the last N."""
    rng = random.Random(7)
    suffixes = {
        bytes(rng.choice((0, 1, 0x30, 0x7F, 0xFE, 0xFF)) for _ in range(rng.randint(1, 12)))
        for _ in range(600)
    }
    suffixes |= {b"\xff" * 3, b"\xff" * 4, b"\x00", b"\x00\x00"}
    keys = sorted(key_prefix + s for s in suffixes)
    await _put_all(etcd_client, keys)
    try:
        for limit in (1, 5, 50, 290):
            stats = ScanStats()
            got = await last_keys(etcd_client, key_prefix, None, limit, keys_only=True, stats=stats)
            assert [bytes(kv.key) for kv in got] == keys[-limit:], limit
            assert stats.keys <= max(2 * limit, 64) + 1, (limit, stats)
        middle = keys[len(keys) // 2]
        got = await last_keys(etcd_client, key_prefix, middle, 20, keys_only=True)
        assert [bytes(kv.key) for kv in got] == keys[len(keys) // 2 - 20 : len(keys) // 2]
    finally:
        await etcd_client.delete_prefix(key_prefix)
