"""Idle channels keep their connection: the SDK's keep-alive pings and the servers' policy agree.

grpc's default server policy answers pings on an idle connection with GOAWAY
"too_many_pings"; the connection then drops to IDLE and the next call pays a
reconnect (or, on a stream, breaks). Here a channel with the SDK's options
(pinging at the shortest interval the servers accept, to keep the test short)
idles beside a mesh server for several ping periods and must stay READY.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mabeam import client, server
from mabeam.config import MeshConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def test_the_clients_ping_no_faster_than_the_servers_accept() -> None:
    assert client.KEEPALIVE_TIME_MS >= server.MIN_PING_INTERVAL_MS
    assert dict(server.SERVER_OPTIONS)["grpc.keepalive_permit_without_calls"] == 1


async def _idle_and_watch(options: list[tuple[str, object]], idle_s: float) -> list[grpc.ChannelConnectivity]:
    mesh_server = server.MeshServer("agent", MeshConfig(ports={"agent": 0}))
    port = await mesh_server.start(0)
    channel = aio.insecure_channel(f"127.0.0.1:{port}", options=options)
    changes: list[grpc.ChannelConnectivity] = []
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        state: grpc.ChannelConnectivity = channel.get_state()
        assert state == grpc.ChannelConnectivity.READY

        async def watch() -> None:
            current: grpc.ChannelConnectivity = state
            while True:
                await channel.wait_for_state_change(current)
                current = channel.get_state()
                changes.append(current)

        watcher = asyncio.create_task(watch())
        try:
            # The idle time is what is under test: several keep-alive periods with no call.
            await asyncio.sleep(idle_s)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    finally:
        await channel.close(None)
        await mesh_server.stop(0)
    return changes


async def test_an_idle_channel_with_the_sdks_pings_stays_connected() -> None:
    options = dict(client.CHANNEL_OPTIONS)
    options["grpc.keepalive_time_ms"] = server.MIN_PING_INTERVAL_MS + 500
    changes = await _idle_and_watch(
        list(options.items()), idle_s=4 * (server.MIN_PING_INTERVAL_MS + 500) / 1000
    )
    assert changes == [], f"the idle connection changed state: {changes} (GOAWAY too_many_pings?)"
