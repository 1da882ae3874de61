"""The images for tests/test_compose_up.py, prepared in the background while the rest of the suite runs.

``deploy/images/build.py`` (dockerd up, the two base images compose.yaml names)
and then ``docker-compose -p PROJECT build`` (the project's image for every
service: ``registry`` first, the others then from its cached layers) take minutes on a fresh machine. When a ``containers`` test is
collected and can run, tests/conftest.py calls :func:`start` at the end of
collection; the test, ordered last, waits for :func:`result`.

The job runs *detached* and niced (``nice -n 10 python3 tests/harness/containers.py
prepare DIR PROJECT``, double-forked, so not a child of pytest: the leak detector of every
other test would see it, and the dockerd it may start, as theirs). It writes
``DIR/result.json``: ``rc``, ``build`` (build.py's JSON: which dockerd it
started, seconds per step), ``compose_build_s``, ``error``.

=====================  ========================================================
:data:`PROJECT`        the test's compose project name (unique per pytest process)
:func:`unavailable`    why the containers test cannot run here, or None
:func:`start`          start the detached job (once per process)
:func:`result`         the job's result.json, or None while it runs
:func:`stop_dockerd`   stop a dockerd the job started (the session's end)
=====================  ========================================================
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
BUILD = ROOT / "deploy" / "images" / "build.py"
COMPOSE = ROOT / "compose.yaml"
PROJECT = f"mabeamtest{os.getpid()}"
_job: dict[str, Any] = {}


def unavailable() -> str | None:
    """One line saying why the containers test cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (dockerd, debootstrap), as in CI"
    for tool in ("dockerd", "debootstrap", "docker", "docker-compose"):
        if shutil.which(tool) is None:
            return f"no {tool} here (CI's .ci/run installs docker.io and debootstrap)"
    return None


def start() -> Path:
    """Start the detached preparation job once; its directory (result.json appears there at the end)."""
    if "dir" in _job:
        return Path(_job["dir"])
    work = Path(tempfile.mkdtemp(prefix="mabeam-containers-"))
    _job.update(dir=str(work), started=time.monotonic())
    # `sh -c 'cmd &'` returns at once; the job's parent is then init, not pytest.
    subprocess.run(
        [
            "sh",
            "-c",
            '"$@" >/dev/null 2>&1 </dev/null &',
            "sh",
            "nice",  # behind the tests running meanwhile (dockerd, which it may start, inherits it)
            "-n",
            "10",
            sys.executable,
            __file__,
            "prepare",
            str(work),
            PROJECT,
        ],
        check=True,
        timeout=30,
    )
    return work


def started() -> bool:
    return "dir" in _job


def result() -> dict[str, Any] | None:
    """The job's result.json once it has finished (``waited_s``: since :func:`start`)."""
    path = Path(_job["dir"]) / "result.json"
    if not path.exists():
        return None
    doc = dict(json.loads(path.read_text()))
    doc.setdefault("waited_s", round(time.monotonic() - _job["started"], 1))
    return doc


def stop_dockerd() -> None:
    """Stop a dockerd the preparation started if it still runs: at the session's end, for a
    session that ended before the containers test's own teardown did it (interrupted, failed early)."""
    if "dir" not in _job:
        return
    from mabeam.runtime.process import pid_alive

    pid = ((result() or {}).get("build") or {}).get("dockerd_pid")
    if pid and pid_alive(pid):
        subprocess.run([sys.executable, str(BUILD), "--stop-dockerd", str(pid)], timeout=120, check=False)


def _prepare(work: Path, project: str) -> None:
    doc: dict[str, Any] = {"rc": 1, "build": None, "compose_build_s": None, "error": ""}
    try:
        built = subprocess.run(
            [sys.executable, str(BUILD)], capture_output=True, text=True, timeout=1800, cwd=ROOT
        )
        (work / "build.log").write_text(built.stderr)
        lines = built.stdout.strip().splitlines()
        doc["build"] = json.loads(lines[-1]) if lines else None
        if built.returncode != 0:
            doc["error"] = f"build.py exited {built.returncode}: {built.stderr[-2000:]}"
            return
        began = time.monotonic()
        # One service first (the pip install), then the rest from its layers: seven builds at
        # once would run seven pip installs on a machine running the rest of the suite.
        for services in (["registry"], []):
            composed = subprocess.run(
                ["docker-compose", "-p", project, "-f", str(COMPOSE), "build", *services],
                capture_output=True,
                text=True,
                timeout=1800,
                cwd=ROOT,
            )
            with (work / "compose-build.log").open("a") as out:
                out.write(composed.stdout + composed.stderr)
            if composed.returncode != 0:
                doc["error"] = f"docker-compose build exited {composed.returncode}: {composed.stderr[-2000:]}"
                return
        doc["compose_build_s"] = round(time.monotonic() - began, 1)
        doc["rc"] = 0
    except Exception as exc:  # the test reads it from result.json
        doc["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        partial = work / "result.partial"
        partial.write_text(json.dumps(doc))
        partial.rename(work / "result.json")


if __name__ == "__main__":
    if sys.argv[1:2] == ["prepare"]:
        _prepare(Path(sys.argv[2]), sys.argv[3])
