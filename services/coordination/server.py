"""The coordination service's gRPC edge: proto in, proto out, validation.

Domain logic lives beside it (pure, no grpc); the etcd keyspace it owns lives
in `store.py`.
"""

from __future__ import annotations

from mabeam.etcd import EtcdClient
from mabeam.server import MeshServer, unimplemented
from mabeam.v1 import coordination_pb2_grpc

SERVICE_NAME = "mabeam.v1.CoordinationService"

_Base = unimplemented(coordination_pb2_grpc.CoordinationServiceServicer, SERVICE_NAME, "issue #4")


class CoordinationServicer(_Base):  # type: ignore[misc, valid-type]
    """mabeam.v1.CoordinationService."""

    def __init__(self, server: MeshServer, etcd: EtcdClient) -> None:
        self._server = server
        self._etcd = etcd


async def build(server: MeshServer, etcd: EtcdClient) -> None:
    """Add the coordination servicer to `server` (called by mabeam.server.start_service)."""
    server.add_service(
        SERVICE_NAME,
        coordination_pb2_grpc.add_CoordinationServiceServicer_to_server,
        CoordinationServicer(server, etcd),
    )
