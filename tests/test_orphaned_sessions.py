"""No orphaned sessions: a session whose coordination replica dies is ended by another one.

Real etcd, real services (two coordination replicas as processes for the
kill), real agents. See services/coordination/orphans.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from harness.wait import eventually
from mabeam import errors
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient
from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient, connect, snapshot
from mabeam.runtime.mesh import LocalMesh
from mabeam.server import MeshServer
from mabeam.services.coordination.engine import now_ts
from mabeam.services.coordination.store import SessionStore
from mabeam.v1 import agent_pb2, common_pb2, coordination_pb2

pytestmark = pytest.mark.timeout(120)

TTL = 2  # the coordination replicas' lease (MABEAM_SERVICE_TTL)
ABANDONED = coordination_pb2.SESSION_STATE_ABANDONED


class SlowBidder(Agent):
    """Stays in an English auction up to ``value``, answering each quote after ``delay`` seconds."""

    capabilities = ("bid",)

    def __init__(self, agent_id: str, value: float, delay: float) -> None:
        super().__init__(agent_id)
        self.value, self.delay = value, delay

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        await asyncio.sleep(self.delay)
        reply = agent_pb2.CoordinationResponse()
        if request.HasField("price_quote"):
            reply.price_answer.accept = request.price_quote.price <= self.value
        elif request.HasField("bid_request"):
            reply.bid.amount = self.value
        else:
            reply.ack.SetInParent()
        return reply


def english(session_id: str, deadline_s: float = 60.0) -> coordination_pb2.RunAuctionRequest:
    settings = coordination_pb2.SessionSettings(
        participants=common_pb2.AgentSelector(agent_ids=["b1", "b2"]), session_id=session_id
    )
    settings.deadline.FromNanoseconds(int(deadline_s * 1e9))
    settings.round_timeout.FromNanoseconds(2_000_000_000)
    return coordination_pb2.RunAuctionRequest(
        settings=settings,
        type=coordination_pb2.AUCTION_TYPE_ENGLISH,
        item="lamp",
        start_price=0,
        increment=1,
        max_rounds=100,
    )


async def in_flight_keys(client: EtcdClient, config: MeshConfig) -> list[bytes]:
    """Every key under ``session-owner/`` and ``session-running/`` of the mesh."""
    found: list[bytes] = []
    for name in ("session-owner", "session-running"):
        kvs, _ = await snapshot(client, config.key(name) + b"/")
        found += [bytes(kv.key) for kv in kvs]
    return found


@pytest.fixture
async def etcd_client(mesh_config: MeshConfig) -> AsyncIterator[EtcdClient]:
    client = await connect(mesh_config.etcd_endpoints)
    yield client
    await client.close()


async def test_killing_the_replica_mid_english_auction_ends_the_session_for_its_watchers(
    local_mesh: Callable[..., Awaitable[LocalMesh]], mesh_config: MeshConfig, etcd_client: EtcdClient
) -> None:
    mesh = await local_mesh(
        services=("registry", "coordination"), replicas=2, extra_env={"MABEAM_SERVICE_TTL": str(TTL)}
    )
    victim, survivor = mesh.replicas_of("coordination")
    host = AgentHost(
        [SlowBidder("b1", 1000, 0.2), SlowBidder("b2", 1000, 0.2)], registry=mesh.address("registry")
    )
    await host.start()
    runner = await MeshClient.connect(registry=mesh.address("registry"), coordination=victim.address)
    other = await MeshClient.connect(registry=mesh.address("registry"), coordination=survivor.address)
    run = asyncio.create_task(runner.coordination.RunAuction(english("orphan-1"), timeout=90))
    events: list[coordination_pb2.WatchSessionResponse] = []
    watched = asyncio.Event()

    async def watch() -> None:
        async for event in other.coordination.WatchSession(
            coordination_pb2.WatchSessionRequest(session_id="orphan-1"), timeout=90
        ):
            events.append(event)
        watched.set()

    async def watching() -> bool:
        try:
            await other.coordination.GetSession(coordination_pb2.GetSessionRequest(session_id="orphan-1"))
        except errors.NotFound:
            return False
        return True

    watcher: asyncio.Task[None] | None = None
    try:
        await eventually(watching, timeout=20, what="the session's record")
        watcher = asyncio.create_task(watch())
        # Mid-flight: rounds streamed, the auction far from its end (2 bidders at 1000, step 1).
        await eventually(lambda: len(events) >= 3, timeout=20, what="three rounds watched")
        assert not watched.is_set()
        owner = mesh_config.key("session-owner") + b"/orphan-1"
        held = await etcd_client.get(owner)
        assert held is not None and f"-{victim.pid}-" in bytes(held.value).decode()

        victim.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.proc.wait)
        killed_at = time.monotonic()
        await asyncio.wait_for(watched.wait(), timeout=TTL + 10)
        ended_after = time.monotonic() - killed_at
        print(f"\norphaned English auction ended {ended_after:.2f} s after the kill (lease TTL {TTL} s)")

        last = events[-1]
        assert last.type == coordination_pb2.SESSION_EVENT_TYPE_FINISHED
        assert last.session.state == ABANDONED, last.session
        assert f"-{victim.pid}-" in last.session.outcome.reason
        assert "stopped while the session ran" in last.session.outcome.reason
        got = (
            await other.coordination.GetSession(
                coordination_pb2.GetSessionRequest(
                    session_id="orphan-1", view=coordination_pb2.SESSION_VIEW_BASIC
                )
            )
        ).session
        assert got.state == ABANDONED and got.outcome.reason == last.session.outcome.reason
        assert got.HasField("finished_at") and not got.outcome.decided
        rounds = [e for e in events if e.type == coordination_pb2.SESSION_EVENT_TYPE_ROUND]
        assert got.round_count >= len(rounds) >= 3
        # A generous bound for a loaded machine; the promise is TTL + 1 s (the figure is printed).
        assert ended_after <= TTL + 5, f"ended {ended_after:.2f} s after the kill"
        # Nothing is left marked in flight (the watcher's end comes before the keys' deletion).
        await eventually(lambda: _none_left(etcd_client, mesh_config), timeout=5, what="no in-flight key")
        with contextlib.suppress(errors.MabeamError):
            await run  # the caller of the dead replica: cut off (UNAVAILABLE)
    finally:
        run.cancel()
        if watcher is not None:
            watcher.cancel()
        await asyncio.gather(run, *([watcher] if watcher else []), return_exceptions=True)
        await runner.close()
        await other.close()
        await host.stop()


async def test_a_session_that_finishes_leaves_no_in_flight_key(
    service: Callable[..., Awaitable[MeshServer]], mesh_config: MeshConfig, etcd_client: EtcdClient
) -> None:
    registry = await service("registry")
    coordination = await service("coordination")
    host = AgentHost([SlowBidder("b1", 3, 0.05), SlowBidder("b2", 6, 0.05)], registry=registry.address)
    await host.start()
    client = await MeshClient.connect(registry=registry.address, coordination=coordination.address)
    try:
        run = asyncio.create_task(client.coordination.RunAuction(english("done-1", 30)))
        # While it runs, it is marked in flight on this replica.
        owner = mesh_config.key("session-owner") + b"/done-1"
        held = await eventually(lambda: etcd_client.get(owner), timeout=10, what="the owner key")
        assert bytes(held.value).decode() == coordination.instance_id
        assert await etcd_client.get(mesh_config.key("session-running") + b"/done-1") is not None
        session = (await run).session
        assert session.state == coordination_pb2.SESSION_STATE_DECIDED
        assert list(session.outcome.winners) == ["b2"]
        # A one-shot session with an explicit id (claimed up front) too.
        sealed = english("done-2", 30)
        sealed.type = coordination_pb2.AUCTION_TYPE_FIRST_PRICE
        assert (await client.coordination.RunAuction(sealed)).session.state == (
            coordination_pb2.SESSION_STATE_DECIDED
        )
        assert await in_flight_keys(etcd_client, mesh_config) == []
    finally:
        await client.close()
        await host.stop()


async def test_a_replica_whose_session_was_taken_over_records_nothing(
    service: Callable[..., Awaitable[MeshServer]], mesh_config: MeshConfig, etcd_client: EtcdClient
) -> None:
    """A replica that lost its session to another (its lease lapsed while it ran, another replica
    ended the session) does not overwrite what that replica wrote: its call answers ABORTED."""
    registry = await service("registry")
    coordination = await service("coordination")
    host = AgentHost([SlowBidder("b1", 3, 0.2), SlowBidder("b2", 6, 0.2)], registry=registry.address)
    await host.start()
    client = await MeshClient.connect(registry=registry.address, coordination=coordination.address)
    try:
        run = asyncio.create_task(client.coordination.RunAuction(english("taken-1", 30)))
        owner = mesh_config.key("session-owner") + b"/taken-1"
        await eventually(lambda: etcd_client.get(owner), timeout=10, what="the owner key")
        # What another replica's claim leaves: the owner key names it (on a lease of its own).
        lease = await etcd_client.lease(30)
        await etcd_client.put(owner, b"another-replica", lease=lease.id)
        with pytest.raises(errors.Aborted, match="ended by another coordination replica"):
            await run
        record = await etcd_client.get(mesh_config.key("sessions") + b"/taken-1")
        assert record is not None
        assert (
            coordination_pb2.Session.FromString(record.value).state == coordination_pb2.SESSION_STATE_RUNNING
        )
        await lease.revoke()
    finally:
        await client.close()
        await host.stop()


async def test_a_replica_starting_ends_sessions_left_running_without_an_owner(
    service: Callable[..., Awaitable[MeshServer]], mesh_config: MeshConfig, etcd_client: EtcdClient
) -> None:
    """The whole-cluster restart: nobody saw the owner key go; a replica starting finds the orphan."""
    store = SessionStore(etcd_client, mesh_config)
    session = coordination_pb2.Session(
        session_id="left-1",
        protocol="dutch",
        state=coordination_pb2.SESSION_STATE_RUNNING,
        participants=["b1"],
        started_at=now_ts(),
        coordinator_id="coordination-gone-1",
    )
    keeper = store.owner_lease_keeper(TTL)
    await keeper.start()
    assert await store.create(session, owner="coordination-gone-1", owner_lease=keeper.lease_id)
    await keeper.revoke()  # the replica is gone, with its lease (and the owner key)
    assert await etcd_client.get(store.owner_key("left-1")) is None
    # A finished session whose replica died before deleting its running key: the key only goes.
    done = coordination_pb2.Session()
    done.CopyFrom(session)
    done.session_id = "done-left"
    keeper = store.owner_lease_keeper(TTL)
    await keeper.start()
    assert await store.create(done, owner="coordination-gone-1", owner_lease=keeper.lease_id)
    done.state = coordination_pb2.SESSION_STATE_DECIDED
    done.outcome.decided = True
    await store.finish(done, [])
    await keeper.revoke()

    await service("registry")
    coordination = await service("coordination")
    client = await MeshClient.connect(coordination=coordination.address)
    try:

        async def ended() -> coordination_pb2.Session | None:
            got = await client.coordination.GetSession(
                coordination_pb2.GetSessionRequest(session_id="left-1")
            )
            return got.session if got.session.state != coordination_pb2.SESSION_STATE_RUNNING else None

        got = await eventually(ended, timeout=10, what="the orphan ended")
        assert got.state == ABANDONED and "'coordination-gone-1'" in got.outcome.reason
        kept = (
            await client.coordination.GetSession(coordination_pb2.GetSessionRequest(session_id="done-left"))
        ).session
        assert kept.state == coordination_pb2.SESSION_STATE_DECIDED and kept.outcome.decided
        await eventually(
            lambda: _none_left(etcd_client, mesh_config), timeout=10, what="no in-flight key left"
        )
        # The end marker is there: a watcher of the ended session gets its end at once.
        events = [
            e
            async for e in client.coordination.WatchSession(
                coordination_pb2.WatchSessionRequest(session_id="left-1"), timeout=10
            )
        ]
        assert events[-1].type == coordination_pb2.SESSION_EVENT_TYPE_FINISHED
        assert events[-1].session.state == ABANDONED
    finally:
        await client.close()


async def _none_left(client: EtcdClient, config: MeshConfig) -> bool:
    return await in_flight_keys(client, config) == []
