"""Bounded memory per connection: the Watch* queue and the SDK's channel pool, without a mesh."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio

from harness.wait import eventually
from mabeam import errors
from mabeam.client import ChannelPool
from mabeam.runtime.watchqueue import LIMIT_ENV, WATCH_QUEUE_LIMIT, BoundedQueue, watch_queue_limit
from mabeam.v1 import common_pb2

# -- BoundedQueue -------------------------------------------------------------------


async def test_queue_delivers_in_order_and_ends() -> None:
    q: BoundedQueue[int] = BoundedQueue("WatchX", "watch again", limit=3)
    for i in range(3):
        assert q.put_nowait(i)
    q.finish()
    assert [i async for i in q] == [0, 1, 2]


async def test_queue_over_its_limit_drops_everything_and_ends_with_resource_exhausted() -> None:
    q: BoundedQueue[int] = BoundedQueue("WatchX", "watch again from revision R", limit=5)
    for i in range(5):
        assert q.put_nowait(i)
    assert not q.put_nowait(5)  # never blocks, never grows past the limit
    assert len(q) == 0 and q.overflowed and q.high_water == 5
    for i in range(1000):  # the producer keeps going: nothing is kept
        assert not q.put_nowait(i)
    assert len(q) == 0 and q.high_water == 5
    with pytest.raises(errors.ResourceExhausted) as caught:
        await q.get()
    assert caught.value.reason_value == common_pb2.ERROR_REASON_WATCH_QUEUE_FULL
    assert caught.value.metadata == {"limit": "5"}
    assert "WatchX" in caught.value.message and "5 events" in caught.value.message
    assert LIMIT_ENV in caught.value.message and "watch again from revision R" in caught.value.message


async def test_a_waiting_consumer_is_woken_by_an_item_and_by_the_overflow() -> None:
    q: BoundedQueue[int] = BoundedQueue("WatchX", "again", limit=1)
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.put_nowait(7)
    assert await getter == 7
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.put_nowait(1)
    q.put_nowait(2)  # over the limit of 1 before the consumer ran
    with pytest.raises(errors.ResourceExhausted):
        await getter


def test_limit_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LIMIT_ENV, raising=False)
    assert watch_queue_limit() == WATCH_QUEUE_LIMIT == 4096
    monkeypatch.setenv(LIMIT_ENV, "17")
    assert watch_queue_limit() == 17
    for bad in ("0", "-3", "many"):
        monkeypatch.setenv(LIMIT_ENV, bad)
        assert watch_queue_limit() == WATCH_QUEUE_LIMIT


# -- ChannelPool --------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Stub:
    def __init__(self, channel: aio.Channel) -> None:
        self.channel = channel


def test_pool_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        ChannelPool(idle_timeout=0)
    with pytest.raises(ValueError):
        ChannelPool(max_channels=0)


async def test_an_idle_channel_is_closed_and_opened_again_on_next_use() -> None:
    clock = FakeClock()
    pool = ChannelPool(idle_timeout=60, clock=clock)
    try:
        first = pool.get("127.0.0.1:1")
        stub = pool.stub("127.0.0.1:1", Stub)
        assert stub.channel is first and pool.stub("127.0.0.1:1", Stub) is stub  # cached
        clock.now += 30
        assert pool.get("127.0.0.2:1") is not None  # a use of the pool: nothing is idle long enough yet
        assert pool.get("127.0.0.1:1") is first and len(pool) == 2
        clock.now += 61
        # The next use of the pool finds both idle for over 60 s: both are closed.
        pool.get("127.0.0.3:1")
        assert len(pool) == 1 and pool.closed_idle == 2
        again = pool.get("127.0.0.1:1")  # opened again on its next use
        assert again is not first and len(pool) == 2
        assert pool.stub("127.0.0.1:1", Stub) is not stub  # its stubs went with it
        # The close runs as a task: wait until the channel says it is shut down.
        await eventually(
            lambda: first.get_state() == grpc.ChannelConnectivity.SHUTDOWN, timeout=5, what="channel closed"
        )
        with pytest.raises(Exception):  # a closed channel refuses calls  # noqa: B017
            await first.unary_unary("/x.Y/Z")(b"", timeout=1)
    finally:
        await pool.close()


async def test_the_cap_closes_the_least_recently_used() -> None:
    clock = FakeClock()
    pool = ChannelPool(idle_timeout=60, max_channels=3, clock=clock)
    try:
        a = pool.get("127.0.0.1:1")
        pool.get("127.0.0.1:2")
        pool.get("127.0.0.1:3")
        clock.now += 1
        assert pool.get("127.0.0.1:1") is a  # now 2 is the least recently used
        pool.get("127.0.0.1:4")
        assert len(pool) == 3 and pool.closed_idle == 1
        assert pool.get("127.0.0.1:1") is a
        assert pool.get("127.0.0.1:3") is not None and len(pool) == 3
    finally:
        await pool.close()


@pytest.fixture
async def slow_server() -> AsyncIterator[tuple[str, asyncio.Event, asyncio.Event]]:
    """A gRPC server whose one method answers only once ``release`` is set; ``entered`` when a call arrives."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def hold(request: bytes, context: object) -> bytes:
        entered.set()
        await release.wait()
        return b"done"

    handler = grpc.method_handlers_generic_handler(
        "test.Slow", {"Hold": grpc.unary_unary_rpc_method_handler(hold)}
    )
    server = aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", entered, release
    release.set()
    await server.stop(None)


async def test_a_channel_with_a_call_in_flight_is_not_closed(
    slow_server: tuple[str, asyncio.Event, asyncio.Event],
) -> None:
    address, entered, release = slow_server
    clock = FakeClock()
    pool = ChannelPool(idle_timeout=60, max_channels=1, clock=clock)
    try:
        channel = pool.get(address)

        async def hold() -> bytes:
            return await channel.unary_unary("/test.Slow/Hold")(b"", timeout=30)  # type: ignore[no-any-return]

        call = asyncio.create_task(hold())
        await entered.wait()
        clock.now += 3600  # idle for an hour by the clock, and over the cap below
        pool.get("127.0.0.1:9")  # a sweep, and a second channel over a cap of 1
        assert pool.get(address) is channel  # kept: its call runs
        release.set()
        assert await call == b"done"  # the call was not cancelled under it
        clock.now += 61
        pool.get("127.0.0.1:9")
        assert address not in pool._channels  # idle now, and closed
    finally:
        await pool.close()


async def test_a_quiet_pool_closes_its_idle_channels_by_itself() -> None:
    pool = ChannelPool(idle_timeout=0.2)  # the real clock: a timer sweeps, no further use needed
    try:
        pool.get("127.0.0.1:1")
        await eventually(lambda: len(pool) == 0, timeout=5, what="the idle channel closed")
        assert pool.closed_idle == 1
    finally:
        await pool.close()
