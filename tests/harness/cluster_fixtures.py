"""The production topology on loopback: three etcd members and two replicas of every service.

``mesh_cluster`` is a factory: each call starts a :class:`LocalMesh` on free
ports with a three-member etcd cluster (``mesh.etcd_cluster``; kill a member
with ``mesh.etcd_cluster.members[i].kill()``, find the leader with
``await mesh.etcd_cluster.leader_index()``) and ``replicas`` of each service
(``mesh.replicas_of("registry")``), each service given every etcd endpoint.
Everything it started is stopped after the test, whatever the test killed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from mabeam.config import SERVICES, MeshConfig
from mabeam.runtime.mesh import LocalMesh

# Short service-endpoint leases, so a killed replica leaves discovery quickly.
SERVICE_TTL = 2


@pytest.fixture
async def mesh_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Awaitable[LocalMesh]]]:
    meshes: list[LocalMesh] = []

    async def start(
        *, services: tuple[str, ...] = SERVICES, replicas: int = 2, etcd_members: int = 3
    ) -> LocalMesh:
        n = len(meshes)
        config = MeshConfig(
            prefix="/mabeam",
            ports={s: 0 for s in SERVICES},
            data_dir=tmp_path / f"mesh{n}" / "etcd",
            grace=0.5,
            service_ttl=SERVICE_TTL,
        )
        mesh = LocalMesh(
            config,
            services=services,
            replicas=replicas,
            etcd_members=etcd_members,
            etcd_client_port=0,
            etcd_peer_port=0,
            unsafe_no_fsync=True,
            log_dir=tmp_path / f"mesh{n}" / "logs",
            extra_env={"MABEAM_SERVICE_TTL": str(SERVICE_TTL)},
        )
        meshes.append(mesh)
        await mesh.start(timeout=60)
        # Auth on, as users run it: the test and the processes it starts present the admin token.
        monkeypatch.setenv("MABEAM_TOKEN", mesh.admin_token or "")
        return mesh

    yield start
    if getattr(request.node, "failed_call", False):  # what each replica waits on, in its log
        for mesh in meshes:
            await mesh.dump_tasks()
    for mesh in reversed(meshes):
        await mesh.stop()
