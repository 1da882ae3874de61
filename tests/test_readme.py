"""The README's agent commands, run as written against a running registry."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from harness.wait import eventually
from mabeam.client import MeshClient
from mabeam.server import MeshServer
from mabeam.v1 import registry_pb2

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.timeout(90)


def readme_lines(prefix: str) -> list[str]:
    return [line.strip() for line in README.splitlines() if line.strip().startswith(prefix)]


def test_readme_starts_with_the_two_commands() -> None:
    blocks = re.findall(r"```sh\n(.*?)```", README, re.S)
    assert "mabeam up" in blocks[0]
    assert "pytest" in blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert blocks[1].strip() in ci, ".ci/run must run the README's test command exactly"


async def test_example_agent_commands_register(service: Callable[..., Awaitable[MeshServer]]) -> None:
    registry = await service("registry")
    client = await MeshClient.connect(registry=registry.address)
    commands = readme_lines("python3 examples/")
    assert len(commands) >= 2
    procs = []
    try:
        for command in commands:
            argv = shlex.split(command.replace("127.0.0.1:50051", registry.address))
            procs.append(
                await asyncio.create_subprocess_exec(
                    *argv, cwd=ROOT, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL
                )
            )
        ids = [shlex.split(c)[shlex.split(c).index("--id") + 1] for c in commands]

        async def all_registered() -> bool:
            page = await client.registry.ListAgents(registry_pb2.ListAgentsRequest())
            return set(ids) <= {a.agent_id for a in page.agents}

        await eventually(all_registered, timeout=20, what=f"{ids} registered")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 10)
        await client.close()


async def test_readme_supervision_recipes(
    service: Callable[..., Awaitable[MeshServer]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    # As the README runs it: the example catalog, no --allow-argv.
    monkeypatch.setenv("MABEAM_AGENT_CATALOG", str(ROOT / "examples" / "agents.yaml"))
    monkeypatch.delenv("MABEAM_ALLOW_ARGV", raising=False)
    monkeypatch.chdir(ROOT)  # the catalog's argv is relative to the registry's working directory
    registry = await service("registry")
    grpcurl = shutil.which("grpcurl")
    assert grpcurl is not None
    recipes = [line for line in readme_lines("grpcurl ") if "RegistryService/" in line]
    assert len(recipes) >= 3
    for recipe in recipes:
        command = recipe.replace("127.0.0.1:50051", registry.address)
        # Not subprocess.run: the registry serves from this event loop, which must keep running.
        proc = await asyncio.create_subprocess_shell(
            command,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PATH": os.path.dirname(grpcurl) + os.pathsep + os.environ["PATH"]},
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, f"{command}: {out.decode()}{err.decode()}"
        if "ListAgents" in recipe:
            assert b"worker-2" in out
        if "StopAgent" in recipe:
            assert b"SUPERVISION_STATE_STOPPED" in out


async def test_readme_coordination_recipes(service: Callable[..., Awaitable[MeshServer]]) -> None:
    import shutil

    registry = await service("registry")
    coordination = await service("coordination")
    grpcurl = shutil.which("grpcurl")
    assert grpcurl is not None
    bidders = [c for c in readme_lines("python3 examples/bidder.py")]
    procs = [
        await asyncio.create_subprocess_exec(
            *shlex.split(c.replace("127.0.0.1:50051", registry.address)),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        for c in bidders
    ]
    client = await MeshClient.connect(registry=registry.address)
    try:

        async def bidders_registered() -> bool:
            page = await client.registry.ListAgents(registry_pb2.ListAgentsRequest(capability="bid"))
            return len(page.agents) == len(bidders)

        await eventually(bidders_registered, timeout=20, what="bidders registered")
        recipes = [line for line in readme_lines("grpcurl ") if "CoordinationService/" in line]
        assert len(recipes) >= 3
        for recipe in recipes:
            command = recipe.replace("127.0.0.1:50053", coordination.address)
            proc = await asyncio.create_subprocess_shell(
                command,
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "PATH": os.path.dirname(grpcurl) + os.pathsep + os.environ["PATH"]},
            )
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, f"{command}: {out.decode()}{err.decode()}"
            if "RunAuction" in recipe or "RunConsensus" in recipe:
                assert b"SESSION_STATE_DECIDED" in out, out.decode()
            if '"participant"' in recipe:  # the auction above invited bidder-1
                assert b'"vickrey"' in out and b"bidder-1" in out, out.decode()
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            await asyncio.wait_for(p.wait(), 10)
        await client.close()
