"""The etcd primitives the SDK adds to aetcd, against a real etcd (restarts included)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import pytest

from mabeam.cache import PrefixCache
from mabeam.embedded_etcd import EmbeddedEtcd, EtcdCluster, EtcdStartError
from mabeam.etcd import Election, EtcdClient, LeaseKeeper, ResumingWatch, connect, snapshot, try_acquire
from mabeam.process import pid_alive


async def test_embedded_etcd_starts_and_stops_without_leftovers() -> None:
    server = EmbeddedEtcd(unsafe_no_fsync=True)
    started = time.monotonic()
    await server.start()
    assert time.monotonic() - started < 5
    pid = server.pid
    assert pid is not None
    client = await connect([server.endpoint])
    await client.put(b"k", b"v")
    assert (await client.get(b"k")).value == b"v"  # type: ignore[union-attr]
    await client.close()
    await server.stop()
    await server.stop()  # idempotent
    assert not pid_alive(pid)
    server.cleanup()


async def test_given_port_in_use_is_a_clear_error(etcd: EmbeddedEtcd) -> None:
    clash = EmbeddedEtcd(client_port=etcd.client_port, peer_port=0)
    with pytest.raises(EtcdStartError, match=str(etcd.client_port)):
        await clash.start()
    clash.cleanup()


def test_etcd_dies_with_a_killed_parent() -> None:
    code = (
        "import asyncio,sys\n"
        "from mabeam.embedded_etcd import EmbeddedEtcd\n"
        "async def main():\n"
        "    e = EmbeddedEtcd(unsafe_no_fsync=True)\n"
        "    await e.start()\n"
        "    print(e.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    etcd_pid = int(parent.stdout.readline())
    assert pid_alive(etcd_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while pid_alive(etcd_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(etcd_pid)


async def test_lease_keeper_keeps_a_short_lease_alive(etcd_client: EtcdClient, key_prefix: bytes) -> None:
    keeper = LeaseKeeper(etcd_client, ttl=1)
    await keeper.start()
    await etcd_client.put(key_prefix + b"owned", b"x", lease=keeper.lease_id)
    await asyncio.sleep(3.5)
    assert await etcd_client.get(key_prefix + b"owned") is not None
    assert not keeper.lost.is_set()
    await keeper.revoke()
    assert await etcd_client.get(key_prefix + b"owned") is None
    await keeper.stop()


async def test_lease_keeper_reports_a_revoked_lease(etcd_client: EtcdClient) -> None:
    keeper = LeaseKeeper(etcd_client, ttl=1)
    await keeper.start()
    await etcd_client.revoke_lease(keeper.lease_id)  # someone else revokes it
    await asyncio.wait_for(keeper.wait_lost(), 3)
    await keeper.stop()


@pytest.mark.slow
async def test_lease_lost_when_etcd_is_down_longer_than_the_ttl(private_etcd: EmbeddedEtcd) -> None:
    client = await connect([private_etcd.endpoint])
    keeper = LeaseKeeper(client, ttl=1)
    await keeper.start()
    await private_etcd.stop()
    await asyncio.sleep(2.5)
    await private_etcd.restart()
    await asyncio.wait_for(keeper.wait_lost(), 5)
    await keeper.stop()
    await client.close()


@pytest.mark.slow
async def test_resuming_watch_sees_every_put_across_an_etcd_restart(private_etcd: EmbeddedEtcd) -> None:
    client = await connect([private_etcd.endpoint])
    writer = await connect([private_etcd.endpoint])
    prefix = b"/w/"
    _, revision = await snapshot(client, prefix)
    seen: list[bytes] = []
    done = asyncio.Event()
    n = 40

    async def consume() -> None:
        async for event in ResumingWatch(client, prefix, start_revision=revision + 1):
            seen.append(event.value)
            if len(seen) == n:
                done.set()
                return

    task = asyncio.create_task(consume())
    for i in range(n // 2):
        await writer.put(prefix + b"k", str(i).encode())
    await private_etcd.stop()
    await private_etcd.restart()
    for i in range(n // 2, n):
        for _ in range(50):
            try:
                await writer.put(prefix + b"k", str(i).encode())
                break
            except Exception:
                await asyncio.sleep(0.1)
    await asyncio.wait_for(done.wait(), 15)
    task.cancel()
    assert seen == [str(i).encode() for i in range(n)]
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
    deadline = time.monotonic() + 4
    while cache.get(key_prefix + b"b") is not None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert cache.get(key_prefix + b"b") is None
    await cache.stop()


async def test_try_acquire_is_exclusive(etcd_client: EtcdClient, key_prefix: bytes) -> None:
    a, b = await etcd_client.lease(5), await etcd_client.lease(5)
    results = await asyncio.gather(
        *(
            try_acquire(etcd_client, key_prefix + b"owner", name, lease.id)
            for name, lease in [("a", a), ("b", b)] * 5
        )
    )
    # One holder: its five calls succeed (re-acquiring is idempotent), the other's five fail.
    assert sum(results) == 5
    assert len({name for (name, _), ok in zip([("a", a), ("b", b)] * 5, results, strict=True) if ok}) == 1
    await a.revoke()
    await b.revoke()


async def test_election_one_leader_and_takeover(etcd_client: EtcdClient, key_prefix: bytes) -> None:
    first = Election(etcd_client, key_prefix + b"leader", "one", ttl=2)
    second = Election(etcd_client, key_prefix + b"leader", "two", ttl=2)
    await first.campaign()
    assert first.is_leader and await first.leader() == "one"
    waiting = asyncio.create_task(second.campaign())
    await asyncio.sleep(0.3)
    assert not waiting.done()
    ok, _ = await etcd_client.transaction(
        compare=[first.guard()], success=[etcd_client.transactions.put(key_prefix + b"x", b"1")], failure=[]
    )
    assert ok
    await first.resign()
    await asyncio.wait_for(waiting, 5)
    assert second.is_leader and await second.leader() == "two"
    # The deposed leader's guarded write fails.
    ok, _ = await etcd_client.transaction(
        compare=[first.guard()], success=[etcd_client.transactions.put(key_prefix + b"x", b"2")], failure=[]
    )
    assert not ok
    await second.resign()


@pytest.mark.slow
async def test_three_member_cluster_survives_a_member_loss() -> None:
    async with EtcdCluster(3, unsafe_no_fsync=True) as cluster:
        client = await connect(cluster.endpoints)
        await client.put(b"/c", b"1")
        leader = await cluster.leader_index()
        cluster.members[leader].kill()
        for _ in range(100):
            try:
                await client.put(b"/c", b"2")
                break
            except Exception:
                await asyncio.sleep(0.1)
        assert (await client.get(b"/c")).value == b"2"  # type: ignore[union-attr]
        await client.close()
