"""`mabeam goal run|status|cancel` as a user runs them (plain lines, and a progress bar on a terminal)."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from harness.cli import mabeam as _mabeam
from harness.wait import eventually
from mabeam.client import MeshClient
from mabeam.server import MeshServer
from mabeam.v1 import registry_pb2

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def planner(service: Callable[..., Awaitable[MeshServer]]) -> AsyncIterator[str]:
    registry = await service("registry")
    await service("coordination")
    planner = await service("planner")
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "worker.py"),
        "--id",
        "cli-worker",
        "--registry",
        registry.address,
        stdout=asyncio.subprocess.DEVNULL,
        stdin=asyncio.subprocess.DEVNULL,
    )
    client = await MeshClient.connect(registry=registry.address)

    async def registered() -> bool:
        return bool(
            (await client.registry.ListAgents(registry_pb2.ListAgentsRequest(capability="compute"))).agents
        )

    await eventually(registered, timeout=20, what="worker registered")
    yield planner.address
    worker.terminate()
    await worker.wait()
    await client.close()


async def mabeam(*args: str) -> tuple[int, str, str]:
    return await _mabeam(*args, cwd=ROOT)


async def test_goal_run_status_cancel(planner: str) -> None:
    code, out, err = await mabeam(
        "goal", "--planner", planner, "run", "examples/goal.yaml", "--id", "cli-goal"
    )
    assert code == 0, out + err
    assert "3/3 step total succeeded on cli-worker" in out
    assert "goal cli-goal SUCCEEDED" in out and '"sum": 136.0' in out
    code, out, _ = await mabeam("goal", "--planner", planner, "status", "cli-goal")
    assert code == 0 and "total" in out and "SUCCEEDED" in out
    code, out, _ = await mabeam("goal", "--planner", planner, "cancel", "cli-goal")
    assert code == 0 and "SUCCEEDED" in out  # a finished goal stays as it is


async def test_connection_flags_go_after_the_subcommand_too(planner: str) -> None:
    """``mabeam goal run FILE --planner HOST:PORT``, as a person types it, is not refused."""
    code, out, err = await mabeam("goal", "run", "examples/goal.yaml", "--planner", planner, "--id", "late")
    assert code == 0, out + err
    assert "goal late SUCCEEDED" in out
    code, out, err = await mabeam("goal", "status", "late", "--planner", planner)
    assert code == 0 and "SUCCEEDED" in out, out + err


async def test_goal_run_shows_a_progress_bar_on_a_terminal(planner: str) -> None:
    main, child = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mabeam.cli",
        "goal",
        "--planner",
        planner,
        "run",
        "examples/goal.yaml",
        cwd=ROOT,
        stdout=child,
        stderr=child,
    )
    os.close(child)
    chunks = []
    loop = asyncio.get_running_loop()
    while True:
        try:
            data = await loop.run_in_executor(None, os.read, main, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data.decode(errors="replace"))
    await proc.wait()
    os.close(main)
    screen = "".join(chunks)
    assert proc.returncode == 0, screen
    assert re.search(r"\[#{30}\] 3/3", screen), screen


async def test_bad_goal_file_is_one_clear_error(tmp_path: Path, planner: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - id: a\n    capability: compute\n    colour: red\n")
    code, _, err = await mabeam("goal", "--planner", planner, "run", str(bad))
    assert code == 2 and "colour" in err and "Traceback" not in err
    cycle = tmp_path / "cycle.yaml"
    cycle.write_text(
        "steps:\n  - {id: a, capability: compute, depends_on: [b]}\n  - {id: b, capability: compute, depends_on: [a]}\n"
    )
    code, _out, err = await mabeam("goal", "--planner", planner, "run", str(cycle))
    assert code == 1 and "cycle: a -> b -> a" in err
