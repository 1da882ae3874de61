"""The orchestrator service's gRPC edge: proto in, proto out, validation.

Domain logic lives beside it (pure, no grpc); the etcd keyspace it owns lives
in `store.py`.
"""

from __future__ import annotations

from mabeam.etcd import EtcdClient
from mabeam.server import MeshServer, unimplemented
from mabeam.v1 import orchestrator_pb2_grpc

SERVICE_NAME = "mabeam.v1.OrchestratorService"

_Base = unimplemented(orchestrator_pb2_grpc.OrchestratorServiceServicer, SERVICE_NAME, "issue #5")


class OrchestratorServicer(_Base):  # type: ignore[misc, valid-type]
    """mabeam.v1.OrchestratorService."""

    def __init__(self, server: MeshServer, etcd: EtcdClient) -> None:
        self._server = server
        self._etcd = etcd


async def build(server: MeshServer, etcd: EtcdClient) -> None:
    """Add the orchestrator servicer to `server` (called by mabeam.server.start_service)."""
    server.add_service(
        SERVICE_NAME,
        orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server,
        OrchestratorServicer(server, etcd),
    )
