"""etcd's upkeep: auto-compaction and a quota on every etcd the mesh starts; NOSPACE seen and recovered.

* The embedded etcd (and compose's) runs with periodic auto-compaction and an
  explicit quota: etcd compacts by itself, and reports the quota it was given.
* A compaction under a running service: its watch-fed cache, whose watch
  resumes from a compacted revision, lists again and goes on.
* On a tiny quota: writes fill etcd until NOSPACE; SetVariable answers
  RESOURCE_EXHAUSTED naming the cause, the health name ``mabeam.store`` and
  ``mabeam status`` show the alarm while reads go on; ``mabeam maintenance
  compact``, ``defrag`` and ``disarm`` free the space, and the same service
  replica writes again and reports the store writable, never restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aetcd.exceptions
import aetcd.rpc
import grpc
import pytest
import yaml

from harness.cli import mabeam
from harness.mesh_fixtures import enrolled
from harness.wait import eventually
from mabeam import auth, errors
from mabeam.client import MeshClient
from mabeam.config import MeshConfig
from mabeam.health_check import check
from mabeam.runtime.auth import PrincipalStore
from mabeam.runtime.embedded_etcd import (
    DEFAULT_COMPACTION_RETENTION,
    DEFAULT_QUOTA_BYTES,
    SNAPSHOT_COUNT,
    EmbeddedEtcd,
    EtcdCluster,
    upkeep_args,
)
from mabeam.runtime.etcd import connect, maintenance
from mabeam.runtime.mesh import LocalMesh
from mabeam.server import MeshServer
from mabeam.v1 import common_pb2, orchestrator_pb2

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)
TINY_QUOTA = 2 * 1024 * 1024


def test_every_etcd_the_mesh_starts_has_upkeep_flags() -> None:
    argv = EmbeddedEtcd()._argv()
    joined = " ".join(argv)
    assert "--auto-compaction-mode periodic" in joined
    assert f"--auto-compaction-retention {DEFAULT_COMPACTION_RETENTION}" in joined
    assert f"--quota-backend-bytes {DEFAULT_QUOTA_BYTES}" in joined and DEFAULT_QUOTA_BYTES == 2 * 1024**3
    # A leader change must not reset the retention's expiry leases to their full TTL.
    assert "--experimental-enable-lease-checkpoint" in argv
    # Its raft log is held in memory until a snapshot: one every SNAPSHOT_COUNT entries bounds it.
    assert f"--snapshot-count {SNAPSHOT_COUNT}" in joined and SNAPSHOT_COUNT == 10_000
    cluster = EtcdCluster(3, quota_backend_bytes=TINY_QUOTA)
    assert all(f"--quota-backend-bytes {TINY_QUOTA}" in " ".join(m._argv()) for m in cluster.members)
    assert all("--experimental-enable-lease-checkpoint" in m._argv() for m in cluster.members)
    with pytest.raises(ValueError):
        upkeep_args(0)
    # compose's etcd: the same flags, the quota overridable by MABEAM_ETCD_QUOTA_BYTES.
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    command = compose["services"]["etcd"]["command"]
    assert "--auto-compaction-mode=periodic" in command
    assert f"--auto-compaction-retention={DEFAULT_COMPACTION_RETENTION}" in command
    assert f"--quota-backend-bytes=${{MABEAM_ETCD_QUOTA_BYTES:-{DEFAULT_QUOTA_BYTES}}}" in command
    assert "--experimental-enable-lease-checkpoint" in command
    assert f"--snapshot-count={SNAPSHOT_COUNT}" in command


def test_up_takes_a_quota() -> None:
    from mabeam.cli.main import build_parser, parse_bytes

    assert parse_bytes("2GiB") == DEFAULT_QUOTA_BYTES and parse_bytes("8MiB") == 8 * 1024**2
    assert parse_bytes("1000") == 1000
    for bad in ("", "-1", "2XB", "0"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    args = build_parser().parse_args(["up", "--etcd-quota-bytes", "64MiB"])
    assert args.etcd_quota_bytes == "64MiB"


async def test_local_mesh_gives_its_etcd_the_quota(mesh_config: MeshConfig, tmp_path: Path) -> None:
    """``mabeam up --etcd-quota-bytes`` goes to LocalMesh, which gives it to the etcd it starts."""
    config = dataclasses.replace(mesh_config, etcd_endpoints=(), auth=False, data_dir=tmp_path / "etcd")
    mesh = LocalMesh(
        config,
        services=(),
        etcd_client_port=0,
        etcd_peer_port=0,
        unsafe_no_fsync=True,
        etcd_quota_bytes=TINY_QUOTA,
    )
    try:
        await mesh.start()
        assert await maintenance.quota_bytes(mesh.etcd_endpoints[0]) == TINY_QUOTA
    finally:
        await mesh.stop()


async def test_the_embedded_etcd_compacts_by_itself_and_reports_its_quota() -> None:
    async with EmbeddedEtcd(
        unsafe_no_fsync=True, compaction_retention="1s", quota_backend_bytes=TINY_QUOTA
    ) as server:
        assert await maintenance.quota_bytes(server.endpoint) == TINY_QUOTA
        client = await connect([server.endpoint], timeout=5)
        try:
            first = await client.put(b"/upkeep/k", b"0")
            first_revision = int(first.header.revision)
            assert client.kvstub is not None
            kv = client.kvstub

            async def compacted() -> bool:
                await client.put(b"/upkeep/k", b"more")
                try:
                    await kv.Range(
                        aetcd.rpc.RangeRequest(key=b"/upkeep/k", revision=first_revision), timeout=5
                    )
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.OUT_OF_RANGE, exc
                    return True
                return False

            started = time.monotonic()
            await eventually(compacted, timeout=20, interval=0.1, what="etcd compacted by itself")
            print(f"auto-compaction (retention 1s) seen after {time.monotonic() - started:.2f} s")
        finally:
            await client.close()


class _Proxy:
    """A TCP proxy to etcd that a test can cut (every connection closed, new ones refused) and restore."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._cut = False
        self._conns: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._conns |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._conns -= {writer, up_writer}

    def cut(self) -> None:
        self._cut = True
        for w in list(self._conns):
            w.close()

    def restore(self) -> None:
        self._cut = False

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_a_cache_lists_again_when_its_watch_resumes_from_a_compacted_revision(
    private_etcd: EmbeddedEtcd,
    mesh_config: MeshConfig,
    service: Callable[..., Awaitable[MeshServer]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The orchestrator's principals cache: cut from etcd, a token minted and the history compacted
    meanwhile; once back, the cache's watch cannot resume, so it lists again and knows the token.
    An etcd of its own: compacting the session's would cut other tests' history."""
    caplog.set_level(logging.WARNING, logger="mabeam.runtime.cache")
    proxy = _Proxy("127.0.0.1", private_etcd.client_port)
    await proxy.start()
    direct = await connect([private_etcd.endpoint], timeout=5)
    try:
        await enrolled(dataclasses.replace(mesh_config, etcd_endpoints=(private_etcd.endpoint,)))
        config = dataclasses.replace(mesh_config, etcd_endpoints=(f"http://127.0.0.1:{proxy.port}",))
        orchestrator = await service("orchestrator", config)
        proxy.cut()
        _, token = await PrincipalStore(direct, mesh_config).mint("minted-while-cut", auth.OPERATOR)
        await maintenance.compact(direct)
        proxy.restore()

        async def token_accepted() -> bool:
            async with await MeshClient.connect(orchestrator=orchestrator.address, token=token) as client:
                try:
                    await client.orchestrator.ListVariables(orchestrator_pb2.ListVariablesRequest())
                except errors.Unauthenticated:
                    return False
            return True

        await eventually(token_accepted, timeout=20, interval=0.2, what="token minted while cut accepted")
        assert any("revision compacted; listing again" in r.getMessage() for r in caplog.records)
        # Every cache follows again (the bindings' too): the replica is SERVING, the store writable.
        await eventually(
            lambda: check(orchestrator.address, "mabeam.v1.OrchestratorService"), timeout=10, what="SERVING"
        )
        assert await check(orchestrator.address, maintenance.STORE_HEALTH)
    finally:
        await direct.close()
        await proxy.stop()


@pytest.fixture
async def tiny_etcd() -> AsyncIterator[EmbeddedEtcd]:
    """An etcd whose database may grow to 2 MiB: a dozen writes of 200 KB raise NOSPACE."""
    async with EmbeddedEtcd(unsafe_no_fsync=True, quota_backend_bytes=TINY_QUOTA) as server:
        yield server


async def test_nospace_is_visible_and_recovered_without_a_restart(
    tiny_etcd: EmbeddedEtcd,
    mesh_config: MeshConfig,
    service: Callable[..., Awaitable[MeshServer]],
) -> None:
    config = await enrolled(dataclasses.replace(mesh_config, etcd_endpoints=(tiny_etcd.endpoint,)))
    orchestrator = await service("orchestrator", config)
    address = orchestrator.address
    etcd_flags = ["--etcd", tiny_etcd.endpoint]
    status_flags = [
        "--orchestrator",
        address,
        *(arg for s in ("registry", "coordination", "planner") for arg in (f"--{s}", "127.0.0.1:9")),
        *etcd_flags,  # with --etcd, status also finds the services through etcd: the test's prefix
        "--prefix",
        config.prefix,
    ]
    assert await check(address, maintenance.STORE_HEALTH)
    # Fill etcd with overwrites of one key: the space goes to history, which compaction frees.
    # (Not with SetVariable: each call's idempotency record keeps its response, the
    # value included, as live data for 10 minutes, which no compaction frees.)
    filler = await connect([tiny_etcd.endpoint], timeout=10)
    writes = 0
    try:
        with pytest.raises(aetcd.exceptions.ClientError):
            for _ in range(100):
                await filler.put(f"{config.prefix}/filler".encode(), b"x" * 200_000)
                writes += 1
    finally:
        await filler.close()
    print(f"NOSPACE after {writes} writes of 200 KB on a {TINY_QUOTA} B quota")
    async with await MeshClient.connect(orchestrator=address) as client:
        with pytest.raises(errors.MabeamError) as caught:
            await client.orchestrator.SetVariable(
                orchestrator_pb2.SetVariableRequest(name="big", value=common_pb2.Value(string_value="v"))
            )
        err = caught.value
        assert isinstance(err, errors.ResourceExhausted), err
        assert err.reason == "STORE_EXHAUSTED" and "database space exceeded" in err.message
        assert "compact, defragment and disarm" in err.message

        # Visible: the store health name goes NOT_SERVING at once (the refused write asked for a check);
        # the replica itself stays SERVING and reads go on.
        await eventually(
            lambda: _not(check(address, maintenance.STORE_HEALTH)), timeout=5, what="store health NOT_SERVING"
        )
        assert await check(address, "mabeam.v1.OrchestratorService")
        listed = await client.orchestrator.ListVariables(orchestrator_pb2.ListVariablesRequest())
        assert list(listed.variables) == []

        code, out, err_text = await mabeam("status", *status_flags, "--json")
        assert out, err_text
        doc = json.loads(out)
        assert code == 1 and doc["etcd"]["nospace"], (out, err_text)
        assert doc["services"]["orchestrator"] == {
            "address": address,
            "serving": True,
            "store_writable": False,
        }
        member = doc["etcd"]["members"][0]
        # etcd raises NOSPACE when a write would take the database past its quota,
        # so the size shown may be just under it (2,039,808 of 2,097,152 B seen).
        assert member["quota"] == TINY_QUOTA and member["db_size"] > TINY_QUOTA // 2
        code, out, _ = await mabeam("status", *status_flags)
        assert "NOSPACE: writes refused" in out and "alarms: NOSPACE" in out, out
        code, out, _ = await mabeam("maintenance", "status", *etcd_flags)
        assert code == 1 and "NOSPACE" in out and "mabeam maintenance recover" in out, out
        print(out)

        # Recovery: compact, defragment, disarm; no restart.
        code, out, err_text = await mabeam("maintenance", "compact", *etcd_flags)
        assert code == 0 and "compacted up to revision" in out, err_text
        code, out, err_text = await mabeam("maintenance", "defrag", *etcd_flags)
        assert code == 0 and "defragmented" in out, err_text
        print(out.strip())
        code, out, err_text = await mabeam("maintenance", "disarm", *etcd_flags)
        assert code == 0 and "alarm NOSPACE of member" in out, (out, err_text)

        reply = await client.orchestrator.SetVariable(
            orchestrator_pb2.SetVariableRequest(name="after", value=common_pb2.Value(int_value=1))
        )
        assert reply.variable.version == 1
        started = time.monotonic()
        await eventually(
            lambda: check(address, maintenance.STORE_HEALTH), timeout=10, what="store health SERVING again"
        )
        print(f"store health SERVING again {time.monotonic() - started:.2f} s after the disarm")
        code, out, _ = await mabeam("status", *status_flags, "--json")
        doc = json.loads(out)
        assert not doc["etcd"]["nospace"] and doc["etcd"]["alarms"] == []
        assert doc["services"]["orchestrator"]["store_writable"] is True
        code, out, _ = await mabeam("maintenance", "status", *etcd_flags)
        assert code == 0 and "alarms: none" in out, out
    assert orchestrator.address == address  # the same replica, in this process, throughout


async def _not(probe: Awaitable[bool]) -> bool:
    return not await probe
