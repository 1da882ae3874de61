"""Client-side discovery: replicas publish their address in etcd, the SDK balances over the live ones."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from harness.wait import eventually
from mabeam import errors
from mabeam.client import MeshClient
from mabeam.config import MeshConfig
from mabeam.discovery import EndpointResolver
from mabeam.runtime.etcd import EtcdClient
from mabeam.server import MeshServer
from mabeam.v1 import planner_pb2, registry_pb2


async def test_clients_find_and_leave_replicas_through_etcd(
    service: Callable[..., Awaitable[MeshServer]], mesh_config: MeshConfig, etcd_client: EtcdClient
) -> None:
    a, b = await service("registry"), await service("registry")
    resolver = EndpointResolver(mesh_config.etcd_endpoints, mesh_config.prefix, "registry")
    await resolver.start()
    try:
        assert sorted(resolver.addresses()) == sorted([a.address, b.address])
        mesh = await MeshClient.connect(etcd=list(mesh_config.etcd_endpoints), prefix=mesh_config.prefix)
        try:
            for i in range(6):  # round robin over both replicas; each answers
                await mesh.registry.RegisterAgent(
                    registry_pb2.RegisterAgentRequest(agent_id=f"d{i}", endpoint="127.0.0.1:1")
                )
            await a.stop(0)  # a graceful stop withdraws the endpoint at once
            await eventually(lambda: resolver.addresses() == [b.address], what="stopped replica withdrawn")
            for _ in range(4):
                listed = await mesh.registry.ListAgents(registry_pb2.ListAgentsRequest())
                assert len(listed.agents) == 6
            with pytest.raises(errors.NotFound) as info:
                await mesh.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="ghost"))
            assert info.value.reason == "AGENT_NOT_FOUND" and "ghost" in info.value.message
        finally:
            await mesh.close()
    finally:
        await resolver.stop()


async def test_a_service_without_any_replica_is_unavailable(mesh_config: MeshConfig) -> None:
    mesh = await MeshClient.connect(etcd=list(mesh_config.etcd_endpoints), prefix=mesh_config.prefix)
    try:
        with pytest.raises(errors.Unavailable, match="planner"):
            await mesh.planner.ListGoals(planner_pb2.ListGoalsRequest())
    finally:
        await mesh.close()
