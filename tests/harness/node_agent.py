"""The JavaScript agent (examples/node-agent/agent.js) as a subprocess of a test.

:func:`start_node_agent` runs it with node from the repository's root; a
machine without node or ``@grpc/grpc-js`` fails the test saying what to install
(the cross-language tests are not skipped).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AGENT = "examples/node-agent/agent.js"


async def start_node_agent(
    *args: str, registry: str, stdout: int = asyncio.subprocess.PIPE, env: Mapping[str, str] | None = None
) -> asyncio.subprocess.Process:
    """``node examples/node-agent/agent.js ARGS --registry REGISTRY`` started (not yet serving:
    with ``stdout`` a pipe its first line says ``serving on``); the caller terminates it."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (the cross-language agent needs it)")
    if not (ROOT / "node_modules" / "@grpc" / "grpc-js").exists():
        pytest.fail("@grpc/grpc-js is not installed: run `npm ci` (.ci/run does)")
    return await asyncio.create_subprocess_exec(
        node, AGENT, *args, "--registry", registry, cwd=ROOT, stdout=stdout, env=dict(env) if env else None
    )
