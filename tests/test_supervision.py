"""Supervised agents: started, restarted per policy, stopped, handed over between replicas."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from google.protobuf import duration_pb2

from harness.wait import eventually
from mabeam import errors
from mabeam.client import MeshClient
from mabeam.runtime.process import pid_alive
from mabeam.server import MeshServer
from mabeam.v1 import registry_pb2

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "examples" / "worker.py")

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def registry(service: Callable[..., Awaitable[MeshServer]]) -> MeshServer:
    return await service("registry")


@pytest.fixture
async def client(registry: MeshServer) -> AsyncIterator[MeshClient]:
    mesh = await MeshClient.connect(registry=registry.address)
    yield mesh
    await mesh.close()


def worker_spec(**policy: object) -> tuple[registry_pb2.LaunchSpec, registry_pb2.RestartPolicy]:
    launch = registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=[sys.executable, WORKER]))
    return launch, registry_pb2.RestartPolicy(**policy)  # type: ignore[arg-type]


async def supervised(client: MeshClient, agent_id: str) -> registry_pb2.SupervisedAgent:
    page = await client.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
    return next(a for a in page.agents if a.agent_id == agent_id)


async def test_start_crash_restart_stop(client: MeshClient) -> None:
    launch, policy = worker_spec(
        strategy=registry_pb2.RESTART_STRATEGY_PERMANENT,
        max_restarts=3,
        period=duration_pb2.Duration(seconds=30),
    )
    started = (
        await client.registry.StartAgent(
            registry_pb2.StartAgentRequest(agent_id="w1", launch=launch, restart_policy=policy)
        )
    ).agent
    assert started.state == registry_pb2.SUPERVISION_STATE_RUNNING and started.pid > 0
    agent = (await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="w1"))).agent
    assert agent.supervised and "compute" in agent.capabilities
    first_pid = started.pid
    os.kill(first_pid, signal.SIGKILL)

    async def restarted() -> bool:
        rec = await supervised(client, "w1")
        return rec.state == registry_pb2.SUPERVISION_STATE_RUNNING and rec.pid not in (0, first_pid)

    await eventually(restarted, timeout=15, what="restarted after SIGKILL")
    rec = await supervised(client, "w1")
    assert rec.restart_count == 1 and rec.last_exit == "signal 9"
    # A deliberate restart is not a crash.
    again = (await client.registry.RestartAgent(registry_pb2.RestartAgentRequest(agent_id="w1"))).agent
    assert again.pid not in (0, rec.pid) and again.restart_count == 1
    stopped = (await client.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id="w1"))).agent
    assert stopped.state == registry_pb2.SUPERVISION_STATE_STOPPED and stopped.pid == 0
    assert not pid_alive(again.pid)

    async def deregistered() -> bool:
        try:
            await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="w1"))
        except errors.NotFound:
            return True
        return False

    await eventually(deregistered, timeout=8, what="stopped agent leaves the registry")


async def test_restart_intensity_exhausted_marks_failed(client: MeshClient) -> None:
    launch = registry_pb2.LaunchSpec(
        command=registry_pb2.Command(argv=[sys.executable, "-c", "import sys; sys.exit(3)"])
    )
    policy = registry_pb2.RestartPolicy(
        strategy=registry_pb2.RESTART_STRATEGY_PERMANENT,
        max_restarts=2,
        period=duration_pb2.Duration(seconds=30),
    )
    with pytest.raises(errors.FailedPrecondition, match="restart intensity exceeded"):
        await client.registry.StartAgent(
            registry_pb2.StartAgentRequest(
                agent_id="crashy",
                launch=launch,
                restart_policy=policy,
                start_timeout=duration_pb2.Duration(seconds=5),
            )
        )
    rec = await supervised(client, "crashy")
    assert (
        rec.state == registry_pb2.SUPERVISION_STATE_FAILED
        and rec.restart_count == 2
        and rec.last_exit == "exit code 3"
    )


async def test_transient_agent_exiting_normally_is_not_restarted(client: MeshClient) -> None:
    launch = registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=[sys.executable, "-c", "pass"]))
    policy = registry_pb2.RestartPolicy(
        strategy=registry_pb2.RESTART_STRATEGY_TRANSIENT,
        max_restarts=5,
        period=duration_pb2.Duration(seconds=5),
    )
    reply = await client.registry.StartAgent(
        registry_pb2.StartAgentRequest(agent_id="once", launch=launch, restart_policy=policy)
    )
    assert reply.agent.state == registry_pb2.SUPERVISION_STATE_STOPPED and reply.agent.restart_count == 0


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (
            registry_pb2.StartAgentRequest(
                launch=registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=["x"]))
            ),
            "agent_id",
        ),
        (registry_pb2.StartAgentRequest(agent_id="a"), "launch"),
        (
            registry_pb2.StartAgentRequest(
                agent_id="a", launch=registry_pb2.LaunchSpec(command=registry_pb2.Command())
            ),
            "launch.command.argv",
        ),
        (
            registry_pb2.StartAgentRequest(
                agent_id="a", launch=registry_pb2.LaunchSpec(python_entry_point="no colon")
            ),
            "launch.python_entry_point",
        ),
        (
            registry_pb2.StartAgentRequest(
                agent_id="a",
                launch=registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=["x"])),
                restart_policy=registry_pb2.RestartPolicy(period=duration_pb2.Duration(seconds=-1)),
            ),
            "restart_policy.period",
        ),
    ],
)
async def test_bad_start_requests_name_the_field(
    client: MeshClient, request_: registry_pb2.StartAgentRequest, field: str
) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        await client.registry.StartAgent(request_)
    assert info.value.field == field
    page = await client.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
    assert not page.agents


async def test_stop_of_an_unknown_agent_is_not_found(client: MeshClient) -> None:
    with pytest.raises(errors.NotFound):
        await client.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id="nobody"))
    with pytest.raises(errors.NotFound):
        await client.registry.RestartAgent(registry_pb2.RestartAgentRequest(agent_id="nobody"))


async def test_python_entry_point_launch(client: MeshClient) -> None:
    launch = registry_pb2.LaunchSpec(
        python_entry_point="harness.sample_agents:make_sample",
        env={"PYTHONPATH": str(ROOT / "tests")},
    )
    started = (
        await client.registry.StartAgent(registry_pb2.StartAgentRequest(agent_id="py1", launch=launch))
    ).agent
    assert started.state == registry_pb2.SUPERVISION_STATE_RUNNING
    agent = (await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="py1"))).agent
    assert list(agent.capabilities) == ["sample"] and agent.supervised
    await client.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id="py1"))


async def test_a_registration_counts_whatever_the_clock_of_the_replica_that_wrote_it(
    client: MeshClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registering replica's clock an hour behind the supervisor's: started is still registered."""
    from google.protobuf import timestamp_pb2

    from mabeam.services.registry import server as registry_server

    def an_hour_ago() -> timestamp_pb2.Timestamp:
        ts = timestamp_pb2.Timestamp()
        ts.FromSeconds(int(time.time()) - 3600)
        return ts

    monkeypatch.setattr(registry_server, "_now", an_hour_ago)
    launch, policy = worker_spec(
        strategy=registry_pb2.RESTART_STRATEGY_PERMANENT,
        max_restarts=3,
        period=duration_pb2.Duration(seconds=30),
    )
    request = registry_pb2.StartAgentRequest(
        agent_id="skewed",
        launch=launch,
        restart_policy=policy,
        start_timeout=duration_pb2.Duration(seconds=8),
    )
    started = (await client.registry.StartAgent(request)).agent
    assert started.state == registry_pb2.SUPERVISION_STATE_RUNNING and started.pid > 0
    os.kill(started.pid, signal.SIGKILL)

    async def restarted() -> bool:
        rec = await supervised(client, "skewed")
        return rec.state == registry_pb2.SUPERVISION_STATE_RUNNING and rec.pid not in (0, started.pid)

    await eventually(restarted, timeout=15, what="restarted and registered again")
    rec = await supervised(client, "skewed")
    assert rec.restart_count == 1 and rec.last_exit == "signal 9"
    await client.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id="skewed"))
