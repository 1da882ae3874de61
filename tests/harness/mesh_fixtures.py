"""Fixtures that run mabeam services on free loopback ports against the session etcd.

* ``mesh_config``: a MeshConfig for the session etcd with a key prefix unique
  to the test, so tests never see each other's state.
* ``service``: a factory starting a service in-process (fast; the same
  ``start_service`` the entry points use) and stopping it after the test.
* ``local_mesh``: a factory for a LocalMesh (services as subprocesses).

A dead endpoint is :func:`harness.ports.closed_port`; a port picked free for a
process to bind later may be taken meanwhile (see ``harness/ports.py``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest

from mabeam.config import SERVICES, MeshConfig
from mabeam.runtime.mesh import LocalMesh
from mabeam.runtime.service import start_service
from mabeam.server import MeshServer


def _builder(kind: str) -> Callable[..., Awaitable[None]]:
    import importlib

    return importlib.import_module(f"mabeam.services.{kind}.server").build  # type: ignore[no-any-return]


@pytest.fixture
def mesh_config(etcd: object) -> MeshConfig:
    endpoint = etcd.endpoint  # type: ignore[attr-defined]
    ports = {s: 0 for s in SERVICES}
    return MeshConfig(
        etcd_endpoints=(endpoint,),
        prefix=f"/t/{uuid.uuid4().hex[:12]}",
        ports=ports,
        grace=0.5,
        service_ttl=2,
    )


@pytest.fixture
async def service(mesh_config: MeshConfig) -> AsyncIterator[Callable[..., Awaitable[MeshServer]]]:
    started: list[MeshServer] = []

    async def start(kind: str, config: MeshConfig | None = None) -> MeshServer:
        server = await start_service(kind, _builder(kind), config or mesh_config, port=0)
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        await server.stop(0)


@pytest.fixture
async def local_mesh(mesh_config: MeshConfig) -> AsyncIterator[Callable[..., Awaitable[LocalMesh]]]:
    meshes: list[LocalMesh] = []

    async def start(**kwargs: object) -> LocalMesh:
        mesh = LocalMesh(replace(mesh_config), **kwargs)  # type: ignore[arg-type]
        meshes.append(mesh)
        await mesh.start()
        return mesh

    yield start
    for mesh in reversed(meshes):
        await mesh.stop()
