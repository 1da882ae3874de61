"""Output nobody reads: a supervised agent and a service that write MiB to stdout keep working.

A supervised agent's stdout and stderr go to a log file of its own
(``<logs>/agents/<agent_id>.log``, rotated), never to the registry's stdout,
which is a pipe or a terminal when the registry was started by hand; a
replica under LocalMesh (``mabeam up``) writes to its log file.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from google.protobuf import duration_pb2

from harness.channels import agent_channel
from harness.wait import eventually
from mabeam.agent import from_value, to_value
from mabeam.client import MeshClient
from mabeam.config import MeshConfig
from mabeam.runtime import process
from mabeam.runtime.mesh import LocalMesh
from mabeam.v1 import agent_pb2, agent_pb2_grpc, registry_pb2

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "examples" / "worker.py")
MIB = 12  # written at once on start (more than any pipe holds), then 1 MiB every 0.2 s as long again

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# Imported by every Python process started with this folder on PYTHONPATH and
# MABEAM_TEST_SPEW_MIB set: it writes that many MiB to stdout before anything
# else (blocking, as a print does), then keeps writing from a thread.
SITECUSTOMIZE = """
import os, sys, threading, time
_mib = int(os.environ.get("MABEAM_TEST_SPEW_MIB") or 0)
if _mib:
    _line = b"o" * 1023 + b"\\n"
    for _ in range(_mib * 1024):
        sys.stdout.buffer.write(_line)
    sys.stdout.flush()

    def _more():
        for _ in range(_mib):
            time.sleep(0.2)
            sys.stdout.buffer.write(_line * 1024)
            sys.stdout.flush()

    threading.Thread(target=_more, daemon=True).start()
"""


@pytest.fixture
def spew(tmp_path: Path) -> dict[str, str]:
    """The environment that makes a Python child write MIB MiB to stdout."""
    folder = tmp_path / "spew"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "MABEAM_TEST_SPEW_MIB": str(MIB)}


async def check_agent_keeps_working(client: MeshClient, agent_id: str, log_dir: Path) -> None:
    """Registered, answering calls, heartbeating past several TTLs; its output in its own log."""
    agent = (await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id))).agent
    lease = agent.lease_id
    async with process_channel(agent.endpoint) as stub:
        for i in range(3):
            reply = await stub.ExecuteStep(
                agent_pb2.ExecuteStepRequest(
                    agent_id=agent_id, step_id=f"s{i}", capability="compute", input=to_value([1, 2])
                ),
                timeout=10,
            )
            assert from_value(reply.output)["sum"] == 3.0
            await asyncio.sleep(2.5)  # 7.5 s in all: a 5 s lease lapses unless heartbeats go on
    again = (await client.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id))).agent
    assert again.lease_id == lease  # the same registration, kept alive all along
    log = log_dir / "agents" / f"{agent_id}.log"

    def written() -> int:
        rotated = Path(f"{log}.1")
        return log.stat().st_size + (rotated.stat().st_size if rotated.exists() else 0)

    # Its output is in its own log, rotated past 10 MiB (so at most about twice that).
    await eventually(lambda: written() >= MIB * 2**20, timeout=20, what=f"{MIB} MiB in {log}")
    assert log.stat().st_size <= process.LOG_MAX_BYTES + 4 * 2**20


class process_channel:
    """An AgentService stub on a plaintext channel, closed on exit."""

    def __init__(self, address: str) -> None:

        self._channel = agent_channel(address)

    async def __aenter__(self) -> agent_pb2_grpc.AgentServiceStub:
        return agent_pb2_grpc.AgentServiceStub(self._channel)

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close(None)


def worker_launch(env: dict[str, str] | None = None) -> registry_pb2.StartAgentRequest:
    return registry_pb2.StartAgentRequest(
        agent_id="chatty",
        launch=registry_pb2.LaunchSpec(
            command=registry_pb2.Command(argv=[sys.executable, WORKER]), env=env or {}
        ),
        restart_policy=registry_pb2.RestartPolicy(strategy=registry_pb2.RESTART_STRATEGY_TEMPORARY),
        start_timeout=duration_pb2.Duration(seconds=30),
    )


@pytest.fixture
async def registry_by_hand(mesh_config: MeshConfig, tmp_path: Path) -> AsyncIterator[str]:
    """A registry started as a person might from a script: its stdout a pipe nobody reads."""
    argv = process.python_module_argv(
        "mabeam.services.registry",
        "--etcd",
        ",".join(mesh_config.etcd_endpoints),
        "--prefix",
        mesh_config.prefix,
        "--port",
        "0",
        "--token-file",
        str(mesh_config.data_dir / "service.token"),
    )
    env = {**os.environ, "MABEAM_LOG_DIR": str(tmp_path / "logs")}
    with process.ReadyFile() as ready, process.open_log(tmp_path / "registry.log") as log:
        proc = process.spawn(argv, env={**env, **ready.env()}, stdout=subprocess.PIPE, stderr=log)
        try:
            address = (await ready.wait(proc, 30)).address
            yield address
        finally:
            await process.terminate(proc, 5)
            assert proc.stdout is not None
            proc.stdout.close()


async def test_a_supervised_agent_writing_mib_to_stdout_keeps_working(
    registry_by_hand: str, spew: dict[str, str], tmp_path: Path
) -> None:
    client = await MeshClient.connect(registry=registry_by_hand)
    try:
        started = (await client.registry.StartAgent(worker_launch(spew), timeout=60)).agent
        assert started.state == registry_pb2.SUPERVISION_STATE_RUNNING, started
        await check_agent_keeps_working(client, "chatty", tmp_path / "logs")
        await client.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id="chatty"))
    finally:
        await client.close()


async def test_a_service_and_its_agent_writing_mib_to_stdout_keep_working(
    mesh_config: MeshConfig, spew: dict[str, str], tmp_path: Path
) -> None:
    mesh = LocalMesh(replace(mesh_config), services=("registry",), log_dir=tmp_path / "logs", extra_env=spew)
    await mesh.start()
    try:
        registry_log = mesh.replicas_of("registry")[0].log_file
        assert registry_log.stat().st_size >= MIB * 2**20  # the service wrote it, and serves
        client = await MeshClient.connect(registry=mesh.address("registry"))
        try:
            # The spew settings in the request: a launched agent gets none of the registry's environment.
            started = (await client.registry.StartAgent(worker_launch(spew), timeout=60)).agent
            assert started.state == registry_pb2.SUPERVISION_STATE_RUNNING, started
            await check_agent_keeps_working(client, "chatty", tmp_path / "logs")
            listed = await client.registry.ListAgents(registry_pb2.ListAgentsRequest())
            assert [a.agent_id for a in listed.agents] == ["chatty"]  # the registry answers
            await client.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id="chatty"))
        finally:
            await client.close()
    finally:
        await mesh.stop()
