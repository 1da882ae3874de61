"""The registry under faults: frozen agents, killed replicas, supervision handed over."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from google.protobuf import duration_pb2

from harness.mesh_fixtures import enrolled
from harness.wait import eventually
from mabeam import errors
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient
from mabeam.runtime.mesh import LocalMesh
from mabeam.server import MeshServer
from mabeam.v1 import registry_pb2

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "examples" / "worker.py")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


async def names(client: MeshClient, capability: str = "") -> set[str]:
    page = await client.registry.ListAgents(
        registry_pb2.ListAgentsRequest(capability=capability, page_size=1000)
    )
    return {a.agent_id for a in page.agents}


async def test_frozen_agent_disappears_within_its_ttl(service: Callable[..., Awaitable[MeshServer]]) -> None:
    registry = await service("registry")
    client = await MeshClient.connect(registry=registry.address)
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, WORKER, "--id", "frozen", "--registry", registry.address, "--lease-ttl", "2"),
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        await eventually(lambda: _has(client, "frozen"), timeout=15, what="worker registered")
        os.kill(proc.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        await eventually(
            lambda: _gone(client, "frozen"), timeout=6, interval=0.02, what="frozen agent removed"
        )
        assert time.monotonic() - frozen_at <= 2 + 1.5
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        await proc.wait()
        await client.close()


async def _has(client: MeshClient, agent_id: str) -> bool:
    return agent_id in await names(client)


async def _gone(client: MeshClient, agent_id: str) -> bool:
    return agent_id not in await names(client)


class Light(Agent):
    capabilities = ("light",)


async def test_killing_a_registry_replica_loses_no_agent(
    local_mesh: Callable[..., Awaitable[LocalMesh]],
) -> None:
    mesh = await local_mesh(services=("registry",), replicas=2)
    addresses = mesh.addresses("registry")
    host = AgentHost([Light(f"l{i:02d}") for i in range(50)], registry=addresses, lease_ttl=3.0)
    await host.start()
    observers = [await MeshClient.connect(registry=a) for a in addresses]
    try:
        await eventually(lambda: _count(observers[1], 50), timeout=10, what="50 agents listed")
        victim = mesh.processes[0]
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        # For three lease TTLs, every agent stays listed on the surviving replica.
        deadline = time.monotonic() + 9
        while time.monotonic() < deadline:
            assert len(await names(observers[1], "light")) == 50
            await asyncio.sleep(0.1)
    finally:
        await host.stop()
        for c in observers:
            await c.close()


async def _count(client: MeshClient, n: int) -> bool:
    return len(await names(client, "light")) == n


async def test_supervision_moves_to_the_surviving_replica(
    local_mesh: Callable[..., Awaitable[LocalMesh]],
) -> None:
    mesh = await local_mesh(services=("registry",), replicas=2, extra_env={"MABEAM_SERVICE_TTL": "2"})
    client = await MeshClient.connect(registry=mesh.addresses("registry"))
    try:
        launch = registry_pb2.LaunchSpec(
            command=registry_pb2.Command(argv=[sys.executable, WORKER, "--lease-ttl", "2"])
        )
        started = (
            await client.registry.StartAgent(
                registry_pb2.StartAgentRequest(
                    agent_id="moved",
                    launch=launch,
                    restart_policy=registry_pb2.RestartPolicy(
                        max_restarts=5, period=duration_pb2.Duration(seconds=60)
                    ),
                )
            )
        ).agent
        owner = next(p for p in mesh.processes if f"-{p.pid}-" in started.supervisor_id)
        owner.proc.send_signal(signal.SIGKILL)
        owner.proc.wait()
        survivor = next(p for p in mesh.processes if p is not owner)
        other = await MeshClient.connect(registry=survivor.address)

        async def taken_over() -> bool:
            page = await other.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
            rec = next(a for a in page.agents if a.agent_id == "moved")
            return (
                rec.state == registry_pb2.SUPERVISION_STATE_RUNNING
                and f"-{survivor.pid}-" in rec.supervisor_id
                and rec.pid != started.pid
            )

        await eventually(taken_over, timeout=20, what="supervision handed over")
        agent = (await other.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="moved"))).agent
        assert agent.supervised
        await other.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id="moved"))
        await other.close()
    finally:
        await client.close()


async def test_re_registers_after_an_etcd_restart(private_etcd, mesh_config) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from mabeam.runtime.service import start_service
    from mabeam.services.registry.server import build

    config = await enrolled(replace(mesh_config, etcd_endpoints=(private_etcd.endpoint,)))
    registry = await start_service("registry", build, config, port=0)
    client = await MeshClient.connect(registry=registry.address)
    host = AgentHost([Light("survivor")], registry=registry.address, lease_ttl=1.0)
    await host.start()
    try:
        await eventually(lambda: _has(client, "survivor"), what="registered")
        await private_etcd.stop()
        await asyncio.sleep(2.5)  # longer than the lease: it lapses
        await private_etcd.restart()
        await eventually(
            lambda: _has_safe(client, "survivor"), timeout=20, what="re-registered after etcd restart"
        )
    finally:
        await host.stop()
        await client.close()
        await registry.stop(0)


async def _has_safe(client: MeshClient, agent_id: str) -> bool:
    try:
        return await _has(client, agent_id)
    except errors.MabeamError:
        return False


async def test_registration_through_one_replica_is_listed_by_the_other(
    service: Callable[..., Awaitable[MeshServer]],
) -> None:
    a, b = await service("registry"), await service("registry")
    via_a = await MeshClient.connect(registry=a.address)
    via_b = await MeshClient.connect(registry=b.address)
    delays = []
    try:
        for i in range(20):
            request = registry_pb2.ListAgentsRequest(capability=f"vis{i}")
            started = time.perf_counter()
            await via_a.registry.RegisterAgent(
                registry_pb2.RegisterAgentRequest(
                    agent_id=f"vis{i}", endpoint="127.0.0.1:1", capabilities=[f"vis{i}"]
                )
            )

            async def listed_via_b(request: registry_pb2.ListAgentsRequest = request) -> bool:
                return bool((await via_b.registry.ListAgents(request)).agents)

            await eventually(listed_via_b, timeout=10, interval=0.001, what="listed by the other replica")
            delays.append(time.perf_counter() - started)
    finally:
        await via_a.close()
        await via_b.close()
    delays.sort()
    print(
        f"registration visible on the other replica: median {delays[10] * 1000:.1f} ms, max {delays[-1] * 1000:.1f} ms"
    )
    assert delays[-1] < 1.0
