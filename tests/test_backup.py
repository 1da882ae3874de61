"""`mabeam backup` / `mabeam restore`: a populated mesh round-trips into an empty etcd."""

from __future__ import annotations

import base64
import json
import stat
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from google.protobuf import struct_pb2

from harness.cli import mabeam
from harness.wait import eventually
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient
from mabeam.config import MeshConfig
from mabeam.runtime.backup import NOT_RESTORED, RETAINED_KINDS, SECRET_KINDS
from mabeam.runtime.embedded_etcd import EmbeddedEtcd
from mabeam.runtime.etcd import EtcdClient, connect, snapshot
from mabeam.server import MeshServer
from mabeam.v1 import agent_pb2, common_pb2, coordination_pb2, orchestrator_pb2, planner_pb2, registry_pb2

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "examples" / "worker.py")
pytestmark = pytest.mark.timeout(90)


class Voter(Agent):
    capabilities = ("vote", "compute")

    async def coordinate(self, request: agent_pb2.CoordinationRequest) -> agent_pb2.CoordinationResponse:
        return agent_pb2.CoordinationResponse(vote=agent_pb2.Vote(option="yes"))

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> object:
        return {"ok": True}


async def durable(client: EtcdClient, prefix: str) -> dict[bytes, bytes]:
    """What a backup keeps: keys on no lease, and those of retained kinds on their expiry lease."""
    root = prefix.encode() + b"/"
    kvs, _ = await snapshot(client, root)
    return {
        bytes(kv.key)[len(root) :]: bytes(kv.value)
        for kv in kvs
        if not int(kv.lease) or bytes(kv.key)[len(root) :].split(b"/", 1)[0].decode() in RETAINED_KINDS
    }


def is_secret(relative_key: bytes) -> bool:
    return relative_key.split(b"/", 1)[0].decode() in SECRET_KINDS


async def test_backup_and_restore_round_trip(
    service: Callable[..., Awaitable[MeshServer]],
    mesh_config: MeshConfig,
    etcd_client: EtcdClient,
    tmp_path: Path,
) -> None:
    servers = {k: await service(k) for k in ("registry", "orchestrator", "coordination", "planner")}
    host = AgentHost([Voter("v1"), Voter("v2")], registry=servers["registry"].address)
    await host.start()
    client = await MeshClient.connect(**{k: s.address for k, s in servers.items()})  # type: ignore[arg-type]
    try:
        await client.orchestrator.SetVariable(
            orchestrator_pb2.SetVariableRequest(name="cfg/t", value=common_pb2.Value(number_value=21))
        )
        params = struct_pb2.Struct()
        params.update({"question": "go?"})
        await client.orchestrator.BindVariable(
            orchestrator_pb2.BindVariableRequest(
                binding=orchestrator_pb2.OrchestrationBinding(
                    variable="cfg/go",
                    protocol="consensus",
                    parameters=params,
                    participants=common_pb2.AgentSelector(capability="vote"),
                )
            )
        )
        await client.orchestrator.CoordinateVariable(
            orchestrator_pb2.CoordinateVariableRequest(variable="cfg/go")
        )
        await client.coordination.RunConsensus(
            coordination_pb2.RunConsensusRequest(
                settings=coordination_pb2.SessionSettings(
                    participants=common_pb2.AgentSelector(capability="vote")
                ),
                question="q",
                rule=coordination_pb2.CONSENSUS_RULE_MAJORITY,
            )
        )
        goal = planner_pb2.GoalSpec(steps=[planner_pb2.StepSpec(step_id="s", capability="compute")])
        [e async for e in client.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal=goal))]
        # A supervised agent stopped (its record outlives it on its expiry lease, its token digests
        # deleted) and one running (its token digests are secrets; the registry stops it at the end).
        launch = registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=[sys.executable, WORKER]))
        await client.registry.StartAgent(registry_pb2.StartAgentRequest(agent_id="b-sup", launch=launch))
        await client.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id="b-sup"))
        started = await client.registry.StartAgent(
            registry_pb2.StartAgentRequest(agent_id="b-live", launch=launch)
        )
    finally:
        await client.close()
        await host.stop()
    endpoint = mesh_config.etcd_endpoints[0]
    backup = tmp_path / "mesh.json"
    code, _, err = await mabeam("backup", str(backup), "--etcd", endpoint, "--prefix", mesh_config.prefix)
    assert code == 0, err
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    text = backup.read_text()
    doc = json.loads(text)
    assert doc["format"] == "mabeam-backup" and doc["version"] == 2
    assert {"vars", "bindings", "sessions", "session-rounds", "goals", "goal-steps", "goal-events"} <= set(
        doc["counts"]
    )
    assert "supervised" in doc["counts"] and not SECRET_KINDS & set(doc["counts"])
    everything = await durable(etcd_client, mesh_config.prefix)
    secrets = {v for k, v in everything.items() if is_secret(k)}
    assert {b"supervised-tokens", b"process-tokens"} <= {k.split(b"/", 1)[0] for k in everything}
    # No token and no token digest is in the file, neither as written nor in the base64 values.
    values = [base64.b64decode(e["value"]) for e in doc["keys"]]
    for secret in [*secrets, started.token.encode()]:
        assert secret.decode() not in text and not any(secret in v for v in values)
    assert not any(is_secret(e["key"].encode()) for e in doc["keys"])
    original = {k: v for k, v in everything.items() if not is_secret(k)}
    assert len(doc["keys"]) == len(original)

    async with EmbeddedEtcd(unsafe_no_fsync=True) as fresh:
        code, out, err = await mabeam(
            "restore", str(backup), "--etcd", fresh.endpoint, "--prefix", "/restored"
        )
        assert code == 0, err
        assert NOT_RESTORED in out.splitlines()
        other = await connect([fresh.endpoint])
        try:
            assert await durable(other, "/restored") == original
        finally:
            await other.close()
        code, _, err = await mabeam("restore", str(backup), "--etcd", fresh.endpoint, "--prefix", "/restored")
        assert code == 2 and "already holds" in err


