"""A replica that stops withdraws from discovery first, then drains its calls in flight."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from typing import Any

import grpc
import pytest

from harness.channels import mesh_channel
from harness.wait import eventually
from mabeam import server as server_module
from mabeam.config import MeshConfig
from mabeam.discovery import EndpointResolver
from mabeam.runtime.service import start_service
from mabeam.server import MeshServer
from mabeam.services.registry import server as registry_server

pytestmark = pytest.mark.timeout(60)


async def test_stop_withdraws_the_endpoint_before_the_grace_period(mesh_config: MeshConfig) -> None:
    entered = asyncio.Event()

    async def slow(request: bytes, context: Any) -> bytes:
        entered.set()
        await asyncio.sleep(2.0)
        return b"done"

    async def build(server: MeshServer, client: Any) -> None:
        await registry_server.build(server, client)
        handler = grpc.method_handlers_generic_handler(
            "test.Slow", {"Call": grpc.unary_unary_rpc_method_handler(slow)}
        )
        server.grpc_server.add_generic_rpc_handlers((handler,))

    # auth off: a method outside the contracts (test.Slow) has no rule, and auth refuses it.
    server = await start_service("registry", build, replace(mesh_config, grace=10.0, auth=False), port=0)
    resolver = EndpointResolver(mesh_config.etcd_endpoints, mesh_config.prefix, "registry")
    await resolver.start()
    stopping: asyncio.Task[None] | None = None
    try:
        assert resolver.addresses() == [server.address]
        async with mesh_channel(server.address) as channel:
            slow_call = channel.unary_unary("/test.Slow/Call", None, None)  # bytes in, bytes out
            call = asyncio.ensure_future(slow_call(b"x", timeout=20))
            await asyncio.wait_for(entered.wait(), 10)
            stopping = asyncio.create_task(server.stop())  # a 10 s grace
            # Clients resolving through etcd stop seeing the replica at once,
            # long before the grace period (or the call in flight) ends ...
            await eventually(lambda: resolver.addresses() == [], timeout=1.5, what="endpoint withdrawn")
            assert not call.done() and not stopping.done()
            # ... while the call in flight still completes.
            assert await asyncio.wait_for(call, 10) == b"done"
        await asyncio.wait_for(stopping, 15)
    finally:
        await resolver.stop()
        if stopping is None:
            await server.stop(0)


async def test_a_stop_step_that_hangs_is_logged_and_given_up_on(
    mesh_config: MeshConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop callback nobody answers and a task that ignores its cancellation do not keep a
    stopping service alive: each step is given up on after its bound, named with its stack."""
    monkeypatch.setattr(server_module, "STOP_STEP_LIMIT_S", 0.3)
    release = asyncio.Event()  # set at the end: nothing is left running after the test

    async def never_answers() -> None:
        await release.wait()

    async def ignores_cancellation() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    server = await start_service("registry", registry_server.build, mesh_config, port=0)
    server.on_stop(never_answers)
    stubborn = server.spawn(ignores_cancellation(), "stubborn")
    try:
        stopping = asyncio.create_task(server.stop(0))
        done, _ = await asyncio.wait({stopping}, timeout=15)
        assert done, "stop() waited on a step past its bound"
        logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
        assert "the background tasks did not end within 0.3 s" in logged
        assert "registry:stubborn" in logged and "ignores_cancellation" in logged
        assert "never_answers did not end within 0.3 s" in logged
        # The stop callbacks after the stuck ones still ran: discovery withdrawn, etcd client closed.
        resolver = EndpointResolver(mesh_config.etcd_endpoints, mesh_config.prefix, "registry")
        await resolver.start()
        try:
            assert server.address not in resolver.addresses()
        finally:
            await resolver.stop()
    finally:
        release.set()
        await asyncio.wait({stubborn}, timeout=5)
