"""Retention of finished goals on a real etcd and real services: expiry leases, the count cap, resume.

A finished goal's keys (record, ``goal-order/`` key, steps, events) are bound to an expiry
lease when it finishes, so etcd deletes them after the period; an unfinished goal is never
touched; with a count cap the elected planner deletes the oldest finished goals beyond it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from google.protobuf import struct_pb2

from harness.wait import eventually
from mabeam import errors
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient
from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient, snapshot
from mabeam.server import MeshServer
from mabeam.services.planner import server as planner_server
from mabeam.services.planner import store as planner_store
from mabeam.services.planner.store import GoalStore
from mabeam.v1 import agent_pb2, planner_pb2

pytestmark = pytest.mark.timeout(120)

# Everything the planner keeps per goal, by the store's key table.
GOAL_PREFIXES = (
    "goals",
    "goal-steps",
    "goal-events",
    "goal-order",
    "goal-cancel",
    "goal-owner",
    "goal-active",
)


class Worker(Agent):
    """Does ``add`` steps at once, and ``slow`` steps after ``slow_s`` (or when released)."""

    capabilities = ("add", "slow")

    def __init__(self, agent_id: str, slow_s: float = 60.0) -> None:
        super().__init__(agent_id)
        self.slow_s = slow_s
        self.release = asyncio.Event()

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        if request.capability == "slow":
            try:
                await asyncio.wait_for(self.release.wait(), self.slow_s)
            except TimeoutError:
                pass
        return {"sum": 1.0}


def spec(n: int = 3, capability: str = "add", name: str = "g") -> planner_pb2.GoalSpec:
    v = struct_pb2.Value(number_value=1)
    return planner_pb2.GoalSpec(
        name=name,
        steps=[planner_pb2.StepSpec(step_id=f"s{i}", capability=capability, input=v) for i in range(n)],
    )


Mesh = tuple[MeshClient, MeshServer, Worker, MeshConfig]


@contextlib.asynccontextmanager
async def open_mesh(
    service: Callable[..., Awaitable[MeshServer]], mesh_config: MeshConfig
) -> AsyncIterator[Mesh]:
    registry = await service("registry")
    await service("coordination")
    planner = await service("planner")
    client = await MeshClient.connect(registry=registry.address, planner=planner.address)
    worker = Worker("w1")
    host = AgentHost([worker], registry=registry.address)
    await host.start()
    try:
        yield client, planner, worker, mesh_config
    finally:
        worker.release.set()
        await host.stop()
        await client.close()


@pytest.fixture
async def short_retention(
    service: Callable[..., Awaitable[MeshServer]], mesh_config: MeshConfig, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Mesh]:
    """A mesh whose planner keeps finished goals 2 s (bucket 1 s: expiry within 3 s of the finish)."""
    monkeypatch.setenv("MABEAM_GOAL_RETENTION", "2s")
    monkeypatch.delenv("MABEAM_GOAL_RETENTION_COUNT", raising=False)
    async with open_mesh(service, mesh_config) as mesh:
        yield mesh


async def goal_keys(etcd: EtcdClient, config: MeshConfig, goal_id: str) -> dict[bytes, int]:
    """Every key the planner holds for ``goal_id`` (from its key table), with its lease."""
    found: dict[bytes, int] = {}
    for name in GOAL_PREFIXES:
        kvs, _ = await snapshot(etcd, config.key(name) + b"/")
        for kv in kvs:
            key = bytes(kv.key)
            rest = key[len(config.key(name)) + 1 :].split(b"/")
            if goal_id.encode() in (rest[0], rest[-1]):  # goal-order/<o>/<id>; the others <id>[/...]
                found[key] = int(kv.lease)
    return found


async def run(client: MeshClient, goal_spec: planner_pb2.GoalSpec) -> list[planner_pb2.ExecuteGoalResponse]:
    return [e async for e in client.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal=goal_spec))]


async def test_a_finished_goal_is_bound_to_its_expiry_lease_then_gone_and_not_found(
    short_retention: Mesh, etcd_client: EtcdClient
) -> None:
    client, _, worker, config = short_retention
    running = await client.planner.SubmitGoal(planner_pb2.SubmitGoalRequest(goal=spec(2, "slow", "running")))
    running_id = running.goal.goal_id
    events = await run(client, spec(5))
    goal_id = events[-1].goal_id
    assert events[-1].type == planner_pb2.GOAL_EVENT_TYPE_GOAL_FINISHED

    # Readable right after it finished, every step and event there.
    got = (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=goal_id))).goal
    assert got.state == planner_pb2.GOAL_STATE_SUCCEEDED and len(got.steps) == 5
    keys = await goal_keys(etcd_client, config, goal_id)
    kinds = {k[len(config.prefix) + 1 :].split(b"/")[0] for k in keys}
    # The key table's promise: record, order key, steps and events kept, bound to one expiry lease;
    # no owner, active or cancel key left behind.
    assert kinds == {b"goals", b"goal-order", b"goal-steps", b"goal-events"}, keys
    assert sum(1 for k in keys if b"/goal-steps/" in k) == 5
    assert sum(1 for k in keys if b"/goal-events/" in k) == len(events)
    leases = set(keys.values())
    assert len(leases) == 1 and 0 not in leases, keys
    ttl = (await etcd_client.get_lease_info(leases.pop())).TTL
    assert 0 < ttl <= 3  # the period (2 s) plus a bucket (1 s)

    # The unfinished goal's keys carry no lease.
    assert all(
        lease == 0
        for k, lease in (await goal_keys(etcd_client, config, running_id)).items()
        if b"/goal-owner/" not in k
    )

    async def gone() -> bool:
        return not await goal_keys(etcd_client, config, goal_id)

    await eventually(gone, timeout=10, interval=0.2, what="every key of the finished goal deleted by etcd")
    for call in (
        lambda: client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=goal_id)),
        lambda: client.planner.CancelGoal(planner_pb2.CancelGoalRequest(goal_id=goal_id)),
    ):
        with pytest.raises(
            errors.NotFound,
            match=re.escape(
                f"goal '{goal_id}' not found: it never existed, or it finished more than 2 s ago (retention)"
            ),
        ):
            await call()
    with pytest.raises(errors.NotFound, match="retention"):
        async for _ in client.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal_id=goal_id)):
            pass
    listed = await client.planner.ListGoals(planner_pb2.ListGoalsRequest(page_size=50))
    assert [g.goal_id for g in listed.goals] == [running_id]

    # The unfinished goal outlived the period: still there, whole, running.
    still = (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=running_id))).goal
    assert still.state == planner_pb2.GOAL_STATE_RUNNING
    worker.release.set()


async def test_a_watcher_of_a_finishing_goal_sees_each_event_once(
    short_retention: Mesh, etcd_client: EtcdClient
) -> None:
    client, _, worker, _config = short_retention
    submitted = await client.planner.SubmitGoal(
        planner_pb2.SubmitGoalRequest(goal=spec(30, "slow", "watched"))
    )
    goal_id = submitted.goal.goal_id
    watched: list[planner_pb2.ExecuteGoalResponse] = []

    async def watch() -> None:
        async for event in client.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal_id=goal_id)):
            watched.append(event)

    task = asyncio.create_task(watch())
    await eventually(lambda: len(watched) >= 1, what="the watcher following the running goal")
    worker.release.set()  # the 30 steps end: the runner rebinds ~60 events, then finishes
    await asyncio.wait_for(task, 30)
    sequences = [e.sequence for e in watched]
    assert sequences == list(range(1, len(watched) + 1)), sequences
    assert watched[-1].type == planner_pb2.GOAL_EVENT_TYPE_GOAL_FINISHED
    assert sum(1 for e in watched if e.type == planner_pb2.GOAL_EVENT_TYPE_STEP_SUCCEEDED) == 30


async def test_a_goal_resumed_after_its_owner_died_while_finishing_is_unbound_then_finished_again(
    service: Callable[..., Awaitable[MeshServer]],
    mesh_config: MeshConfig,
    etcd_client: EtcdClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MABEAM_GOAL_RETENTION", "3s")
    async with open_mesh(service, mesh_config) as (client, first, worker, config):
        goal_id = (
            await client.planner.SubmitGoal(planner_pb2.SubmitGoalRequest(goal=spec(4, "slow", "resumed")))
        ).goal.goal_id
        store = GoalStore(etcd_client, config)
        await eventually(lambda: etcd_client.get(store.step_key(goal_id, "s3")), what="its steps running")
        owner = (await etcd_client.get(store.owner_key(goal_id))).value.decode()
        # The owner's half-finished end: its steps and events rebound to an expiry lease, then it dies.
        lease = int((await etcd_client.lease(3)).id)
        assert await store.rebind(owner, goal_id, lease)
        rebound = {k for k, v in (await goal_keys(etcd_client, config, goal_id)).items() if v == lease}
        assert any(b"/goal-events/" in k for k in rebound) and any(b"/goal-steps/" in k for k in rebound)
        await first.stop(0)
        second = await service("planner")
        other = await MeshClient.connect(planner=second.address)
        try:

            async def unbound() -> bool:
                keys = await goal_keys(etcd_client, config, goal_id)
                owned = any(b"/goal-owner/" in k for k in keys)
                return owned and all(v == 0 for k, v in keys.items() if b"/goal-owner/" not in k)

            await eventually(
                unbound, timeout=15, interval=0.1, what="the resumed goal's keys put without a lease"
            )

            async def lapsed() -> bool:
                return int((await etcd_client.get_lease_info(lease)).TTL) < 0

            # The lease the dead owner bound them to runs out while the goal runs: nothing goes with it.
            await eventually(lapsed, timeout=10, interval=0.2, what="the dead owner's expiry lease lapsed")
            after = await goal_keys(etcd_client, config, goal_id)
            assert rebound <= set(after), rebound - set(after)
            worker.release.set()
            events = [
                e async for e in other.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal_id=goal_id))
            ]
            assert events[-1].type == planner_pb2.GOAL_EVENT_TYPE_GOAL_FINISHED
            got = (await other.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=goal_id))).goal
            assert got.state == planner_pb2.GOAL_STATE_SUCCEEDED and got.resumed_count == 1
            keys = await goal_keys(etcd_client, config, goal_id)
            # Finished again: bound again, every key, to the new replica's expiry lease.
            assert len(set(keys.values())) == 1 and 0 not in keys.values(), keys
            assert sum(1 for k in keys if b"/goal-steps/" in k) == 4
        finally:
            await other.close()


async def test_the_count_cap_keeps_the_newest_finished_goals_and_every_unfinished_one(
    service: Callable[..., Awaitable[MeshServer]],
    mesh_config: MeshConfig,
    etcd_client: EtcdClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MABEAM_GOAL_RETENTION", "1h")
    monkeypatch.setenv("MABEAM_GOAL_RETENTION_COUNT", "3")
    monkeypatch.setattr(planner_server, "TRIM_INTERVAL_S", 0.3)
    monkeypatch.setattr(planner_store, "TRIM_BATCH", 2)  # several windows and passes
    async with open_mesh(service, mesh_config) as (client, _, worker, config):
        # The oldest goal of all is unfinished: at the very end of the newest-first index.
        oldest = (
            await client.planner.SubmitGoal(planner_pb2.SubmitGoalRequest(goal=spec(1, "slow", "oldest")))
        ).goal.goal_id
        finished = []
        for i in range(7):
            finished.append((await run(client, spec(3, name=f"f{i}")))[-1].goal_id)
            if i == 3:  # another unfinished one in the middle
                middle = (
                    await client.planner.SubmitGoal(
                        planner_pb2.SubmitGoalRequest(goal=spec(1, "slow", "middle"))
                    )
                ).goal.goal_id

        async def listed() -> list[str]:
            page = await client.planner.ListGoals(planner_pb2.ListGoalsRequest(page_size=50))
            return [g.goal_id for g in page.goals]

        # (The cap may already be at work while they finish.) The newest first: f6, f5, f4, middle.
        expected = [*reversed(finished[4:]), middle, oldest]
        await eventually(
            lambda: _equals(listed(), expected),
            timeout=15,
            interval=0.2,
            what="only the 3 newest finished left",
        )
        for goal_id in finished[:4]:
            assert not await goal_keys(etcd_client, config, goal_id)
            with pytest.raises(errors.NotFound, match="among the oldest beyond the 3 kept"):
                await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=goal_id))
        for goal_id in (*finished[4:], oldest, middle):
            assert await goal_keys(etcd_client, config, goal_id)
        # Past the cap nothing more goes: a later pass deletes nothing.
        assert await GoalStore(etcd_client, config).trim(3) == 0
        assert await listed() == expected
        worker.release.set()


async def _equals(got: Awaitable[list[str]], expected: list[str]) -> bool:
    return await got == expected


async def test_a_finish_whose_expiry_lease_etcd_lost_is_written_again_on_a_new_lease(
    service: Callable[..., Awaitable[MeshServer]],
    mesh_config: MeshConfig,
    etcd_client: EtcdClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MABEAM_GOAL_RETENTION", "1h")  # a bucket of 36 s: the next goal reuses the lease
    async with open_mesh(service, mesh_config) as (client, _, _, config):
        first = (await run(client, spec(3)))[-1].goal_id
        (lease,) = set((await goal_keys(etcd_client, config, first)).values())
        await etcd_client.revoke_lease(lease)  # etcd lost it (revoked, or a restore)
        events = await run(client, spec(3))
        goal_id = events[-1].goal_id
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        got = (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=goal_id))).goal
        assert got.state == planner_pb2.GOAL_STATE_SUCCEEDED
        keys = await goal_keys(etcd_client, config, goal_id)
        leases = set(keys.values())
        assert len(leases) == 1 and lease not in leases and 0 not in leases, keys
        assert sum(1 for k in keys if b"/goal-events/" in k) == len(events)
        assert int((await etcd_client.get_lease_info(leases.pop())).TTL) > 3_000
