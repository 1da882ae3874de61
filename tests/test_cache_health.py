"""Watch-fed caches never freeze silently: bad values are skipped, failures resumed, health tells the truth."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.channels import mesh_channel
from harness.wait import eventually
from mabeam.config import SERVICES, MeshConfig
from mabeam.runtime.cache import PrefixCache
from mabeam.runtime.embedded_etcd import EmbeddedEtcd
from mabeam.runtime.etcd import EtcdClient, connect
from mabeam.runtime.service import start_service
from mabeam.services.orchestrator import server as orchestrator_server
from mabeam.v1 import orchestrator_pb2

GARBAGE = b"\xff\xff\xff\xff"  # not a protobuf message: FromString raises


def _decode_binding(key: bytes, value: bytes) -> orchestrator_pb2.OrchestrationBinding:
    return orchestrator_pb2.OrchestrationBinding.FromString(value)  # no error handling, as in the service


async def test_an_undecodable_value_is_skipped_and_logged_and_the_cache_follows_on(
    etcd_client: EtcdClient, key_prefix: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    await etcd_client.put(key_prefix + b"bad-at-start", GARBAGE)
    cache: PrefixCache[orchestrator_pb2.OrchestrationBinding] = PrefixCache(
        etcd_client, key_prefix, _decode_binding
    )
    health: list[bool] = []
    cache.add_health_listener(lambda c, ok: health.append(ok))
    with caplog.at_level(logging.WARNING, logger="mabeam.runtime.cache"):
        await cache.start()
        try:
            assert cache.get(key_prefix + b"bad-at-start") is None and cache.healthy
            good = orchestrator_pb2.OrchestrationBinding(variable="v1").SerializeToString()
            await etcd_client.put(key_prefix + b"v1", good)
            await etcd_client.put(key_prefix + b"v1", GARBAGE)  # a good value turned bad: gone
            await etcd_client.put(key_prefix + b"v2", good)
            reply = await etcd_client.put(key_prefix + b"v3", good)
            await cache.wait_revision(reply.header.revision)
            assert cache.get(key_prefix + b"v1") is None
            assert cache.get(key_prefix + b"v2") is not None and cache.get(key_prefix + b"v3") is not None
            assert cache.mod_revision(key_prefix + b"v3") == reply.header.revision
            assert cache.healthy and health == [True]  # listed once, never broken
        finally:
            await cache.stop()
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "bad-at-start" in logged and "v1" in logged and "skipped" in logged


async def _health(address: str) -> Any:
    async with mesh_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return reply.status


@pytest.mark.slow
async def test_a_service_is_not_serving_while_its_cache_cannot_follow_etcd_and_serving_after(
    private_etcd: EmbeddedEtcd, monkeypatch: pytest.MonkeyPatch
) -> None:
    servicers: list[orchestrator_server.OrchestratorServicer] = []
    start = orchestrator_server.OrchestratorServicer.start

    async def capturing_start(self: orchestrator_server.OrchestratorServicer) -> None:
        servicers.append(self)
        await start(self)

    monkeypatch.setattr(orchestrator_server.OrchestratorServicer, "start", capturing_start)
    config = MeshConfig(
        etcd_endpoints=(private_etcd.endpoint,),
        prefix=f"/t/{uuid.uuid4().hex[:12]}",
        ports={s: 0 for s in SERVICES},
        grace=0.5,
        service_ttl=2,
        auth=False,  # what is tested is the cache; auth has its own tests (test_auth.py)
    )
    server = await start_service("orchestrator", orchestrator_server.build, config, port=0)
    writer = await connect([private_etcd.endpoint], timeout=2)
    try:
        (servicer,) = servicers
        cache = servicer.bindings
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert await _health(server.address) == serving
        # A value the binding decoder cannot read: skipped, the cache goes on, still SERVING.
        await writer.put(cache.prefix + b"broken", GARBAGE)
        good = orchestrator_pb2.OrchestrationBinding(variable="before").SerializeToString()
        reply = await writer.put(cache.prefix + b"before", good)
        await cache.wait_revision(reply.header.revision)
        assert cache.get(cache.prefix + b"before") is not None
        assert await _health(server.address) == serving

        await private_etcd.stop()
        await eventually(
            lambda: _is(server.address, not_serving),
            timeout=10,
            what="NOT_SERVING while etcd is down",
        )
        assert not cache.healthy
        await private_etcd.restart()
        await eventually(lambda: _is(server.address, serving), timeout=15, what="SERVING after etcd is back")
        assert cache.healthy
        good = orchestrator_pb2.OrchestrationBinding(variable="after").SerializeToString()
        await eventually(lambda: _put(writer, cache.prefix + b"after", good), timeout=10, what="a put")
        await eventually(lambda: cache.get(cache.prefix + b"after") is not None, what="the cache follows")
        assert await _health(server.address) == serving
    finally:
        await writer.close()
        await server.stop(0)


async def _is(address: str, status: Any) -> bool:
    return bool(await _health(address) == status)


async def _put(client: EtcdClient, key: bytes, value: bytes) -> bool:
    try:
        await client.put(key, value)
    except Exception:
        return False
    return True
