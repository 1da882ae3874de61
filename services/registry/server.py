"""The registry service's gRPC edge: proto in, proto out, validation.

Domain logic lives beside it (pure, no grpc); the etcd keyspace it owns lives
in `store.py`.
"""

from __future__ import annotations

from mabeam.etcd import EtcdClient
from mabeam.server import MeshServer, unimplemented
from mabeam.v1 import registry_pb2_grpc

SERVICE_NAME = "mabeam.v1.RegistryService"

_Base = unimplemented(registry_pb2_grpc.RegistryServiceServicer, SERVICE_NAME, "issue #3")


class RegistryServicer(_Base):  # type: ignore[misc, valid-type]
    """mabeam.v1.RegistryService."""

    def __init__(self, server: MeshServer, etcd: EtcdClient) -> None:
        self._server = server
        self._etcd = etcd


async def build(server: MeshServer, etcd: EtcdClient) -> None:
    """Add the registry servicer to `server` (called by mabeam.server.start_service)."""
    server.add_service(
        SERVICE_NAME,
        registry_pb2_grpc.add_RegistryServiceServicer_to_server,
        RegistryServicer(server, etcd),
    )
