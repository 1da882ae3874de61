"""`mabeam auth ...` end to end, the exposure check of a service, and the connection flags anywhere."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from harness.cli import mabeam
from harness.wait import eventually
from mabeam.cli.main import parse
from mabeam.config import MeshConfig
from mabeam.server import MeshServer

pytestmark = pytest.mark.timeout(90)


async def test_create_list_whoami_revoke(service: Callable[..., Awaitable[MeshServer]]) -> None:
    registry = (await service("registry")).address
    at = ["--registry", registry]
    # The test's own token ($MABEAM_TOKEN, set by the mesh fixture) is the admin's.
    code, out, err = await mabeam("auth", "whoami", *at)
    assert code == 0 and out.split()[1:] == ["admin-bootstrap", "admin"], out + err

    code, out, err = await mabeam("auth", "create", "ci-bot", "--role", "reader", *at)
    assert code == 0, err
    token = out.strip()
    assert out == token + "\n" and token.startswith("mbt_"), out  # the token alone on stdout
    token_id = token.split("_")[1]
    assert f"created {token_id} ci-bot reader" in err and token not in err

    code, out, err = await mabeam(
        "auth", "create", "workers", "--role", "agent", "--agent-pattern", "worker-*", *at
    )
    assert code == 0, err
    # Connection flags before the subcommand too.
    code, out, err = await mabeam(*at, "auth", "list", "--json")
    assert code == 0, err
    listed = {p["name"]: p for p in json.loads(out)}
    assert listed["ci-bot"]["role"] == "ROLE_READER" and listed["ci-bot"]["id"] == token_id
    assert listed["workers"]["agent_pattern"] == "worker-*"
    assert "token" not in out.replace("_token", "")  # ids, never secrets
    code, out, _ = await mabeam("auth", "list", *at)
    assert code == 0 and out.startswith("ID") and "agents worker-*" in out

    as_bot = {"MABEAM_TOKEN": token}
    code, out, err = await mabeam("auth", "whoami", *at, env=as_bot)
    assert code == 0 and out.strip() == f"{token_id} ci-bot reader", out + err
    code, out, err = await mabeam("auth", "create", "sneaky", "--role", "admin", *at, env=as_bot)
    assert code == 1 and err.startswith("mabeam: permission denied: ") and err.count("\n") == 1, err

    code, out, err = await mabeam("auth", "revoke", token_id, *at)
    assert code == 0 and out.strip() == f"revoked {token_id} ci-bot reader", out + err

    async def refused() -> str | None:
        code, _, err = await mabeam("auth", "whoami", *at, env=as_bot)
        return err if code == 1 else None

    err = await eventually(refused, timeout=20, interval=0.1, what="the revoked token refused")
    assert err.count("\n") == 1 and err.startswith("mabeam: unauthenticated: "), err
    assert err.rstrip().endswith("set MABEAM_TOKEN or --token-file"), err


async def test_auth_errors_are_one_line(
    service: Callable[..., Awaitable[MeshServer]], tmp_path: Path
) -> None:
    registry = (await service("registry")).address
    code, _, err = await mabeam(
        "auth", "whoami", "--registry", registry, "--token-file", str(tmp_path / "none")
    )
    assert code == 1 and err.count("\n") == 1 and "token file" in err and str(tmp_path / "none") in err, err
    code, _, err = await mabeam("auth", "create", "x y", "--role", "reader", "--registry", registry)
    assert code == 1 and err.count("\n") == 1 and "INVALID_ARGUMENT" in err, err
    code, _, err = await mabeam("auth", "init", "--dir", str(tmp_path / "c"), env={"MABEAM_ETCD": ""})
    assert code == 2 and err.count("\n") == 1 and "--etcd" in err, err


async def test_auth_init_writes_and_keeps_the_credentials(mesh_config: MeshConfig, tmp_path: Path) -> None:
    where = ["--etcd", mesh_config.etcd_endpoints[0], "--prefix", mesh_config.prefix]
    directory = tmp_path / "credentials"
    code, out, err = await mabeam("auth", "init", *where, "--dir", str(directory), "--agent-token")
    assert code == 0, err
    for name in ("admin", "service", "agent"):
        path = directory / f"{name}.token"
        assert path.stat().st_mode & 0o777 == 0o600
        assert f"{name} token: {path} (created)" in out
        assert path.read_text().strip() not in out
    first = (directory / "service.token").read_text()
    code, out, err = await mabeam("auth", "init", *where, "--dir", str(directory), "--agent-token")
    assert code == 0 and out.count("kept: still valid") == 3, out + err
    assert (directory / "service.token").read_text() == first


async def test_a_service_beyond_loopback_without_tls_exits_2_in_one_line(mesh_config: MeshConfig) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mabeam.services.registry",
        "--etcd",
        mesh_config.etcd_endpoints[0],
        "--prefix",
        mesh_config.prefix,
        "--host",
        "0.0.0.0",
        "--registry-port",
        "0",
        "--token-file",
        str(mesh_config.data_dir / "service.token"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2, out + err
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, lines
    message = json.loads(lines[0])["message"]
    assert "0.0.0.0 beyond loopback without TLS" in message, message
    assert "--tls-cert" in message and "--insecure" in message, message


@pytest.mark.parametrize(
    "argv",
    [
        ["--planner", "P:1", "--token-file", "T", "goal", "run", "F"],
        ["goal", "--planner", "P:1", "--token-file", "T", "run", "F"],
        ["goal", "run", "F", "--planner", "P:1", "--token-file", "T"],
        ["--token-file", "T", "goal", "run", "F", "--planner", "P:1"],
    ],
)
def test_connection_flags_before_and_after_the_subcommand(argv: list[str]) -> None:
    args = parse(argv)
    assert (args.planner, args.token_file, str(args.file)) == ("P:1", "T", "F")


@pytest.mark.parametrize(
    "argv",
    [
        ["--registry", "R:1", "--etcd", "http://e:1", "--prefix", "/p", "vars", "get", "n"],
        ["vars", "--registry", "R:1", "get", "n", "--etcd", "http://e:1", "--prefix", "/p"],
        ["--prefix", "/p", "status", "--registry", "R:1", "--etcd", "http://e:1"],
        ["--registry", "R:1", "auth", "whoami", "--etcd", "http://e:1", "--prefix", "/p"],
        ["auth", "--etcd", "http://e:1", "list", "--registry", "R:1", "--prefix", "/p"],
    ],
)
def test_every_client_subcommand_takes_them_anywhere(argv: list[str]) -> None:
    args = parse(argv)
    assert (args.registry, args.etcd, args.prefix) == ("R:1", "http://e:1", "/p")


def test_the_last_one_given_wins_and_the_environment_fills_in(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse(["--planner", "A:1", "goal", "status", "g", "--planner", "B:1"]).planner == "B:1"
    monkeypatch.setenv("MABEAM_ETCD", "http://env:1")
    monkeypatch.setenv("MABEAM_PREFIX", "/env")
    args = parse(["status"])
    assert (args.etcd, args.prefix, args.registry, args.token_file) == ("http://env:1", "/env", "", None)
    assert parse(["--etcd", "http://flag:1", "auth", "init", "--dir", "d"]).etcd == "http://flag:1"


def test_up_names_every_risk_it_was_told_to_take() -> None:
    from mabeam.cli.main import _risks

    assert _risks(MeshConfig()) == []
    assert _risks(MeshConfig(host="0.0.0.0", insecure=True))[0].startswith("--insecure: listening on 0.0.0.0")
    risks = _risks(MeshConfig(auth=False))
    assert len(risks) == 1 and risks[0].startswith("authentication is OFF")
    assert len(_risks(MeshConfig(host="0.0.0.0", insecure=True, auth=False))) == 2
