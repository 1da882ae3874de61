"""A planner that starts what it needs (issue 16, point 2).

A goal with ``may_start_agents`` whose step needs a capability no live agent
offers, but which a kind of the registry's launch catalog provides, makes the
planner start one (StartAgent with its service credentials), run the step on
it, and stop it after the idle time. Real etcd, real registry (with a strict
catalog: no --allow-argv), coordination and planner; the agent is the real
examples/worker.py process.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.wait import eventually
from mabeam import errors
from mabeam.agent import from_value, to_value
from mabeam.client import MeshClient
from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient
from mabeam.runtime.mesh import LocalMesh
from mabeam.server import MeshServer
from mabeam.services.planner.launcher import idle_seconds
from mabeam.v1 import auth_pb2, planner_pb2, registry_pb2

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "examples" / "worker.py")
IDLE_S = 1.5

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def mesh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, service: Callable[..., Awaitable[MeshServer]]
) -> AsyncIterator[Mesh]:
    catalog = tmp_path / "agents.yaml"
    # The kind is named like the capability it provides (examples/worker.py offers "compute").
    catalog.write_text(json.dumps({"compute": {"argv": [sys.executable, WORKER], "allowed_args": []}}))
    monkeypatch.delenv("MABEAM_ALLOW_ARGV", raising=False)
    monkeypatch.setenv("MABEAM_AGENT_CATALOG", str(catalog))
    monkeypatch.setenv("MABEAM_PLANNER_AGENT_IDLE", str(IDLE_S))
    registry = await service("registry")
    await service("coordination")
    planner = await service("planner")
    client = await MeshClient.connect(registry=registry.address, planner=planner.address)
    yield Mesh(client, registry.address, planner.address)
    await client.close()


@dataclass
class Mesh:
    client: MeshClient
    registry: str
    planner: str


def goal(may_start: bool) -> planner_pb2.GoalSpec:
    return planner_pb2.GoalSpec(
        name="needs-compute",
        may_start_agents=may_start,
        steps=[
            planner_pb2.StepSpec(step_id="a", capability="compute", input=to_value([1, 2])),
            planner_pb2.StepSpec(step_id="b", capability="compute", input=to_value(10), depends_on=["a"]),
        ],
    )


async def listed(client: MeshClient, capability: str) -> list[str]:
    reply = await client.registry.ListAgents(registry_pb2.ListAgentsRequest(capability=capability))
    return [a.agent_id for a in reply.agents]


async def test_a_goal_that_may_gets_an_agent_started_used_and_stopped_when_idle(mesh: Mesh) -> None:
    client = mesh.client
    assert await listed(client, "compute") == []
    events = [
        e async for e in client.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal=goal(may_start=True)))
    ]
    got = (await client.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=events[0].goal_id))).goal
    assert got.state == planner_pb2.GOAL_STATE_SUCCEEDED, got.error
    # One agent was started (both steps used it), recorded in the goal and as an event.
    (agent_id,) = got.plan.started_agents
    assert agent_id.startswith("compute-")
    started = [e for e in events if e.type == planner_pb2.GOAL_EVENT_TYPE_AGENT_STARTED]
    assert [(e.agent_id, e.step_id) for e in started] == [(agent_id, "a")]
    assert [s.agent_id for s in got.steps] == [agent_id, agent_id]
    assert from_value(got.steps[1].output) == {"sum": 13.0, "agent": agent_id}
    # It is a supervised agent of the catalog's kind, started by the planner's service identity.
    supervised = await client.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
    (record,) = [a for a in supervised.agents if a.agent_id == agent_id]
    assert record.launch.kind == "compute"
    assert record.restart_policy.strategy == registry_pb2.RESTART_STRATEGY_TEMPORARY

    # Idle for IDLE_S: the planner stops it, and it leaves the listing.
    async def gone() -> bool:
        return agent_id not in await listed(client, "compute")

    await eventually(gone, timeout=IDLE_S + 10)


async def test_without_may_start_agents_the_goal_is_refused_as_before(mesh: Mesh) -> None:
    client = mesh.client
    with pytest.raises(errors.FailedPrecondition, match=r"'compute'.*no live agent"):
        await client.planner.SubmitGoal(planner_pb2.SubmitGoalRequest(goal=goal(may_start=False)))
    # A capability the catalog lacks is refused even when the goal may start agents.
    spec = goal(may_start=True)
    spec.steps[1].capability = "teleport"
    with pytest.raises(errors.FailedPrecondition, match="'teleport'"):
        await client.planner.SubmitGoal(planner_pb2.SubmitGoalRequest(goal=spec))
    assert await listed(client, "compute") == []


async def test_only_an_admin_may_let_a_goal_start_agents(mesh: Mesh) -> None:
    created = await mesh.client.auth.CreateToken(
        auth_pb2.CreateTokenRequest(name="ops", role=auth_pb2.ROLE_OPERATOR)
    )
    operator = await MeshClient.connect(registry=mesh.registry, planner=mesh.planner, token=created.token)
    try:
        with pytest.raises(errors.PermissionDenied, match=r"goal\.may_start_agents"):
            await operator.planner.SubmitGoal(planner_pb2.SubmitGoalRequest(goal=goal(may_start=True)))
        # Without the field, the operator's goal passes the boundary (and is refused later: no agent).
        with pytest.raises(errors.FailedPrecondition, match="'compute'"):
            await operator.planner.SubmitGoal(planner_pb2.SubmitGoalRequest(goal=goal(may_start=False)))
    finally:
        await operator.close()
    assert await listed(mesh.client, "compute") == []


def test_the_idle_time_setting() -> None:
    assert idle_seconds({}) == 60.0
    assert idle_seconds({"MABEAM_PLANNER_AGENT_IDLE": "2.5"}) == 2.5
    assert idle_seconds({"MABEAM_PLANNER_AGENT_IDLE": "9"}, "3") == 3.0
    with pytest.raises(Exception, match=r"MABEAM_PLANNER_AGENT_IDLE.*not a number"):
        idle_seconds({"MABEAM_PLANNER_AGENT_IDLE": "soon"})
    with pytest.raises(Exception, match="outside"):
        idle_seconds({"MABEAM_PLANNER_AGENT_IDLE": "0"})


@pytest.mark.slow
async def test_the_agents_of_a_planner_replica_that_dies_are_stopped_by_another(
    tmp_path: Path,
    local_mesh: Callable[..., Awaitable[LocalMesh]],
    etcd_client: EtcdClient,
    mesh_config: MeshConfig,
) -> None:
    catalog = tmp_path / "agents.yaml"
    catalog.write_text(json.dumps({"compute": {"argv": [sys.executable, WORKER]}}))
    mesh = await local_mesh(
        services=("registry", "coordination", "planner"),
        replicas=2,
        extra_env={
            "MABEAM_SERVICE_TTL": "2",
            "MABEAM_AGENT_CATALOG": str(catalog),
            "MABEAM_PLANNER_AGENT_IDLE": "3",
        },
    )
    registry = mesh.addresses("registry")
    planners = [p for p in mesh.processes if p.kind == "planner"]
    client = await MeshClient.connect(registry=registry, planner=[p.address for p in planners])
    try:
        spec = planner_pb2.GoalSpec(
            may_start_agents=True,
            steps=[planner_pb2.StepSpec(step_id="a", capability="compute", input=to_value(1))],
        )
        events = [e async for e in client.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal=spec))]
        assert events[-1].goal_state == planner_pb2.GOAL_STATE_SUCCEEDED, events[-1].error
        (agent_id,) = [e.agent_id for e in events if e.type == planner_pb2.GOAL_EVENT_TYPE_AGENT_STARTED]
        # The replica that keeps it is named by its claim; it dies before the idle time is up.
        claim = await etcd_client.get(mesh_config.key("planner-agent-claims") + b"/" + agent_id.encode())
        assert claim is not None
        keeper = next(p for p in planners if f"-{p.pid}-" in claim.value.decode())
        keeper.proc.send_signal(signal.SIGKILL)
        keeper.proc.wait()
        assert agent_id in await listed(client, "compute")

        # The other replica adopts it once the claim's lease lapsed, and stops it after the idle time.
        async def gone() -> bool:
            return agent_id not in await listed(client, "compute")

        await eventually(gone, timeout=30, what="the orphaned agent stopped by the surviving replica")

        async def forgotten() -> bool:
            return await etcd_client.get(mesh_config.key("planner-agents") + b"/" + agent_id.encode()) is None

        await eventually(forgotten, what="its record deleted once stopped")
        # The survivor stopped it through the registry: its supervised record says so.
        supervised = await client.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
        (record,) = [a for a in supervised.agents if a.agent_id == agent_id]
        assert record.state == registry_pb2.SUPERVISION_STATE_STOPPED
    finally:
        await client.close()
