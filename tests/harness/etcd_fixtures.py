"""The session's etcd: one real etcd per test session, each test isolated by a key prefix."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from mabeam.embedded_etcd import EmbeddedEtcd
from mabeam.etcd import EtcdClient, connect


@pytest.fixture(scope="session")
async def etcd() -> AsyncIterator[EmbeddedEtcd]:
    server = EmbeddedEtcd(unsafe_no_fsync=True)
    await server.start()
    yield server
    await server.stop()
    server.cleanup()


@pytest.fixture(scope="session")
async def etcd_client(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdClient]:
    client = await connect([etcd.endpoint])
    yield client
    await client.close()


@pytest.fixture
def key_prefix() -> bytes:
    return f"/t/{uuid.uuid4().hex}/".encode()


@pytest.fixture
async def private_etcd() -> AsyncIterator[EmbeddedEtcd]:
    """An etcd of the test's own, for tests that stop, restart or freeze it."""
    server = EmbeddedEtcd(unsafe_no_fsync=True)
    await server.start()
    yield server
    await server.stop()
    server.cleanup()
