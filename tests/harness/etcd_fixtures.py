"""The session's etcd: one real etcd per test session, each test isolated by a key prefix.

A pytest plugin (``pytest_plugins = ["harness.etcd_fixtures"]``). Tests that
stop, restart, freeze or kill etcd take :func:`private_etcd` (or make their
own :class:`EmbeddedEtcd`), never the shared one.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from mabeam.runtime.embedded_etcd import EmbeddedEtcd
from mabeam.runtime.etcd import EtcdClient, connect


@pytest.fixture(scope="session")
async def etcd(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedEtcd]:
    """One etcd for the whole session; fsync off, since its data dies with the session anyway.

    Its log is kept under the session's base temporary directory
    (``session-etcd.log``), so that an etcd that died mid-session can be read about afterwards.
    """
    log_file = tmp_path_factory.getbasetemp() / "session-etcd.log"
    async with EmbeddedEtcd(unsafe_no_fsync=True, log_file=log_file) as server:
        yield server


@pytest.fixture(scope="session")
async def etcd_client(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdClient]:
    """A client of the session's etcd, shared by every test (close nothing on it)."""
    client = await connect([etcd.endpoint], timeout=10)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def key_prefix() -> bytes:
    """A key prefix of the test's own, ``/t/<uuid>/``: tests share etcd, never keys."""
    return f"/t/{uuid.uuid4().hex}/".encode()


@pytest.fixture
async def private_etcd() -> AsyncIterator[EmbeddedEtcd]:
    """An etcd of the test's own, for tests that stop, restart or freeze it."""
    async with EmbeddedEtcd(unsafe_no_fsync=True) as server:
        yield server
