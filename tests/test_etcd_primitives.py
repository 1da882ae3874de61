"""The etcd client and the primitives the SDK adds to aetcd, against a real etcd (restarts included)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path

import aetcd.exceptions
import pytest

from harness.certs import make_certs
from harness.ports import closed_port
from harness.wait import eventually
from mabeam.runtime.cache import PrefixCache
from mabeam.runtime.embedded_etcd import EmbeddedEtcd
from mabeam.runtime.etcd import (
    UNREACHABLE,
    ClientClosedError,
    Election,
    ElectionLost,
    EtcdClient,
    LeaseKeeper,
    ResumingWatch,
    WatchCompacted,
    WatchEvent,
    connect,
    grpc_target,
    release,
    snapshot,
    snapshot_and_watch,
    try_acquire,
)
from mabeam.tls import TLS

pytestmark = pytest.mark.timeout(60)


def _our_tasks(*prefixes: str) -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(prefixes) and not t.done()]


async def _put_retrying(client: EtcdClient, key: bytes, value: bytes, within: float = 10.0) -> None:
    async def put() -> bool:
        try:
            await client.put(key, value)
        except UNREACHABLE:
            return False
        return True

    await eventually(put, timeout=within, interval=0.1, what="etcd back: a put goes through")


async def _watch_created(watch: ResumingWatch) -> None:
    """Until etcd confirmed the watch (one started without a revision learns it from etcd's answer)."""
    await eventually(lambda: watch.next_revision is not None, what="the watch created")


async def _candidate_in_place(client: EtcdClient, name: bytes, who: str) -> None:
    """Until ``who``'s candidate key is in etcd: it waits in line for the lead."""

    async def there() -> bool:
        kvs, _ = await snapshot(client, name + b"/")
        return who.encode() in {bytes(kv.value) for kv in kvs}

    await eventually(there, what=f"{who} campaigning")


# -- the client -------------------------------------------------------------------------


def test_grpc_target_for_one_and_several_endpoints() -> None:
    assert grpc_target(["http://127.0.0.1:2379"]) == ("127.0.0.1:2379", False)
    assert grpc_target(["https://etcd-0:2379"]) == ("etcd-0:2379", True)
    assert grpc_target(["127.0.0.1:2379", "http://127.0.0.1:2479"]) == (
        "ipv4:127.0.0.1:2379,127.0.0.1:2479",
        False,
    )
    assert grpc_target(["http://[::1]:2379", "http://[::1]:2479"]) == ("ipv6:[::1]:2379,[::1]:2479", False)
    for bad in ([], ["http://127.0.0.1"], ["unix:///tmp/etcd.sock"], ["http://a:1", "https://b:2"]):
        with pytest.raises(ValueError):
            grpc_target(bad)


async def test_endpoints_by_name_are_resolved(etcd: EmbeddedEtcd, key_prefix: bytes) -> None:
    dead = closed_port("localhost")
    client = await connect([f"http://localhost:{dead}", f"http://localhost:{etcd.client_port}"], timeout=5)
    try:
        await client.put(key_prefix + b"k", b"v")  # the dead first endpoint is skipped
        got = await client.get(key_prefix + b"k")
        assert got is not None and got.value == b"v"
    finally:
        await client.close()


async def test_unreachable_etcd_is_a_connection_failure_and_closed_is_final() -> None:
    client = await connect([f"http://127.0.0.1:{closed_port()}"])
    with pytest.raises(aetcd.exceptions.ConnectionFailedError):
        await client.get(b"k")
    await client.close()
    await client.close()  # safe twice
    assert client.closed
    with pytest.raises(ClientClosedError):
        await client.get(b"k")


async def test_tls_and_client_certificates(tmp_path: Path) -> None:
    pem = make_certs(tmp_path)
    server = EmbeddedEtcd(
        unsafe_no_fsync=True,
        cert_file=pem["server"],
        key_file=pem["server-key"],
        trusted_ca_file=pem["ca"],
    )
    async with server:
        assert server.endpoint.startswith("https://")
        mtls = TLS(ca_file=pem["ca"], cert_file=pem["client"], key_file=pem["client-key"])
        # Several endpoints (the first one dead): TLS still checks the certificate.
        dead = f"https://127.0.0.1:{closed_port()}"
        for endpoints in ([server.endpoint], [dead, server.endpoint]):
            client = await connect(endpoints, tls=mtls, timeout=5)
            await client.put(b"/tls", b"yes")
            got = await client.get(b"/tls")
            assert got is not None and got.value == b"yes"
            await client.close()
        # Without a client certificate, or trusting another CA, etcd cannot be used.
        for tls in (TLS(ca_file=pem["ca"]), TLS(ca_file=pem["client"])):
            client = await connect([server.endpoint], tls=tls, timeout=5)
            with pytest.raises(UNREACHABLE):
                await client.get(b"/tls")
            await client.close()
    with pytest.raises(ValueError):
        TLS(cert_file=pem["client"]).channel_credentials()


# -- LeaseKeeper ----------------------------------------------------------------------


async def test_lease_keeper_keeps_a_short_lease_alive(etcd_client: EtcdClient, key_prefix: bytes) -> None:
    keeper = LeaseKeeper(etcd_client, ttl=1)
    await keeper.start()
    assert keeper.granted_ttl == 2  # etcd 3.5 grants at least 2 s with its default timings
    await etcd_client.put(key_prefix + b"owned", b"x", lease=keeper.lease_id)
    assert await etcd_client.get(key_prefix + b"owned") is not None
    await asyncio.sleep(3 * keeper.granted_ttl + 0.5)  # time is what is tested: three TTLs pass
    assert await etcd_client.get(key_prefix + b"owned") is not None
    assert not keeper.lost.is_set()
    await keeper.revoke()
    assert keeper.lost.is_set()
    assert await etcd_client.get(key_prefix + b"owned") is None
    await keeper.stop()
    await keeper.revoke()  # safe twice
    assert not _our_tasks(f"lease-keeper-{keeper.lease_id:x}")


async def test_lease_keeper_reports_a_lease_revoked_elsewhere(etcd_client: EtcdClient) -> None:
    calls: list[int] = []
    keeper = LeaseKeeper(etcd_client, ttl=1, on_lost=lambda: calls.append(1))
    async with keeper:
        await etcd_client.revoke_lease(keeper.lease_id)  # someone else revokes it
        assert await etcd_client.keepalive_once(keeper.lease_id) == 0  # etcd says "unknown lease"
        revoked = time.monotonic()
        await asyncio.wait_for(keeper.wait_lost(), 3)
        # Told by etcd at the next refresh, not guessed at the end of the TTL.
        assert time.monotonic() - revoked < keeper.granted_ttl / 2
        await eventually(lambda: calls, what="on_lost called")
        assert calls == [1]
    assert not _our_tasks(f"lease-keeper-{keeper.lease_id:x}")


async def test_a_lease_keeper_is_started_once(etcd_client: EtcdClient) -> None:
    with pytest.raises(ValueError):
        LeaseKeeper(etcd_client, ttl=0)
    async with LeaseKeeper(etcd_client, ttl=5) as keeper:
        with pytest.raises(RuntimeError):
            await keeper.start()


@pytest.mark.slow
async def test_lease_lost_when_etcd_is_down_longer_than_the_ttl(private_etcd: EmbeddedEtcd) -> None:
    client = await connect([private_etcd.endpoint], timeout=2)
    lost_at: list[float] = []
    keeper = LeaseKeeper(client, ttl=3, on_lost=lambda: lost_at.append(time.monotonic()))
    try:
        await keeper.start()
        await client.put(b"/owned", b"x", lease=keeper.lease_id)
        await private_etcd.stop()
        stopped = time.monotonic()
        # Declared lost by the TTL, while etcd is still down: the owner stops acting in time.
        await asyncio.wait_for(keeper.wait_lost(), keeper.granted_ttl + 2)
        assert len(lost_at) == 1
        assert lost_at[0] - stopped <= keeper.granted_ttl
        await private_etcd.restart()

        # etcd renews every lease on restart (a whole TTL more); the keeper
        # revokes the abandoned one once etcd answers, so its keys go sooner.
        async def gone() -> bool:
            try:
                return await client.get(b"/owned") is None
            except UNREACHABLE:
                return False

        await eventually(gone, timeout=keeper.granted_ttl - 1, what="the abandoned lease's key gone")
    finally:
        await keeper.stop()
        await client.close()


# -- ResumingWatch --------------------------------------------------------------------


async def test_snapshot_and_watch_sees_puts_and_deletes_after_the_listing(
    etcd_client: EtcdClient, key_prefix: bytes
) -> None:
    await etcd_client.put(key_prefix + b"a", b"1")
    await etcd_client.put(key_prefix + b"b", b"2")
    await etcd_client.put(key_prefix[:-1] + b"x", b"outside")  # shares the text, not the prefix
    kvs, revision, watch = await snapshot_and_watch(etcd_client, key_prefix)
    assert [(kv.key, kv.value) for kv in kvs] == [(key_prefix + b"a", b"1"), (key_prefix + b"b", b"2")]
    assert watch.next_revision == revision + 1
    lease = await etcd_client.lease(5)
    await etcd_client.put(key_prefix + b"a", b"3", lease=lease.id)
    await etcd_client.delete(key_prefix + b"b")
    async with watch:
        first = await asyncio.wait_for(anext(watch), 5)
        second = await asyncio.wait_for(anext(watch), 5)
    assert first == WatchEvent(
        kind="PUT",
        key=key_prefix + b"a",
        value=b"3",
        mod_revision=revision + 1,
        create_revision=kvs[0].create_revision,
        version=2,
        lease=lease.id,
    )
    assert (second.kind, second.key, second.mod_revision) == ("DELETE", key_prefix + b"b", revision + 2)
    with pytest.raises(StopAsyncIteration):
        await anext(watch)  # closed
    await lease.revoke()


async def test_a_single_key_watch_ignores_longer_keys(etcd_client: EtcdClient, key_prefix: bytes) -> None:
    _, revision = await snapshot(etcd_client, key_prefix)
    await etcd_client.put(key_prefix + b"ab", b"longer")
    await etcd_client.put(key_prefix + b"a", b"exact")
    async with ResumingWatch(etcd_client, key_prefix + b"a", revision + 1, single_key=True) as watch:
        event = await asyncio.wait_for(anext(watch), 5)
    assert (event.key, event.value) == (key_prefix + b"a", b"exact")


async def test_a_compacted_revision_raises_watch_compacted(private_etcd: EmbeddedEtcd) -> None:
    client = await connect([private_etcd.endpoint])
    try:
        first = await client.put(b"/w/k", b"0")
        for i in range(1, 5):
            last = await client.put(b"/w/k", str(i).encode())
        await client.compact(last.header.revision)
        watch = ResumingWatch(client, b"/w/", start_revision=first.header.revision)
        with pytest.raises(WatchCompacted) as caught:
            await asyncio.wait_for(anext(watch), 5)
        assert caught.value.compact_revision == last.header.revision  # the oldest revision left
        watch.close()
    finally:
        await client.close()


async def test_closing_the_client_ends_its_watches(private_etcd: EmbeddedEtcd) -> None:
    client = await connect([private_etcd.endpoint])
    watch = ResumingWatch(client, b"/w/")
    waiting = asyncio.create_task(anext(watch))
    await _watch_created(watch)
    await client.close()
    with pytest.raises(ClientClosedError):
        await asyncio.wait_for(waiting, 5)


async def test_close_wakes_a_consumer_waiting_for_events(etcd_client: EtcdClient, key_prefix: bytes) -> None:
    watch = ResumingWatch(etcd_client, key_prefix)
    events: list[WatchEvent] = []

    async def consume() -> None:
        async for event in watch:
            events.append(event)

    task = asyncio.create_task(consume())
    await _watch_created(watch)
    watch.close()
    await asyncio.wait_for(task, 2)  # ends, neither cancelled nor failed
    assert events == []


@pytest.mark.slow
async def test_resuming_watch_sees_every_put_across_an_etcd_restart_once_in_order(
    private_etcd: EmbeddedEtcd,
) -> None:
    client = await connect([private_etcd.endpoint])
    writer = await connect([private_etcd.endpoint], timeout=2)
    n = 40
    seen: list[bytes] = []
    watch = ResumingWatch(client, b"/w/")  # no start revision: from now on, resumed exactly

    async def consume() -> None:
        async for event in watch:
            seen.append(event.value)
            if len(seen) == n:
                return

    task = asyncio.create_task(consume())
    try:
        await _watch_created(watch)
        for i in range(n // 2):
            await writer.put(b"/w/k", str(i).encode())
        await private_etcd.stop()
        await eventually(lambda: watch.reconnects >= 1, what="the watch sees the stream break")
        await private_etcd.restart()
        for i in range(n // 2, n):
            await _put_retrying(writer, b"/w/" + str(i % 3).encode(), str(i).encode())
        await asyncio.wait_for(task, 15)
        assert seen == [str(i).encode() for i in range(n)]
        assert watch.reconnects >= 1
    finally:
        task.cancel()
        await client.close()
        await writer.close()


async def test_prefix_cache_follows_puts_and_lease_expiry(etcd_client: EtcdClient, key_prefix: bytes) -> None:
    await etcd_client.put(key_prefix + b"a", b"1")
    cache: PrefixCache[bytes] = PrefixCache(etcd_client, key_prefix, lambda k, v: v)
    await cache.start()
    assert cache.get(key_prefix + b"a") == b"1"
    lease = await etcd_client.lease(1)
    reply = await etcd_client.put(key_prefix + b"b", b"2", lease=lease.id)
    await cache.wait_revision(reply.header.revision)
    assert cache.get(key_prefix + b"b") == b"2"
    await eventually(lambda: cache.get(key_prefix + b"b") is None, what="the lapsed key gone from the cache")
    await cache.stop()


# -- ownership ------------------------------------------------------------------------


async def test_try_acquire_is_exclusive_and_follows_the_lease(
    etcd_client: EtcdClient, key_prefix: bytes
) -> None:
    key = key_prefix + b"owner"
    a, b = await etcd_client.lease(5), await etcd_client.lease(5)
    contenders = [("a", a.id), ("b", b.id)] * 5
    results = await asyncio.gather(*(try_acquire(etcd_client, key, who, lease) for who, lease in contenders))
    winners = {who for (who, _), ok in zip(contenders, results, strict=True) if ok}
    assert len(winners) == 1 and sum(results) == 5  # re-acquiring by the holder is idempotent
    holder, other = (a, b) if winners == {"a"} else (b, a)
    holder_name, other_name = ("a", "b") if holder is a else ("b", "a")
    assert not await try_acquire(etcd_client, key, holder_name, other.id)  # same name, other lease: no
    assert not await release(etcd_client, key, other_name)  # only the holder releases
    assert not await release(etcd_client, key, holder_name, lease_id=other.id)
    await holder.revoke()  # the holder goes: the key goes with its lease
    assert await try_acquire(etcd_client, key, other_name, other.id)
    assert await release(etcd_client, key, other_name, lease_id=other.id)
    assert await etcd_client.get(key) is None
    await other.revoke()


# -- Election -------------------------------------------------------------------------


async def test_one_leader_and_takeover_when_its_lease_is_lost(
    etcd_client: EtcdClient, key_prefix: bytes
) -> None:
    name = key_prefix + b"leader"
    first = Election(etcd_client, name, "one", ttl=2)
    second = Election(etcd_client, name, "two", ttl=2)
    await first.campaign()
    assert first.is_leader and await first.leader() == "one"
    waiting = asyncio.create_task(second.campaign())
    await _candidate_in_place(etcd_client, name, "two")
    assert not waiting.done() and not second.is_leader
    t = etcd_client.transactions
    ok, _ = await etcd_client.transaction(
        compare=[first.leader_txn_guard()], success=[t.put(key_prefix + b"x", b"1")], failure=[]
    )
    assert ok
    await etcd_client.revoke_lease(first.lease_id)  # the leader's lease is lost
    await asyncio.wait_for(waiting, 5)
    assert second.is_leader and await second.leader() == "two"
    await asyncio.wait_for(first.lost.wait(), 5)
    assert not first.is_leader
    # The deposed leader's guarded write fails.
    ok, _ = await etcd_client.transaction(
        compare=[first.leader_txn_guard()], success=[t.put(key_prefix + b"x", b"2")], failure=[]
    )
    assert not ok
    got = await etcd_client.get(key_prefix + b"x")
    assert got is not None and got.value == b"1"
    await second.resign()
    await first.resign()
    assert await second.leader() is None
    assert not _our_tasks("election-one", "election-two", "lease-keeper-")


async def test_resign_hands_over_in_order_and_cancel_withdraws(
    etcd_client: EtcdClient, key_prefix: bytes
) -> None:
    name = key_prefix + b"leader"
    a, b, c = (Election(etcd_client, name, who, ttl=5) for who in ("a", "b", "c"))
    await a.campaign()
    b_waits = asyncio.create_task(b.campaign())
    await _candidate_in_place(etcd_client, name, "b")
    c_waits = asyncio.create_task(c.campaign())
    await _candidate_in_place(etcd_client, name, "c")
    c_waits.cancel()  # c gives up: its key goes, b is still next
    with pytest.raises(asyncio.CancelledError):
        await c_waits
    kvs, _ = await snapshot(etcd_client, name + b"/")
    assert sorted(kv.value for kv in kvs) == [b"a", b"b"]
    await a.resign()
    await asyncio.wait_for(b_waits, 5)
    assert b.is_leader and not a.is_leader and a.lost.is_set()
    await b.resign()
    await b.resign()  # safe twice
    # A resigned candidate may stand again, with a new lease.
    await a.campaign()
    assert a.is_leader and await a.leader() == "a"
    await a.resign()


async def test_campaign_fails_when_the_lease_goes_while_waiting(
    etcd_client: EtcdClient, key_prefix: bytes
) -> None:
    name = key_prefix + b"leader"
    leader = Election(etcd_client, name, "leader", ttl=5)
    await leader.campaign()
    hopeful = Election(etcd_client, name, "hopeful", ttl=2)
    waiting = asyncio.create_task(hopeful.campaign())
    await _candidate_in_place(etcd_client, name, "hopeful")
    await etcd_client.revoke_lease(hopeful.lease_id)
    with pytest.raises(ElectionLost):
        await asyncio.wait_for(waiting, 5)
    assert not hopeful.is_leader and hopeful.lost.is_set()
    assert leader.is_leader
    await leader.resign()


@pytest.mark.slow
async def test_leadership_is_lost_when_etcd_is_down_longer_than_the_ttl(private_etcd: EmbeddedEtcd) -> None:
    client = await connect([private_etcd.endpoint], timeout=2)
    election = Election(client, b"/leader", "solo", ttl=2)
    try:
        await election.campaign()
        first_key = election.key
        await private_etcd.stop()
        stopped = time.monotonic()
        await asyncio.wait_for(election.lost.wait(), 5)
        assert not election.is_leader
        assert time.monotonic() - stopped <= 2.5  # by the TTL, while etcd is still down
        await private_etcd.restart()

        async def stands_again() -> bool:
            try:
                await election.campaign()  # stands again, on a new lease
            except UNREACHABLE:
                return False
            return True

        await eventually(stands_again, timeout=10, interval=0.1, what="a new campaign after the restart")
        assert election.is_leader and election.key != first_key
        assert await election.leader() == "solo"
    finally:
        await election.resign()
        await client.close()
    assert not _our_tasks("election-solo", "lease-keeper-")


async def test_cancelled_read_only_transactions_leave_etcd_running(private_etcd: EmbeddedEtcd) -> None:
    """etcd 3.5.1 panics and exits when a read-only Txn is cancelled while applied (etcd #14110):
    600 such transactions cut off after 2 ms killed it. The etcd layer sends them as ranges at one
    revision instead: same answers, and a cancelled one just fails."""
    client = await connect([private_etcd.endpoint])
    t = client.transactions
    try:
        for start in range(0, 4000, 100):
            await client.transaction(
                [], [t.put(f"/ro/{i:06d}".encode(), b"x" * 2000) for i in range(start, start + 100)], []
            )
        ok, replies = await client.transaction([], [t.get(b"/ro/000007"), t.get(b"/ro/", b"/ro0")], [])
        assert ok and [v for v, _ in replies[0]] == [b"x" * 2000] and len(replies[1]) == 4000
        assert replies[0][0][1].mod_revision == replies[1][7][1].mod_revision

        async def cut_off() -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.transaction([], [t.get(b"/ro/", b"/ro0")] * 2, []), 0.002)

        for _ in range(30):
            await asyncio.gather(*(cut_off() for _ in range(20)))
        assert await client.get(b"/ro/000001") is not None
        assert private_etcd.pid is not None, "etcd exited"
        with pytest.raises(ValueError, match="read-only"):
            await client.transaction([t.version(b"/ro/000001") > 0], [t.get(b"/ro/000001")], [])
    finally:
        await client.close()


async def test_a_watch_opened_on_a_member_that_never_answers_resumes_on_another(
    etcd: EmbeddedEtcd, key_prefix: bytes
) -> None:
    """The first member accepts connections and says nothing (an etcd restarting: its port open,
    not serving yet). The watch's first write waits there; when the client gives that member up,
    the watch must resume on the next member and see the puts (grpc.aio's write of a call cancelled
    before it sent its metadata waits for good: a cache that never followed etcd again)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the kernel completes the connections; nobody reads them
    client = await connect([f"http://127.0.0.1:{silent.getsockname()[1]}", etcd.endpoint])
    watch = ResumingWatch(client, key_prefix, start_revision=None)
    try:
        seen: list[bytes] = []

        async def follow() -> None:
            async for event in watch:
                seen.append(event.key)

        follower = asyncio.create_task(follow())
        await eventually(
            lambda: client.member() is not None and client.member().endpoint == etcd.endpoint,
            timeout=10,
            what="the silent member given up",
        )
        # Puts until the watch sees one: it was opened again on the live member.
        n = 0

        async def one_more() -> bool:
            nonlocal n
            n += 1
            await client.put(key_prefix + f"k{n}".encode(), b"v")
            return bool(seen)

        await eventually(one_more, timeout=10, interval=0.2, what="the watch resumed on the live member")
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
    finally:
        watch.close()
        await client.close()
        silent.close()
