"""Mutual TLS across the mesh: services, agents and clients on certificates the test makes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc import aio

from harness.certs import make_certs
from mabeam import errors
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient
from mabeam.config import MeshConfig
from mabeam.server import MeshServer
from mabeam.tls import TLS
from mabeam.v1 import agent_pb2, common_pb2, coordination_pb2, registry_pb2, registry_pb2_grpc

pytestmark = pytest.mark.timeout(60)


class Bidder(Agent):
    capabilities = ("secure",)

    def __init__(self, agent_id: str, value: float) -> None:
        super().__init__(agent_id)
        self.value = value

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        return agent_pb2.CoordinationResponse(bid=agent_pb2.Bid(amount=self.value))


async def test_mesh_with_mutual_tls(
    tmp_path: Path, mesh_config: MeshConfig, service: Callable[..., Awaitable[MeshServer]]
) -> None:
    pem = make_certs(tmp_path)
    tls = TLS(cert_file=pem["server"], key_file=pem["server-key"], ca_file=pem["ca"])
    config = replace(mesh_config, tls=tls)
    registry = await service("registry", config)
    coordination = await service("coordination", config)
    client_tls = TLS(ca_file=pem["ca"], cert_file=pem["client"], key_file=pem["client-key"])
    # Agents serve with the mesh's certificate and call the registry with it.
    host = AgentHost(
        [Bidder("s1", 3), Bidder("s2", 8)], registry=registry.address, tls=tls, client_tls=config.client_tls()
    )
    await host.start()
    client = await MeshClient.connect(
        registry=registry.address, coordination=coordination.address, tls=client_tls
    )
    try:
        listed = await client.registry.ListAgents(registry_pb2.ListAgentsRequest(capability="secure"))
        assert {a.agent_id for a in listed.agents} == {"s1", "s2"}
        session = (
            await client.coordination.RunAuction(
                coordination_pb2.RunAuctionRequest(
                    settings=coordination_pb2.SessionSettings(
                        participants=common_pb2.AgentSelector(capability="secure")
                    ),
                    type=coordination_pb2.AUCTION_TYPE_SECOND_PRICE,
                    item="x",
                )
            )
        ).session
        assert (
            list(session.outcome.winners) == ["s2"] and not session.excluded
        )  # coordination -> agents over mTLS

        # A client without a certificate is refused, and so is a plaintext one.
        no_cert = await MeshClient.connect(registry=registry.address, tls=TLS(ca_file=pem["ca"]))
        with pytest.raises(errors.Unavailable):
            await no_cert.registry.ListAgents(registry_pb2.ListAgentsRequest())
        await no_cert.close()
        async with aio.insecure_channel(registry.address) as plain:
            with pytest.raises(grpc.RpcError) as info:
                await registry_pb2_grpc.RegistryServiceStub(plain).ListAgents(
                    registry_pb2.ListAgentsRequest(), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await client.close()
        await host.stop()
