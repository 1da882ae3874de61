"""Running the ``mabeam`` command as a user does: a process of its own, its exit status and output."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path


async def mabeam(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> tuple[int, str, str]:
    """``mabeam ARGS...`` (``python -m mabeam.cli``): ``(exit status, stdout, stderr)``.

    ``env`` is added to this process's environment (the test mesh's token included).
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mabeam.cli",
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
