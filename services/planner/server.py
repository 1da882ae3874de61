"""The planner service's gRPC edge: proto in, proto out, validation.

Domain logic lives beside it (pure, no grpc); the etcd keyspace it owns lives
in `store.py`.
"""

from __future__ import annotations

from mabeam.etcd import EtcdClient
from mabeam.server import MeshServer, unimplemented
from mabeam.v1 import planner_pb2_grpc

SERVICE_NAME = "mabeam.v1.PlannerService"

_Base = unimplemented(planner_pb2_grpc.PlannerServiceServicer, SERVICE_NAME, "issue #6")


class PlannerServicer(_Base):  # type: ignore[misc, valid-type]
    """mabeam.v1.PlannerService."""

    def __init__(self, server: MeshServer, etcd: EtcdClient) -> None:
        self._server = server
        self._etcd = etcd


async def build(server: MeshServer, etcd: EtcdClient) -> None:
    """Add the planner servicer to `server` (called by mabeam.server.start_service)."""
    server.add_service(
        SERVICE_NAME,
        planner_pb2_grpc.add_PlannerServiceServicer_to_server,
        PlannerServicer(server, etcd),
    )
