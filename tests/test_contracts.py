"""The contracts: buf lint is clean, generated code is fresh, every named RPC exists."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool

import mabeam.v1  # noqa: F401  (registers the descriptors)
from mabeam.v1 import (
    agent_pb2,
    coordination_pb2,
    orchestrator_pb2,
    planner_pb2,
    protocol_plugin_pb2,
    registry_pb2,
)

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / "node_modules" / ".bin" / "buf"

# docs/design.md fixes these names; clients, docs and external checks rely on them.
REQUIRED_RPCS = {
    "mabeam.v1.AgentService": [
        "Coordinate",
        "CoordinateBatch",
        "ExecuteStep",
        "ExportState",
        "ImportState",
    ],
    "mabeam.v1.RegistryService": [
        "RegisterAgent",
        "Heartbeat",
        "DeregisterAgent",
        "GetAgent",
        "ListAgents",
        "WatchAgents",
        "StartAgent",
        "StopAgent",
        "RestartAgent",
        "MigrateAgent",
    ],
    "mabeam.v1.OrchestratorService": [
        "SetVariable",
        "GetVariable",
        "ListVariables",
        "DeleteVariable",
        "WatchVariables",
        "BindVariable",
        "CoordinateVariable",
        "CoordinateSystem",
    ],
    "mabeam.v1.CoordinationService": [
        "RunAuction",
        "RunMarket",
        "RunConsensus",
        "Run",
        "RegisterProtocol",
        "ListProtocols",
        "UnregisterProtocol",
        "GetSession",
        "ListSessions",
        "WatchSession",
    ],
    "mabeam.v1.PlannerService": ["SubmitGoal", "ExecuteGoal", "GetGoal", "ListGoals", "CancelGoal"],
}


def _buf() -> str:
    if BUF.exists():
        return str(BUF)
    found = shutil.which("buf")
    if found is None:
        pytest.fail("buf is not installed: run `npm ci` in the repository (`.ci/run` does)")
    return found


def test_buf_lint_is_clean() -> None:
    result = subprocess.run([_buf(), "lint"], cwd=ROOT / "proto", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_catches_an_undocumented_field(tmp_path: Path) -> None:
    # The lint config must really enforce comments: an undocumented field fails.
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    target = tmp_path / "proto" / "mabeam" / "v1" / "common.proto"
    target.write_text(
        target.read_text().replace(
            "message Resources {", "message Resources {\n  string x_undocumented = 99;", 1
        )
    )
    result = subprocess.run([_buf(), "lint"], cwd=tmp_path / "proto", capture_output=True, text=True)
    assert result.returncode != 0
    assert "x_undocumented" in result.stdout + result.stderr


def test_generated_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_named_rpc_exists() -> None:
    pool = descriptor_pool.Default()
    for service, rpcs in REQUIRED_RPCS.items():
        desc = pool.FindServiceByName(service)
        names = {m.name for m in desc.methods}
        missing = set(rpcs) - names
        assert not missing, f"{service} lacks {sorted(missing)}"


def test_coordinate_keeps_its_established_message_names() -> None:
    method = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].methods_by_name["Coordinate"]
    assert method.input_type.full_name == "mabeam.v1.CoordinationRequest"
    assert method.output_type.full_name == "mabeam.v1.CoordinationResponse"


def test_other_rpcs_have_their_own_request_and_response() -> None:
    seen: dict[str, str] = {}
    for module in (
        registry_pb2,
        orchestrator_pb2,
        coordination_pb2,
        planner_pb2,
        protocol_plugin_pb2,
    ):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                assert m.input_type.name == f"{m.name}Request", m.full_name
                assert m.output_type.name == f"{m.name}Response", m.full_name
                for t in (m.input_type.full_name, m.output_type.full_name):
                    assert t not in seen, f"{t} used by {seen.get(t)} and {m.full_name}"
                    seen[t] = m.full_name
