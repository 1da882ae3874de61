"""The plaintext health-only port (``--health-port``): Kubernetes' gRPC probes speak no TLS.

A service with TLS on and a health port answers ``grpc.health.v1.Health`` in
plaintext there, from the same statuses as its main port, and nothing else
(no mesh service, no reflection); its main port still refuses plaintext; on
stop the health port reads NOT_SERVING through the grace period, then closes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from harness.certs import make_certs
from harness.channels import mesh_channel
from harness.wait import eventually
from mabeam.config import SERVICE_NAMES, MeshConfig
from mabeam.runtime import process
from mabeam.runtime.service import start_service
from mabeam.server import MeshServer, PortInUse, port_is_free
from mabeam.services.registry import server as registry_server
from mabeam.tls import TLS
from mabeam.v1 import registry_pb2, registry_pb2_grpc

pytestmark = pytest.mark.timeout(90)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REGISTRY = SERVICE_NAMES["registry"]

T = TypeVar("T")


def free_port() -> int:
    """A loopback port free now; whoever binds it later retries on PortInUse (harness/ports.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def on_a_free_health_port(start: Callable[[int], Awaitable[T]]) -> T:
    """``start(port)`` with a free port, again with another when it was taken meanwhile."""
    for attempt in range(5):
        try:
            return await start(free_port())
        except PortInUse:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


async def check(address: str, service: str) -> int:
    async with aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


async def refused(address: str) -> bool:
    """True when nothing answers plaintext health at ``address`` any more."""
    try:
        await check(address, "")
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAVAILABLE
    return False


async def test_health_port_serves_plaintext_health_only_beside_a_tls_service(
    tmp_path: Path, mesh_config: MeshConfig
) -> None:
    pem = make_certs(tmp_path)
    tls = TLS(cert_file=pem["server"], key_file=pem["server-key"], ca_file=pem["ca"])

    async def start(health_port: int) -> MeshServer:
        config = replace(mesh_config, tls=tls, health_port=health_port, grace=3.0)
        return await start_service("registry", registry_server.build, config, port=0)

    server = await on_a_free_health_port(start)
    health_address = f"127.0.0.1:{server.health_port}"
    stopping: asyncio.Task[None] | None = None
    try:
        assert server.health_port == server.config.health_port != server.port
        # Plaintext health on the health port: overall and per service, the main port's statuses.
        assert await check(health_address, "") == SERVING
        assert await check(health_address, REGISTRY) == SERVING
        await server.set_health("mabeam.test", False)
        assert await check(health_address, "mabeam.test") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            await check(health_address, "mabeam.v1.NoSuchService")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        # Nothing else there: a mesh RPC (with a valid admin token) and reflection are UNIMPLEMENTED.
        async with mesh_channel(health_address) as plain:
            with pytest.raises(grpc.RpcError) as mesh_call:
                await registry_pb2_grpc.RegistryServiceStub(plain).ListAgents(
                    registry_pb2.ListAgentsRequest(), timeout=5
                )
            assert mesh_call.value.code() == grpc.StatusCode.UNIMPLEMENTED
            stream = reflection_pb2_grpc.ServerReflectionStub(plain).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            with pytest.raises(grpc.RpcError) as listing:
                async for _ in stream:
                    pass
            assert listing.value.code() == grpc.StatusCode.UNIMPLEMENTED

        # The main port still refuses plaintext.
        async with aio.insecure_channel(server.address) as plain:
            with pytest.raises(grpc.RpcError) as main_plain:
                await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert main_plain.value.code() == grpc.StatusCode.UNAVAILABLE

        # Stop: a call in flight on the main port (a TLS health Watch) holds the 3 s grace period;
        # meanwhile the health port's Watch and Check read NOT_SERVING; then it closes.
        client_tls = TLS(ca_file=pem["ca"], cert_file=pem["client"], key_file=pem["client-key"])
        async with (
            aio.secure_channel(server.address, client_tls.channel_credentials()) as secure,
            aio.insecure_channel(health_address) as plain,
        ):
            held = health_pb2_grpc.HealthStub(secure).Watch(health_pb2.HealthCheckRequest(service=REGISTRY))
            assert (await held.read()).status == SERVING
            watch = health_pb2_grpc.HealthStub(plain).Watch(health_pb2.HealthCheckRequest(service=REGISTRY))
            assert (await watch.read()).status == SERVING
            stopping = asyncio.create_task(server.stop())
            assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
            assert await check(health_address, "") == NOT_SERVING
            assert await check(health_address, REGISTRY) == NOT_SERVING
            assert not stopping.done(), "the grace period should still hold the server"
            await asyncio.wait_for(stopping, 20)
            held.cancel()
        await eventually(lambda: refused(health_address), timeout=5, what="the health port closed")
        assert port_is_free("127.0.0.1", server.health_port)
        assert port_is_free("127.0.0.1", server.port)
    finally:
        if stopping is None:
            await server.stop(0)


async def test_health_port_flag_on_the_service_entry_point(tmp_path: Path, mesh_config: MeshConfig) -> None:
    """``python -m mabeam.services.registry --health-port N`` answers plaintext health on N."""
    pem = make_certs(tmp_path)
    token_file = tmp_path / "service.token"
    token_file.write_text(mesh_config.token or "", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("MABEAM_TOKEN", "MABEAM_TOKEN_FILE")}
    log_file = tmp_path / "registry.log"

    async def start(health_port: int) -> tuple[subprocess.Popen[bytes], int]:
        argv = process.python_module_argv(
            "mabeam.services.registry",
            *("--etcd", ",".join(mesh_config.etcd_endpoints), "--prefix", mesh_config.prefix),
            *("--port", "0", "--health-port", str(health_port), "--token-file", str(token_file)),
            *("--tls-cert", pem["server"], "--tls-key", pem["server-key"], "--tls-ca", pem["ca"]),
        )
        with process.ReadyFile() as ready:
            with process.open_log(log_file) as log:
                proc = process.spawn(argv, env={**env, **ready.env()}, stdout=log, stderr=log)
            try:
                await ready.wait(proc, 30)
            except process.ExitedBeforeReady:
                logged = log_file.read_text()
                if "--health-port" in logged and "already in use" in logged:
                    raise PortInUse(logged) from None
                raise AssertionError(f"the registry did not start: {logged}") from None
            except BaseException:
                await process.terminate(proc, 1)
                raise
        return proc, health_port

    proc, health_port = await on_a_free_health_port(start)
    health_address = f"127.0.0.1:{health_port}"
    try:
        assert await check(health_address, REGISTRY) == SERVING
        assert "plaintext health port 127.0.0.1:" in log_file.read_text()
    finally:
        status = await process.terminate(proc, 10)
    assert status == 0, log_file.read_text()
    assert await refused(health_address)
    assert port_is_free("127.0.0.1", health_port)


def test_health_port_setting_flag_over_environment_and_bad_values_named() -> None:
    import argparse

    from mabeam import config as mesh_config

    parser = argparse.ArgumentParser()
    mesh_config.add_mesh_arguments(parser, services=("registry",))
    assert mesh_config.load(parser.parse_args([]), env={}).health_port == 0
    assert mesh_config.load(parser.parse_args([]), env={"MABEAM_HEALTH_PORT": "8081"}).health_port == 8081
    flagged = parser.parse_args(["--health-port", "9091"])
    assert mesh_config.load(flagged, env={"MABEAM_HEALTH_PORT": "8081"}).health_port == 9091
    with pytest.raises(mesh_config.ConfigError, match=r"MABEAM_HEALTH_PORT='x'.*--health-port"):
        mesh_config.load(parser.parse_args([]), env={"MABEAM_HEALTH_PORT": "x"})
    with pytest.raises(mesh_config.ConfigError, match=r"--health-port .* 70000: a port is 0 to 65535"):
        mesh_config.load(parser.parse_args(["--health-port", "70000"]), env={})
    # `mabeam up` (four services in one parser) has no such flag: one health port per process.
    up = argparse.ArgumentParser()
    mesh_config.add_mesh_arguments(up)
    assert "--health-port" not in up.format_help()
