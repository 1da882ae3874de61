"""`docker compose up` for real: compose.yaml, unchanged, in real containers, used from the host.

As a user does where no image registry is reachable: Debian's dockerd,
deploy/images/build.py's local stand-ins for the two base images compose.yaml
names, then ``docker-compose up -d --build --wait``. From the host, through the
published loopback ports only, with the admin token copied out of the
``credentials`` volume: every container healthy and ``mabeam status`` clean,
both example agents registered under their service-name endpoints, an auction,
examples/goal.yaml to SUCCEEDED, a variable written and read; ``stop`` and
``start`` of the registry with both agents back (heartbeating the new
registry); ``down -v --rmi local`` leaving no container, network, volume or
image of the project. A dockerd the build started is stopped at the end.

Marked ``containers``: run by CI (root, and .ci/run installs docker.io and
debootstrap); skipped elsewhere. The images are prepared in the background
from the end of collection (tests/harness/containers.py) and the test runs last.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest

from harness import containers
from harness.wait import eventually
from mabeam.runtime.process import pid_alive
from mabeam.server import port_is_free

ROOT = Path(__file__).resolve().parent.parent
PROJECT = containers.PROJECT
CONTAINERS = (
    "etcd",
    "credentials",
    "registry",
    "orchestrator",
    "coordination",
    "planner",
    "bidder-1",
    "worker-1",
)
PORTS = {"registry": 50051, "orchestrator": 50052, "coordination": 50053, "planner": 50054}
AGENTS = {"bidder-1": "bidder-1:7001", "worker-1": "worker-1:7002"}

pytestmark = [pytest.mark.containers, pytest.mark.timeout(1800)]


def compose(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker-compose", "-p", PROJECT, "-f", str(ROOT / "compose.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def docker(*args: str) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr}"
    return result.stdout


def leftovers() -> dict[str, list[str]]:
    """What of the project docker still holds: containers, networks, volumes, images."""
    label = f"label=com.docker.compose.project={PROJECT}"
    found = {
        "containers": docker("ps", "-a", "--filter", label, "--format", "{{.Names}}").split(),
        "networks": docker("network", "ls", "--filter", label, "--format", "{{.Name}}").split(),
        "volumes": docker("volume", "ls", "--filter", label, "--format", "{{.Name}}").split(),
        "images": docker("images", "-a", "--filter", label, "--format", "{{.ID}}").split(),
    }
    return {kind: names for kind, names in found.items() if names}


def states() -> dict[str, dict[str, Any]]:
    out = compose("ps", "-a", "--format", "json", timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout.strip()
    rows = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines()]
    return {row["Service"]: row for row in rows}


def stamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture
def prepared() -> Any:
    """Waits for the background preparation (or starts it) and stops, at the end, a dockerd it started."""
    reason = containers.unavailable()
    if reason is not None:
        pytest.skip(reason)
    containers.start()
    box: dict[str, Any] = {}
    yield box
    pid = ((box.get("result") or containers.result() or {}).get("build") or {}).get("dockerd_pid")
    if pid:
        subprocess.run(
            [sys.executable, str(containers.BUILD), "--stop-dockerd", str(pid)], check=True, timeout=120
        )
        assert not pid_alive(pid), f"dockerd {pid} still runs"


async def test_compose_up_for_real(prepared: dict[str, Any], record_property: Any) -> None:
    figures: dict[str, float] = {}
    result = await eventually(containers.result, timeout=1500, interval=1, what="the images prepared")
    prepared["result"] = result
    assert result["rc"] == 0, result["error"]
    taken = [port for port in (*PORTS.values(), 2379) if not port_is_free("127.0.0.1", port)]
    assert not taken, f"compose.yaml publishes 127.0.0.1:{taken}, taken on this machine: stop what holds them"
    token = Path(containers.start()) / "admin.token"
    began = time.monotonic()
    try:
        up = compose("up", "-d", "--build", "--wait", timeout=900)
        figures["up"] = time.monotonic() - began
        assert up.returncode == 0, f"{up.stderr[-3000:]}\n{compose('logs', '--tail', '40').stdout[-4000:]}"
        running = states()
        assert set(CONTAINERS) <= set(running), running.keys()
        assert running["credentials"]["ExitCode"] == 0, running["credentials"]
        unhealthy = {
            n: r["Health"] for n, r in running.items() if n != "credentials" and r["Health"] != "healthy"
        }
        assert not unhealthy, unhealthy

        copied = compose("cp", "registry:/credentials/admin.token", str(token), timeout=60)
        assert copied.returncode == 0, copied.stderr
        # The host's own mesh settings stay out: the published ports and the copied token only.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MABEAM_")}
        env["MABEAM_TOKEN_FILE"] = str(token)
        env.update({f"MABEAM_{name.upper()}": f"127.0.0.1:{port}" for name, port in PORTS.items()})

        async def cli(*args: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mabeam.cli", *args, env=env, stdout=PIPE, stderr=PIPE
            )
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            return int(proc.returncode or 0), out.decode(), err.decode()

        code, out, err = await cli("status", "--json")
        assert code == 0, out + err
        status = json.loads(out)
        for name, health in status["services"].items():
            assert health["serving"] and health["store_writable"], (name, health)
        assert set(status["services"]) == set(PORTS)

        async def agents() -> dict[str, dict[str, Any]]:
            code, out, _ = await cli("agents", "--json")
            return {a["agent_id"]: a for a in json.loads(out)} if code == 0 else {}

        listed = await agents()
        assert {name: listed[name]["endpoint"] for name in AGENTS if name in listed} == AGENTS

        code, out, err = await cli("auction", "gpu-slot", "--capability", "bid", "--json")
        assert code == 0, out + err
        session = json.loads(out)
        assert session["state"] == "SESSION_STATE_DECIDED" and session["outcome"]["winners"] == ["bidder-1"]

        code, out, err = await cli("goal", "run", str(ROOT / "examples" / "goal.yaml"))
        assert code == 0 and " SUCCEEDED" in out, out + err
        assert '"sum": 136.0' in out, out

        code, out, err = await cli("vars", "set", "compose/check", '{"n": 1}', "--json")
        assert code == 0, out + err
        code, out, err = await cli("vars", "get", "compose/check", "--json")
        assert code == 0 and json.loads(out)["value"] == {"struct_value": {"n": 1.0}}, out + err

        # The registry goes away and comes back: both agents register with it again.
        began = time.monotonic()
        stopped = compose("stop", "registry", timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        figures["registry_stop"] = time.monotonic() - began
        restarted_at = datetime.now(UTC)
        started = compose("start", "registry", timeout=120)
        assert started.returncode == 0, started.stderr

        async def back() -> bool:
            now = await agents()
            return all(
                name in now
                and now[name]["endpoint"] == endpoint
                and stamp(now[name]["last_heartbeat_at"]) > restarted_at
                for name, endpoint in AGENTS.items()
            )

        await eventually(back, timeout=60, interval=1, what="both agents heartbeating the restarted registry")
        figures["registry_back"] = time.monotonic() - began
        code, out, err = await cli("status", "--json")
        assert code == 0 and json.loads(out)["counts"]["agents"] == 2, out + err
    finally:
        began = time.monotonic()
        down = compose("down", "-v", "--rmi", "local", "--remove-orphans", timeout=300)
        # An image a rebuild replaced (the checkout changed between two builds) is dangling: no
        # longer the project's for `--rmi local`, but still labelled with it.
        docker("image", "prune", "-f", "--filter", f"label=com.docker.compose.project={PROJECT}")
        figures["down"] = time.monotonic() - began
        left = leftovers()
        token.unlink(missing_ok=True)
        shutil.rmtree(containers.start(), ignore_errors=True)
    assert down.returncode == 0, down.stderr
    assert not left, f"left behind: {left}"
    build = result["build"] or {}
    record_property(
        "report",
        f"compose up for real: images prepared in the background {result['waited_s']:.0f} s "
        f"(build.py steps {build.get('steps')}, compose build {result['compose_build_s']} s); "
        f"up --wait {figures['up']:.0f} s, registry stop {figures['registry_stop']:.0f} s and stop to both "
        f"agents back {figures['registry_back']:.0f} s, down -v {figures['down']:.0f} s",
    )
