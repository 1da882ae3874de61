"""Container commands run as local processes (compose.yaml, deploy/kubernetes/).

No container engine or cluster runs here, so the tests start each
container's command with its environment on this machine, against the test
etcd: only what names another container (addresses), a port, or a path
mounted into the container is replaced.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping


def local_command(
    command: list[str],
    env: Mapping[str, str],
    args: Mapping[str, str],
    values: Mapping[str, str] | None = None,
    mounts: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The command and environment with ``args`` replaced in the command, ``values`` in the environment.

    ``python`` is this interpreter and ``mabeam`` its module; a path under a
    key of ``mounts`` (a mount point in the container) moves under its value
    (a local folder), in the command and the environment alike. The test's own
    ``MABEAM_TOKEN``/``MABEAM_TOKEN_FILE`` are dropped: a token there must not
    stand in for the file the command names.
    """
    values = values or {}
    mounts = mounts or {}

    def path(text: str) -> str:
        for point, local in mounts.items():
            if text == point or text.startswith(point.rstrip("/") + "/"):
                return local + text[len(point) :]
        return text

    argv: list[str] = []
    for part in command:
        if part == "python":
            argv.append(sys.executable)
        elif part == "mabeam":
            argv += [sys.executable, "-m", "mabeam.cli"]
        else:
            argv.append(path(args.get(part, part)))
    base = {k: v for k, v in os.environ.items() if k not in ("MABEAM_TOKEN", "MABEAM_TOKEN_FILE")}
    return argv, {**base, **{k: path(values.get(v, v)) for k, v in env.items()}}
