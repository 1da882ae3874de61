"""Health probes of agent endpoints, run by one registry replica (elected through etcd).

An agent's status comes from its lease (it is listed at all), its heartbeats
(UNKNOWN when none was stored for 5/6 of the TTL, about two missed beats) and, here, a ``grpc.health.v1`` probe
of its endpoint: NOT_SERVING when the endpoint says so, UNKNOWN when it does
not answer, SERVING otherwise (an endpoint without the health service counts
as serving). One probe per endpoint, not per agent: an AgentHost's thousand
agents cost one call. Only a change is written to etcd, as a compare-and-set
on the agent's record.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mabeam.client import ChannelPool
from mabeam.server import MeshServer
from mabeam.services.registry.store import RegistryStore
from mabeam.v1 import registry_pb2

if TYPE_CHECKING:
    from mabeam.services.registry.directory import AgentDirectory

log = logging.getLogger("mabeam.registry.prober")

PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 1.0


async def probe(pool: ChannelPool, endpoint: str) -> int:
    """The AgentStatus an endpoint's health check gives."""
    stub = pool.stub(endpoint, health_pb2_grpc.HealthStub)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT)
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND):
            return registry_pb2.AGENT_STATUS_SERVING
        return registry_pb2.AGENT_STATUS_UNKNOWN
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return registry_pb2.AGENT_STATUS_SERVING
    return registry_pb2.AGENT_STATUS_NOT_SERVING


class Prober:
    """Probes every registered endpoint while this replica leads the prober election."""

    def __init__(self, server: MeshServer, store: RegistryStore, directory: AgentDirectory) -> None:
        self._server = server
        self._store = store
        self._directory = directory
        # No token: health is open on every mesh server and agent, and an endpoint is whatever an agent
        # registered, so a probe carrying the service token would hand it to anyone holding an agent token.
        self._pool = ChannelPool(server.config.client_tls())

    async def run(self) -> None:
        """Probe while this replica leads the prober election; campaign again after losing it."""
        try:
            await self._store.while_leading_prober(
                self._server.instance_id, self._server.config.service_ttl, self.probe_once, PROBE_INTERVAL
            )
        finally:
            await self._pool.close()

    async def probe_once(self) -> None:
        """Probe each endpoint once and write the statuses that changed."""
        agents = self._directory.with_capability("")
        endpoints = sorted({a.endpoint for a in agents})
        results = await asyncio.gather(*(probe(self._pool, e) for e in endpoints))
        status_of = dict(zip(endpoints, results, strict=True))
        for agent in agents:
            wanted = status_of.get(agent.endpoint, registry_pb2.AGENT_STATUS_UNKNOWN)
            stored = agent.status or registry_pb2.AGENT_STATUS_SERVING
            if wanted != stored:
                await self._store.set_status(agent.agent_id, wanted)
