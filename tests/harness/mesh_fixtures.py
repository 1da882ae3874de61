"""Fixtures that run mabeam services on free loopback ports against the session etcd.

* ``mesh_config``: a MeshConfig for the session etcd with a key prefix unique
  to the test, so tests never see each other's state.
* ``service``: a factory starting a service in-process (fast; the same
  ``start_service`` the entry points use) and stopping it after the test.
* ``coordination_mesh``: a registry and coordination in-process, and a client
  of both (with the registry's server).
* ``planner_mesh``: a registry, coordination and planner in-process, and a
  client of the registry and planner (with the registry's server).
* ``local_mesh``: a factory for a LocalMesh (services as subprocesses).

A dead endpoint is :func:`harness.ports.closed_port`; a port picked free for a
process to bind later may be taken meanwhile (see ``harness/ports.py``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from harness.channels import SERVICE_TOKEN_ENV
from mabeam.auth import read_token_file
from mabeam.client import MeshClient
from mabeam.config import SERVICES, MeshConfig
from mabeam.runtime.auth import bootstrap
from mabeam.runtime.etcd import connect
from mabeam.runtime.mesh import LocalMesh
from mabeam.runtime.service import start_service
from mabeam.server import MeshServer


def _builder(kind: str) -> Callable[..., Awaitable[None]]:
    import importlib

    return importlib.import_module(f"mabeam.services.{kind}.server").build  # type: ignore[no-any-return]


async def enrolled(config: MeshConfig) -> MeshConfig:
    """``config`` (a test's mesh moved to another etcd) with the test's tokens known to that etcd too."""
    import os

    from mabeam import auth
    from mabeam.runtime.auth import enroll

    client = await connect(config.etcd_endpoints, tls=config.etcd_tls)
    try:
        if config.token:
            await enroll(client, config, config.token, auth.SERVICE, "service-bootstrap")
        admin = os.environ.get("MABEAM_TOKEN")
        if admin:
            await enroll(client, config, admin, auth.ADMIN, "admin-bootstrap")
    finally:
        await client.close()
    return config


@pytest.fixture
async def mesh_config(etcd: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MeshConfig:
    """A mesh of its own (a fresh key prefix) with auth on, as users get it.

    Its admin and service tokens are minted as ``mabeam up`` does (into
    ``data_dir``); the services present the service token, and the test's
    own clients (and the processes it starts) the admin token, from
    ``$MABEAM_TOKEN``.
    """
    endpoint = etcd.endpoint  # type: ignore[attr-defined]
    ports = {s: 0 for s in SERVICES}
    config = MeshConfig(
        etcd_endpoints=(endpoint,),
        prefix=f"/t/{uuid.uuid4().hex[:12]}",
        ports=ports,
        grace=0.5,
        service_ttl=2,
        data_dir=tmp_path / "data",
    )
    client = await connect(config.etcd_endpoints)
    try:
        credentials = await bootstrap(client, config, config.data_dir)
    finally:
        await client.close()
    monkeypatch.setenv("MABEAM_TOKEN", read_token_file(credentials.admin_file))
    monkeypatch.delenv("MABEAM_TOKEN_FILE", raising=False)
    service_token = read_token_file(credentials.service_file)
    # For tests that call agents as the mesh does (harness.channels.agent_channel).
    monkeypatch.setenv(SERVICE_TOKEN_ENV, service_token)
    return replace(config, token=service_token)


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
async def coordination_mesh(
    service: Callable[..., Awaitable[MeshServer]],
) -> AsyncIterator[tuple[MeshClient, MeshServer]]:
    """A registry and a coordination service in-process; a client of both, and the registry's server."""
    registry = await service("registry")
    coordination = await service("coordination")
    client = await MeshClient.connect(registry=registry.address, coordination=coordination.address)
    yield client, registry
    await client.close()


@pytest.fixture
async def planner_mesh(
    service: Callable[..., Awaitable[MeshServer]],
) -> AsyncIterator[tuple[MeshClient, MeshServer]]:
    """A registry, a coordination service and a planner in-process; a client of the registry and
    the planner, and the registry's server."""
    registry = await service("registry")
    await service("coordination")
    planner = await service("planner")
    client = await MeshClient.connect(registry=registry.address, planner=planner.address)
    yield client, registry
    await client.close()


@pytest.fixture
async def local_mesh(
    mesh_config: MeshConfig, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Awaitable[LocalMesh]]]:
    meshes: list[LocalMesh] = []

    async def start(**kwargs: object) -> LocalMesh:
        mesh = LocalMesh(replace(mesh_config), **kwargs)  # type: ignore[arg-type]
        meshes.append(mesh)
        await mesh.start()
        return mesh

    yield start
    if getattr(request.node, "failed_call", False):  # what each replica waits on, in its log
        for mesh in meshes:
            await mesh.dump_tasks()
    for mesh in reversed(meshes):
        await mesh.stop()