async def test_restore_refuses_what_is_not_a_backup(tmp_path: Path, etcd: EmbeddedEtcd) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    code, _, err = await mabeam("restore", str(bad), "--etcd", etcd.endpoint, "--prefix", "/nothing-here")
    assert code == 2 and "not a mabeam backup" in err and "Traceback" not in err


async def test_readme_backup_commands(etcd: EmbeddedEtcd, tmp_path: Path) -> None:
    import shlex

    lines = [
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith(("mabeam backup", "mabeam restore"))
    ]
    assert [line.split()[1] for line in lines] == ["backup", "restore"]
    async with EmbeddedEtcd(unsafe_no_fsync=True) as fresh:
        for line in lines:
            line = line.replace("http://127.0.0.1:2379", etcd.endpoint).replace(
                "http://127.0.0.1:2479", fresh.endpoint
            )
            args = [str(tmp_path / a) if a.endswith(".json") else a for a in shlex.split(line)[1:]]
            code, out, err = await mabeam(*args)
            assert code == 0, f"{line}: {out}{err}"


async def test_retained_objects_keep_their_remaining_time_to_live_through_a_restore(
    service: Callable[..., Awaitable[MeshServer]],
    mesh_config: MeshConfig,
    etcd_client: EtcdClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stopped supervised record on a short retention is backed up with its TTL, restored into a
    fresh prefix on a lease of that TTL, and expires there; a version 1 file is still read."""
    monkeypatch.setenv("MABEAM_SUPERVISED_RETENTION", "6s")
    registry = await service("registry")
    client = await MeshClient.connect(registry=registry.address)
    try:
        launch = registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=[sys.executable, WORKER]))
        await client.registry.StartAgent(registry_pb2.StartAgentRequest(agent_id="kept", launch=launch))
        await client.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id="kept"))
    finally:
        await client.close()
    endpoint = mesh_config.etcd_endpoints[0]
    backup = tmp_path / "mesh.json"
    code, _, err = await mabeam("backup", str(backup), "--etcd", endpoint, "--prefix", mesh_config.prefix)
    assert code == 0, err
    doc = json.loads(backup.read_text())
    record = next(e for e in doc["keys"] if e["key"] == "supervised/kept")
    assert 0 < record["ttl"] <= 7, record  # period 6 s + bucket 1 s, less the time gone by
    assert {"supervised-stopped", "supervised-stopped-at"} <= set(doc["counts"])
    assert all("ttl" not in e for e in doc["keys"] if not e["key"].startswith("supervised"))

    restored = f"{mesh_config.prefix}-restored"
    code, _, err = await mabeam("restore", str(backup), "--etcd", endpoint, "--prefix", restored)
    assert code == 0, err
    key = f"{restored}/supervised/kept".encode()
    got = await etcd_client.get(key)
    assert got is not None and int(got.lease)
    left = int((await etcd_client.get_lease_info(int(got.lease), keys=False)).TTL)
    assert 0 < left <= record["ttl"]

    async def expired() -> bool:
        kvs, _ = await snapshot(etcd_client, f"{restored}/supervised".encode())
        return not kvs

    await eventually(expired, timeout=record["ttl"] + 5, what="the restored stopped record expired")

    # Version 1 (no ttl) is still read: its keys are kept for good.
    old = dict(doc, version=1, keys=[{"key": "vars/x", "value": base64.b64encode(b"1").decode()}])
    v1 = tmp_path / "v1.json"
    v1.write_text(json.dumps(old))
    code, _, err = await mabeam("restore", str(v1), "--etcd", endpoint, "--prefix", f"{restored}-v1")
    assert code == 0, err
    got = await etcd_client.get(f"{restored}-v1/vars/x".encode())
    assert got is not None and bytes(got.value) == b"1" and not int(got.lease)
    for prefix in (restored, f"{restored}-v1"):
        await etcd_client.delete_prefix(f"{prefix}/".encode())
