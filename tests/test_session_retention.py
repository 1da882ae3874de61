"""Retention of finished sessions on a real etcd and a real coordination service.

A finished session is readable right after it finishes, then etcd deletes
every one of its keys (its lease runs out: nothing scans) and GetSession,
WatchSession say NOT_FOUND naming the retention; a running session is never
deleted; with a count cap one elected replica deletes the oldest finished
sessions beyond it, every key of each, and leaves running ones alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from harness.wait import eventually
from mabeam import errors
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient
from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient
from mabeam.runtime.retention import Retention
from mabeam.server import MeshServer
from mabeam.services.coordination import server as coordination_server
from mabeam.services.coordination import store as session_store
from mabeam.v1 import agent_pb2, common_pb2, coordination_pb2

pytestmark = pytest.mark.timeout(90)


class Bidder(Agent):
    """Bids its value, stays in an ascending auction up to it; ``hold`` keeps its answers back."""

    capabilities = ("retained",)

    def __init__(self, agent_id: str, value: float, hold: asyncio.Event | None = None) -> None:
        super().__init__(agent_id)
        self.value, self.hold = value, hold

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        if self.hold is not None:
            await self.hold.wait()
        reply = agent_pb2.CoordinationResponse()
        kind = request.WhichOneof("message")
        if kind == "bid_request":
            reply.bid.amount = self.value
        elif kind == "price_quote":
            reply.price_answer.accept = request.price_quote.price <= self.value
        else:
            reply.ack.SetInParent()
        return reply


Mesh = tuple[MeshClient, MeshServer, MeshServer]


@pytest.fixture
async def start_mesh(
    service: Callable[..., Awaitable[MeshServer]],
) -> AsyncIterator[Callable[[list[Agent]], Awaitable[Mesh]]]:
    """Registry and coordination in-process (the environment read at start), ``agents`` on a host."""
    hosts: list[AgentHost] = []
    clients: list[MeshClient] = []

    async def start(agents: list[Agent]) -> Mesh:
        registry = await service("registry")
        coordination = await service("coordination")
        host = AgentHost(agents, registry=registry.address)
        await host.start()
        hosts.append(host)
        client = await MeshClient.connect(registry=registry.address, coordination=coordination.address)
        clients.append(client)
        return client, registry, coordination

    yield start
    for client in clients:
        await client.close()
    for host in hosts:
        await host.stop()


def settings(*ids: str, session_id: str = "", deadline: float = 10.0) -> coordination_pb2.SessionSettings:
    s = coordination_pb2.SessionSettings(
        participants=common_pb2.AgentSelector(agent_ids=list(ids)), session_id=session_id
    )
    s.round_timeout.FromSeconds(int(deadline))
    s.deadline.FromSeconds(int(deadline))
    return s


def sealed_bid(session_id: str) -> coordination_pb2.RunAuctionRequest:
    return coordination_pb2.RunAuctionRequest(
        settings=settings("b10", "b20", session_id=session_id),
        type=coordination_pb2.AUCTION_TYPE_SECOND_PRICE,
        item="slot",
    )


def english(session_id: str, *ids: str, deadline: float = 10.0) -> coordination_pb2.RunAuctionRequest:
    return coordination_pb2.RunAuctionRequest(
        settings=settings(*ids, session_id=session_id, deadline=deadline),
        type=coordination_pb2.AUCTION_TYPE_ENGLISH,
        item="slot",
        start_price=1,
        increment=5,
        max_rounds=20,
    )


def session_prefixes(config: MeshConfig, session_id: str) -> list[bytes]:
    """Every prefix a session's keys are under (the key table of services/coordination/store.py)."""
    sid = session_id.encode()
    return [
        config.key("sessions") + b"/" + sid,
        config.key("session-rounds") + b"/" + sid + b"/",
        config.key("session-chunks") + b"/" + sid + b"/",
    ]


