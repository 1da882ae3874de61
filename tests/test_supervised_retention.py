"""Retention of stopped supervised records, on a real etcd and a real registry.

* A record that stops (StopAgent) or fails (restart intensity exceeded) is
  readable right after, on the "supervised" expiry lease with its index
  entries, its token digests gone; then every key of it is gone within the
  period + a bucket, and StopAgent of its id is NOT_FOUND naming the
  retention. A running agent's record is never touched.
* StartAgent of a stopped record puts it again without the lease, out of the
  index, with new tokens: it outlives a record stopped after it.
* With a count cap of N, after N + k records stopped, exactly the N newest
  are left, and the running one stays.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from harness.wait import eventually
from mabeam import errors
from mabeam.client import MeshClient
from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient
from mabeam.server import MeshServer
from mabeam.services.registry import store as registry_store
from mabeam.services.registry import supervisor as supervision
from mabeam.v1 import registry_pb2

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "examples" / "worker.py")

pytestmark = pytest.mark.timeout(120)

KINDS = ("supervised", "supervised-stopped", "supervised-stopped-at", "supervised-tokens", "process-tokens")


def worker() -> registry_pb2.LaunchSpec:
    return registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=[sys.executable, WORKER]))


async def keys_of(etcd_client: EtcdClient, config: MeshConfig, agent_id: str) -> dict[str, int]:
    """Every key of ``agent_id`` under the supervision kinds, relative to the prefix -> its lease."""
    root = config.prefix.rstrip("/") + "/"
    found = {}
    for kind in KINDS:
        for kv in await etcd_client.get_prefix(f"{root}{kind}/".encode()):
            relative = bytes(kv.key)[len(root) :].decode()
            if relative.endswith("/" + agent_id):
                found[relative] = int(kv.lease)
    return found


async def start(client: MeshClient, agent_id: str, **kw: Any) -> registry_pb2.SupervisedAgent:
    request = registry_pb2.StartAgentRequest(agent_id=agent_id, launch=worker(), **kw)
    return (await client.registry.StartAgent(request)).agent


async def stop(client: MeshClient, agent_id: str) -> registry_pb2.SupervisedAgent:
    return (await client.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id=agent_id))).agent


async def listed(client: MeshClient) -> dict[str, registry_pb2.SupervisedAgent]:
    page = await client.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest(page_size=100))
    return {a.agent_id: a for a in page.agents}


@pytest.fixture
async def registry_with(
    service: Callable[..., Awaitable[MeshServer]], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Awaitable[MeshClient]]]:
    clients: list[MeshClient] = []

    async def make(**env: str) -> MeshClient:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        registry = await service("registry")
        mesh = await MeshClient.connect(registry=registry.address)
        clients.append(mesh)
        return mesh

    yield make
    for mesh in clients:
        await mesh.close()


async def test_stopped_and_failed_records_expire_whole_and_running_ones_stay(
    registry_with: Callable[..., Awaitable[MeshClient]], etcd_client: EtcdClient, mesh_config: MeshConfig
) -> None:
    client = await registry_with(MABEAM_SUPERVISED_RETENTION="2s")  # bucket 1 s
    await start(client, "keeps-running")
    await start(client, "w1")
    assert set(await keys_of(etcd_client, mesh_config, "w1")) == {
        "supervised/w1",
        "supervised-tokens/w1",
        "process-tokens/w1",
    }
    stopped = await stop(client, "w1")
    assert stopped.state == registry_pb2.SUPERVISION_STATE_STOPPED
    # Readable right after, on one expiry lease with its index entries; no credential left (the
    # key layout of store.py's table).
    assert (await listed(client))["w1"].state == registry_pb2.SUPERVISION_STATE_STOPPED
    layout = await keys_of(etcd_client, mesh_config, "w1")
    assert {k.split("/", 1)[0] for k in layout} == {
        "supervised",
        "supervised-stopped",
        "supervised-stopped-at",
    }
    assert len(set(layout.values())) == 1 and 0 not in layout.values(), layout
    entry = next(k for k in layout if k.startswith("supervised-stopped/"))
    order = int(entry.split("/")[1])
    assert len(entry.split("/")[1]) == 20 and 0 < order < registry_store.STOP_ORDER
    for row in ("P/supervised-stopped/<t>/<id>", "P/supervised-stopped-at/<id>", "expiry lease"):
        assert row in (registry_store.__doc__ or "")

    # A record that fails (restart intensity exceeded) is finished too.
    crash = registry_pb2.LaunchSpec(
        command=registry_pb2.Command(argv=[sys.executable, "-c", "raise SystemExit(3)"])
    )
    with pytest.raises(errors.FailedPrecondition):
        await client.registry.StartAgent(
            registry_pb2.StartAgentRequest(
                agent_id="crashes", launch=crash, restart_policy=registry_pb2.RestartPolicy(max_restarts=0)
            )
        )
    failed = await keys_of(etcd_client, mesh_config, "crashes")
    assert "supervised/crashes" in failed and 0 not in failed.values(), failed

    async def gone(agent_id: str) -> bool:
        return not await keys_of(etcd_client, mesh_config, agent_id)

    # Period 2 s + bucket 1 s + slack.
    await eventually(lambda: gone("w1"), timeout=8, what="every key of the stopped w1 deleted")
    await eventually(lambda: gone("crashes"), timeout=8, what="every key of the failed record deleted")
    with pytest.raises(errors.NotFound) as caught:
        await stop(client, "w1")
    assert "supervised agent 'w1' not found" in caught.value.message
    assert "more than 2 s ago (retention)" in caught.value.message
    # The running agent is untouched: no lease on its record, its tokens kept.
    running = await keys_of(etcd_client, mesh_config, "keeps-running")
    assert running == {
        "supervised/keeps-running": 0,
        "supervised-tokens/keeps-running": 0,
        "process-tokens/keeps-running": 0,
    }
    assert (await listed(client))["keeps-running"].state == registry_pb2.SUPERVISION_STATE_RUNNING
    await stop(client, "keeps-running")


async def test_a_stopped_record_started_again_is_kept_with_new_tokens(
    registry_with: Callable[..., Awaitable[MeshClient]], etcd_client: EtcdClient, mesh_config: MeshConfig
) -> None:
    client = await registry_with(MABEAM_SUPERVISED_RETENTION="4s")
    first_token = (
        await client.registry.StartAgent(registry_pb2.StartAgentRequest(agent_id="again", launch=worker()))
    ).token
    await stop(client, "again")
    assert {k.split("/", 1)[0] for k in await keys_of(etcd_client, mesh_config, "again")} == {
        "supervised",
        "supervised-stopped",
        "supervised-stopped-at",
    }
    # RestartAgent of a stopped record is refused; StartAgent starts it again.
    with pytest.raises(errors.FailedPrecondition, match="StartAgent"):
        await client.registry.RestartAgent(registry_pb2.RestartAgentRequest(agent_id="again"))
    answer = await client.registry.StartAgent(
        registry_pb2.StartAgentRequest(agent_id="again", launch=worker())
    )
    assert answer.agent.state == registry_pb2.SUPERVISION_STATE_RUNNING and answer.token != first_token
    restarted = await keys_of(etcd_client, mesh_config, "again")
    assert restarted == {"supervised/again": 0, "supervised-tokens/again": 0, "process-tokens/again": 0}
    # A record stopped after it expires; the restarted one is still there (no lease, no index entry).
    await start(client, "sentinel")
    await stop(client, "sentinel")

    async def sentinel_gone() -> bool:
        return not await keys_of(etcd_client, mesh_config, "sentinel")

    await eventually(sentinel_gone, timeout=12, what="the sentinel expired")
    assert await keys_of(etcd_client, mesh_config, "again") == restarted
    assert (await listed(client))["again"].state == registry_pb2.SUPERVISION_STATE_RUNNING
    await stop(client, "again")


async def test_a_count_cap_keeps_the_newest_stopped_records_and_every_running_one(
    registry_with: Callable[..., Awaitable[MeshClient]],
    etcd_client: EtcdClient,
    mesh_config: MeshConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervision, "PRUNE_INTERVAL_S", 0.3)
    # Kept for good, at most 2: only the cap deletes.
    client = await registry_with(MABEAM_SUPERVISED_RETENTION="0", MABEAM_SUPERVISED_RETENTION_COUNT="2")
    await start(client, "runner")
    crash = registry_pb2.LaunchSpec(
        command=registry_pb2.Command(argv=[sys.executable, "-c", "raise SystemExit(3)"])
    )
    names = [f"old-{i}" for i in range(5)]
    for name in names:  # one after another: each stops after the one before
        with pytest.raises(errors.FailedPrecondition):
            await client.registry.StartAgent(
                registry_pb2.StartAgentRequest(
                    agent_id=name, launch=crash, restart_policy=registry_pb2.RestartPolicy(max_restarts=0)
                )
            )

    async def only_the_newest() -> bool:
        now = await listed(client)
        return set(now) == {"runner", *names[-2:]}

    await eventually(
        only_the_newest, timeout=10, what="the 2 newest stopped records and the running one left"
    )
    for name in names[:3]:
        assert await keys_of(etcd_client, mesh_config, name) == {}
    for name in names[-2:]:
        kinds = {k.split("/", 1)[0] for k in await keys_of(etcd_client, mesh_config, name)}
        assert kinds == {"supervised", "supervised-stopped", "supervised-stopped-at"}
    root = mesh_config.prefix.rstrip("/") + "/"
    assert len(await etcd_client.get_prefix(f"{root}supervised-stopped/".encode())) == 2
    assert (await listed(client))["runner"].state == registry_pb2.SUPERVISION_STATE_RUNNING
    await stop(client, "runner")