async def session_keys(etcd: EtcdClient, config: MeshConfig, session_id: str) -> dict[bytes, int]:
    """Every key of the session in etcd (its index key included), with the lease each is bound to."""
    found: dict[bytes, int] = {}
    for prefix in session_prefixes(config, session_id):
        for kv in await etcd.get_prefix(prefix):
            found[kv.key] = int(kv.lease)
    for kv in await etcd.get_prefix(config.key("session-index") + b"/"):
        if kv.key.endswith(b"/" + session_id.encode()):
            found[kv.key] = int(kv.lease)
    return found


async def get_session(client: MeshClient, session_id: str) -> coordination_pb2.Session:
    request = coordination_pb2.GetSessionRequest(
        session_id=session_id, view=coordination_pb2.SESSION_VIEW_FULL
    )
    return (await client.coordination.GetSession(request)).session


async def not_found(client: MeshClient, session_id: str) -> str:
    """GetSession's and WatchSession's NOT_FOUND message for ``session_id`` (they must agree)."""
    with pytest.raises(errors.NotFound) as got:
        await get_session(client, session_id)
    with pytest.raises(errors.NotFound) as watched:
        async for _ in client.coordination.WatchSession(
            coordination_pb2.WatchSessionRequest(session_id=session_id)
        ):
            pass
    assert watched.value.message == got.value.message
    assert got.value.reason_value == common_pb2.ERROR_REASON_SESSION_NOT_FOUND
    return got.value.message


async def test_finished_sessions_are_readable_then_etcd_deletes_them_and_get_names_the_retention(
    start_mesh: Callable[[list[Agent]], Awaitable[Mesh]],
    mesh_config: MeshConfig,
    etcd_client: EtcdClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    period, bucket = 2, 1
    monkeypatch.setenv("MABEAM_SESSION_RETENTION", f"{period}s")
    monkeypatch.delenv("MABEAM_SESSION_RETENTION_COUNT", raising=False)
    hold = asyncio.Event()
    client, _, _ = await start_mesh([Bidder("b10", 10), Bidder("b20", 20), Bidder("held", 5, hold)])
    # A session still running (its only bidder holds its answer back): claimed, never deleted.
    running = asyncio.ensure_future(client.coordination.RunAuction(english("running-1", "held", deadline=30)))

    async def claimed() -> bool:
        return bool(await session_keys(etcd_client, mesh_config, "running-1"))

    await eventually(claimed, timeout=10, interval=0.05, what="the running session claimed")
    one_shot = (await client.coordination.RunAuction(sealed_bid("sealed-1"))).session
    assert one_shot.state == coordination_pb2.SESSION_STATE_DECIDED
    iterative = (await client.coordination.RunAuction(english("english-1", "b10", "b20"))).session
    assert iterative.state == coordination_pb2.SESSION_STATE_DECIDED and iterative.round_count > 2

    # Readable right after it finished, transcript and all.
    assert len((await get_session(client, "sealed-1")).rounds) == 1
    assert len((await get_session(client, "english-1")).rounds) == iterative.round_count
    # A one-shot session is written once, at its end: every key on the expiry lease (TTL period +
    # bucket). An iterative one: its record, index key and end marker too; its rounds, written as
    # they ended, on the running lease (+ a session's longest life, 660 s).
    sealed = await session_keys(etcd_client, mesh_config, "sealed-1")
    assert len(sealed) == 5, sealed  # record, index key, end marker, the round's manifest and chunk
    rounds_prefix = mesh_config.key("session-rounds", "english-1") + b"/"
    chunks_prefix = mesh_config.key("session-chunks", "english-1") + b"/"
    english_keys = await session_keys(etcd_client, mesh_config, "english-1")
    for key, lease in [*sealed.items(), *english_keys.items()]:
        assert lease, f"{key!r} is bound to no lease: it would be kept for good"
        ttl = (await etcd_client.get_lease_info(lease)).TTL
        transcript = key.startswith((rounds_prefix, chunks_prefix)) and not key.endswith(b"~end")
        most = period + bucket + (session_store.RUNNING_EXTRA_S if transcript else 0)
        assert 0 < ttl <= most, (key, ttl)
        if transcript:
            assert ttl > 600, (key, ttl)  # kept at least the period after the session's longest life

    async def finished_gone() -> bool:
        left = await session_keys(etcd_client, mesh_config, "sealed-1")
        left.update(await session_keys(etcd_client, mesh_config, "english-1"))
        return not [
            k for k in left if not k.startswith((rounds_prefix, chunks_prefix)) or k.endswith(b"~end")
        ]

    # Gone within the period, a bucket and etcd's expiry tick.
    await eventually(
        finished_gone, timeout=period + bucket + 6, interval=0.2, what="finished sessions deleted"
    )
    assert not await session_keys(etcd_client, mesh_config, "sealed-1")  # every key, the chunks too
    for sid in ("sealed-1", "english-1"):
        message = await not_found(client, sid)
        assert message == (
            f"session {sid!r} not found: it never existed, or it finished more than 2 s ago (retention)"
        )
    listed = await client.coordination.ListSessions(coordination_pb2.ListSessionsRequest(page_size=100))
    assert [s.session_id for s in listed.sessions] == ["running-1"]
    # The running session outlived the finished ones' retention; it finishes, then goes too.
    assert (await get_session(client, "running-1")).state == coordination_pb2.SESSION_STATE_RUNNING
    hold.set()
    assert (await running).session.state == coordination_pb2.SESSION_STATE_DECIDED
    assert (await get_session(client, "running-1")).state == coordination_pb2.SESSION_STATE_DECIDED

    async def running_gone() -> bool:
        with contextlib.suppress(errors.NotFound):
            await get_session(client, "running-1")
            return False
        return True

    await eventually(running_gone, timeout=period + bucket + 6, interval=0.2, what="the last one expired")


async def test_an_iterative_sessions_rounds_go_when_the_running_lease_runs_out(
    start_mesh: Callable[[list[Agent]], Awaitable[Mesh]],
    mesh_config: MeshConfig,
    etcd_client: EtcdClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    period, bucket, extra = 2, 1, 3
    monkeypatch.setenv("MABEAM_SESSION_RETENTION", f"{period}s")
    # The running lease outlives the expiry lease by a session's longest life (660 s), shortened
    # here so that the rounds are seen going: every key of the session, children included.
    monkeypatch.setattr(session_store, "RUNNING_EXTRA_S", extra)
    client, _, _ = await start_mesh([Bidder("b10", 10), Bidder("b20", 20)])
    iterative = (await client.coordination.RunAuction(english("english-1", "b10", "b20"))).session
    assert iterative.round_count > 2
    keys = await session_keys(etcd_client, mesh_config, "english-1")
    assert len(keys) >= 3 + 2 * iterative.round_count, keys  # a manifest and a chunk per round

    async def all_gone() -> bool:
        return not await session_keys(etcd_client, mesh_config, "english-1")

    await eventually(all_gone, timeout=period + bucket + extra + 6, interval=0.2, what="every key deleted")
    assert "finished more than 2 s ago" in await not_found(client, "english-1")


async def test_a_count_cap_keeps_the_newest_finished_sessions_and_never_a_running_one(
    start_mesh: Callable[[list[Agent]], Awaitable[Mesh]],
    mesh_config: MeshConfig,
    etcd_client: EtcdClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cap, beyond = 3, 4
    monkeypatch.setenv("MABEAM_SESSION_RETENTION", "0")  # no period: the cap alone
    monkeypatch.setenv("MABEAM_SESSION_RETENTION_COUNT", str(cap))
    monkeypatch.setattr(coordination_server, "PRUNE_INTERVAL_S", 0.2)
    hold = asyncio.Event()
    client, _, _ = await start_mesh([Bidder("b10", 10), Bidder("b20", 20), Bidder("held", 5, hold)])
    running = asyncio.ensure_future(client.coordination.RunAuction(english("running-1", "held", deadline=30)))

    async def claimed() -> bool:
        return bool(await session_keys(etcd_client, mesh_config, "running-1"))

    await eventually(claimed, timeout=10, interval=0.05, what="the running session claimed")
    ids = [f"sealed-{n}" for n in range(cap + beyond)] + ["english-last"]
    for sid in ids[:-1]:
        await client.coordination.RunAuction(sealed_bid(sid))
    await client.coordination.RunAuction(english(ids[-1], "b10", "b20"))
    newest = ids[-cap:]

    async def listed() -> list[str]:
        page = await client.coordination.ListSessions(coordination_pb2.ListSessionsRequest(page_size=100))
        return [s.session_id for s in page.sessions]

    async def capped() -> bool:
        return await listed() == [*reversed(newest), "running-1"]

    # The newest `cap` finished sessions, and the running one (older than all of them) besides.
    await eventually(capped, timeout=15, interval=0.1, what=f"the {cap} newest finished sessions left")
    for sid in ids[:-cap]:
        assert not await session_keys(etcd_client, mesh_config, sid), sid  # every key, children included
        message = await not_found(client, sid)
        assert re.search(r"it was among the oldest beyond the 3 kept \(retention\)$", message), message
    for sid in newest:
        assert len((await get_session(client, sid)).rounds) >= 1
    assert (await get_session(client, "running-1")).state == coordination_pb2.SESSION_STATE_RUNNING
    # Once it finishes it is the oldest finished one beyond the cap: it goes, the newest stay.
    hold.set()
    assert (await running).session.state == coordination_pb2.SESSION_STATE_DECIDED

    async def running_pruned() -> bool:
        return await listed() == list(reversed(newest))

    await eventually(
        running_pruned, timeout=15, interval=0.1, what="the finished session beyond the cap deleted"
    )
    assert not await session_keys(etcd_client, mesh_config, "running-1")


async def test_the_key_table_names_every_session_key_and_its_lease(
    start_mesh: Callable[[list[Agent]], Awaitable[Mesh]],
    mesh_config: MeshConfig,
    etcd_client: EtcdClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store's docstring table lists every key a session writes; its lease column holds."""
    monkeypatch.setenv("MABEAM_SESSION_RETENTION", "1h")
    client, _, _ = await start_mesh([Bidder("b10", 10), Bidder("b20", 20)])
    await client.coordination.RunAuction(sealed_bid("sealed-1"))
    await client.coordination.RunAuction(english("english-1", "b10", "b20"))
    doc = session_store.__doc__ or ""
    rows = re.findall(r"^P/(\S+)\s", doc, re.MULTILINE)
    patterns = [re.compile(re.sub(r"<[^>]+>", "[^/]+", row)) for row in rows]
    prefix = mesh_config.key("")
    seen = 0
    for kv in await etcd_client.get_prefix(prefix + b"session"):
        rest = kv.key[len(prefix) :].decode()
        assert any(p.fullmatch(rest) for p in patterns), f"{rest} is not in the store's key table"
        seen += 1
        if rest.startswith(("sessions/", "session-index/", "session-rounds/", "session-chunks/")):
            assert int(kv.lease), f"{rest}: the table says it is on a lease (R or E)"
    assert seen >= 8
    # A period of an hour: the finishing lease's TTL is the period plus a bucket (36 s).
    record = await etcd_client.get_prefix(mesh_config.key("sessions") + b"/sealed-1")
    ttl = (await etcd_client.get_lease_info(int(record[0].lease))).TTL
    assert 3_600 < ttl <= 3_636


async def test_a_lease_etcd_lost_is_replaced_and_the_session_is_written_whole(
    start_mesh: Callable[[list[Agent]], Awaitable[Mesh]],
    mesh_config: MeshConfig,
    etcd_client: EtcdClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bucket's lease revoked behind the service's back (etcd restored, an operator): the next
    write fails on it, takes a new lease and writes the session again, whole."""
    monkeypatch.setenv("MABEAM_SESSION_RETENTION", "1h")  # a bucket of 36 s: the same lease again
    client, _, _ = await start_mesh([Bidder("b10", 10), Bidder("b20", 20)])
    await client.coordination.RunAuction(english("english-1", "b10", "b20"))
    first = await session_keys(etcd_client, mesh_config, "english-1")
    finishing = first[mesh_config.key("sessions", "english-1")]
    running = {lease for lease in first.values() if lease != finishing}
    assert len(running) == 1  # the rounds' (and the claim's) running lease
    for lease in (finishing, *running):
        await etcd_client.revoke_lease(lease)
    assert not await session_keys(etcd_client, mesh_config, "english-1")  # gone with its leases
    again = (await client.coordination.RunAuction(english("english-2", "b10", "b20"))).session
    sealed = (await client.coordination.RunAuction(sealed_bid("sealed-2"))).session
    got = await get_session(client, "english-2")
    assert len(got.rounds) == again.round_count > 2
    assert len((await get_session(client, "sealed-2")).rounds) == sealed.round_count == 1
    for sid in ("english-2", "sealed-2"):
        for key, lease in (await session_keys(etcd_client, mesh_config, sid)).items():
            assert lease not in (finishing, *running), key
            assert (await etcd_client.get_lease_info(lease)).TTL > 3_600, key


class Counting(session_store.SessionStore):
    """A store counting its range reads (the keys each returned) and its count-only ranges."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[int] = []
        self.counts = 0

    async def _range(self, start: bytes, end: bytes, limit: int = 0, **kw: Any) -> Any:
        assert limit, "an unbounded range read"
        reply = await super()._range(start, end, limit, **kw)
        self.reads.append(len(reply.kvs))
        return reply

    async def count_indexed(self, start: bytes | None = None, end: bytes | None = None) -> int:
        self.counts += 1
        return await super().count_indexed(start, end)


async def test_the_pruner_finds_the_oldest_with_bounded_reads_and_keeps_the_newest(
    etcd_client: EtcdClient, key_prefix: bytes
) -> None:
    """300 sessions (some started in the same nanosecond, spread over days): each tick examines at
    most 100, reads at most 4 x 100 + 1 keys a range, and the 50 newest are left."""
    config = MeshConfig(prefix=key_prefix.decode().rstrip("/"))
    store = Counting(etcd_client, config, retention=Retention("session", 0, 1))
    base = time.time_ns() - 10 * 86_400 * 10**9
    started: dict[str, int] = {}
    for n in range(300):
        at = base + (n // 3) * 7_919_000_000 + (n % 3 == 2) * 1  # pairs share a nanosecond
        session = coordination_pb2.Session(
            session_id=f"s{n:03d}", protocol="vickrey", state=coordination_pb2.SESSION_STATE_DECIDED
        )
        session.started_at.FromNanoseconds(at)
        started[session.session_id] = at
        await store.finish(session, [])
    running = coordination_pb2.Session(
        session_id="old-running", protocol="english", state=coordination_pb2.SESSION_STATE_RUNNING
    )
    running.started_at.FromNanoseconds(base - 1)
    assert await store.create(running)
    ticks = []
    while True:
        store.reads.clear()
        store.counts = 0
        deleted = await store.prune_oldest(50)
        if not deleted:
            break
        ticks.append(deleted)
        print(
            f"\npruner tick: {deleted} deleted, {len(store.reads)} range reads (most keys {max(store.reads)}), {store.counts} count-only"
        )
        assert max(store.reads) <= 4 * 100 + 1 and store.counts < 150, (store.reads, store.counts)
    assert ticks == [99, 99, 52], ticks  # the running one is the oldest: examined each tick, kept
    page, _ = await store.list_page(size=100, after=None)
    newest = sorted(started, key=lambda s: (-started[s], s))[:50]
    assert [s.session_id for s in page] == [*newest, "old-running"]
    assert await store.count_indexed() == 51
