"""A whole mesh on this machine: etcd plus the four services as child processes.

One implementation serves ``mabeam up``, the test fixtures and ``mabeam bench``.
Services run as separate processes (as in production, and so a mesh uses more
than one core); each is started with :func:`mabeam.runtime.process.spawn`, so none
outlives the process that started it. A replica's address comes from its
ready file (:class:`mabeam.runtime.process.ReadyFile`); its stdout and stderr
go to its log in :attr:`LocalMesh.log_dir`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import stamina
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mabeam.auth import TOKEN_ENV, TOKEN_FILE_ENV, read_token_file
from mabeam.config import SERVICE_NAMES, SERVICES, MeshConfig
from mabeam.runtime import auth as runtime_auth
from mabeam.runtime import etcd as etcd_layer
from mabeam.runtime import process
from mabeam.runtime.embedded_etcd import DEFAULT_QUOTA_BYTES, EmbeddedEtcd, EtcdCluster

# Replica n of a service on a fixed port listens on that port + n * REPLICA_PORT_STEP
# (registry 50051, 50151, ...); etcd member n on its ports + n * ETCD_PORT_STEP.
REPLICA_PORT_STEP = 100
ETCD_PORT_STEP = 10

# Watching (LocalMesh.watch, behind `mabeam up`): how often children are looked
# at, the back-off between attempts to bring one back (stamina, doubling), and
# how long a restarted child must live for its next death not to wait first.
WATCH_INTERVAL_S = 0.5
RESTART_WAIT_INITIAL_S = 0.5
RESTART_WAIT_MAX_S = 30.0
RESTART_STABLE_S = 10.0


class MeshStartError(RuntimeError):
    """A part of the mesh did not come up; the message says which and why."""


@dataclass
class ServiceProcess:
    """One running service replica."""

    kind: str
    proc: subprocess.Popen[bytes]
    address: str
    log_file: Path
    index: int = 0  # replica n of its kind (on the kind's port + n * REPLICA_PORT_STEP)
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def name(self) -> str:
        """How people see it: ``registry-0``."""
        return f"{self.kind}-{self.index}"


@dataclass
class LocalMesh:
    """etcd (embedded unless ``config.etcd_endpoints`` is set) and service replicas.

    With ``etcd_members`` > 1 the embedded etcd is a cluster of that many
    members on loopback (:attr:`etcd_cluster`); every service is given all
    their endpoints. Replicas of a service on a fixed port take that port plus
    ``n * REPLICA_PORT_STEP`` for replica n; on port 0 each takes a free one.

    Example::

        mesh = LocalMesh(config.with_port("registry", 0), replicas=2, etcd_members=3)
        await mesh.start()
        print(mesh.addresses("registry"), mesh.etcd_endpoints)
        await mesh.stop()
    """

    config: MeshConfig
    services: Sequence[str] = SERVICES
    replicas: int = 1
    etcd_members: int = 1
    etcd_client_port: int = 2379
    etcd_peer_port: int = 2380
    unsafe_no_fsync: bool = False
    # The embedded etcd's space quota (``mabeam up --etcd-quota-bytes``); past it etcd refuses writes.
    etcd_quota_bytes: int = DEFAULT_QUOTA_BYTES
    log_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # What the registry replicas may launch: --agent-catalog FILE, --allow-argv (see
    # mabeam.services.registry.catalog); None / False leave it to MABEAM_AGENT_CATALOG / MABEAM_ALLOW_ARGV.
    agent_catalog: str | None = None
    allow_argv: bool = False
    etcd: EmbeddedEtcd | None = None
    etcd_cluster: EtcdCluster | None = None
    processes: list[ServiceProcess] = field(default_factory=list)
    startup_seconds: float = 0.0
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    # Replicas started so far per kind, counted before the first await: replicas
    # started together (gather) must not all take index 0 (same port, same log).
    _started: dict[str, int] = field(default_factory=dict)
    _watcher: asyncio.Task[None] | None = None
    # With auth on (config.auth): where the admin and service tokens are kept
    # (default: the data directory), and what bootstrap found or minted there.
    token_dir: Path | None = None
    credentials: runtime_auth.Credentials | None = None

    @property
    def etcd_endpoints(self) -> tuple[str, ...]:
        """The etcd endpoints the services use."""
        if self.config.etcd_endpoints:
            return self.config.etcd_endpoints
        if self.etcd_cluster is not None:
            return tuple(self.etcd_cluster.endpoints)
        assert self.etcd is not None, "mesh not started"
        return (self.etcd.endpoint,)

    def etcd_ports(self, first: int) -> list[int]:
        """The ports of the etcd members when the first one listens on ``first``."""
        return [first + i * ETCD_PORT_STEP for i in range(self.etcd_members)]

    def replica_port(self, kind: str, n: int) -> int:
        """The port replica ``n`` of ``kind`` takes (0: any free port)."""
        base = self.config.port(kind)
        return base + n * REPLICA_PORT_STEP if base else 0

    def service_ports(self, kind: str) -> list[int]:
        """The ports the replicas of ``kind`` will take (0: any free port)."""
        return [self.replica_port(kind, n) for n in range(self.replicas)]

    def replicas_of(self, kind: str) -> list[ServiceProcess]:
        """The running replicas of ``kind``."""
        return [p for p in self.processes if p.kind == kind and p.proc.poll() is None]

    async def dump_tasks(self, timeout: float = 3.0) -> None:
        """Have every live replica log its asyncio tasks and their stacks (SIGUSR1), for a mesh
        that hangs; returns once each log has them, or after ``timeout``."""
        marker = b"asyncio tasks (SIGUSR1)"
        waiting = []
        for replica in self.processes:
            if replica.proc.poll() is None:
                before = replica.log_file.read_bytes().count(marker) if replica.log_file.exists() else 0
                replica.proc.send_signal(signal.SIGUSR1)
                waiting.append((replica, before))
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while waiting and loop.time() < end:
            waiting = [(r, n) for r, n in waiting if r.log_file.read_bytes().count(marker) <= n]
            await asyncio.sleep(0.05)

    def addresses(self, kind: str) -> list[str]:
        """host:port of every live replica of ``kind``."""
        return [p.address for p in self.replicas_of(kind)]

    def address(self, kind: str) -> str:
        """host:port of the first replica of ``kind``."""
        found = self.addresses(kind)
        if not found:
            raise MeshStartError(f"no {kind} replica is running")
        return found[0]

    async def start(self, timeout: float = 30.0) -> None:
        """Start etcd and every replica; returns when all health checks pass."""
        started = time.monotonic()
        if self.log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mabeam-logs-")
            self.log_dir = Path(self._tmp.name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if not self.config.etcd_endpoints and self.etcd_members > 1:
                fixed = self.etcd_client_port != 0
                self.etcd_cluster = EtcdCluster(
                    self.etcd_members,
                    # Not the single member's directory: a cluster's data is its own.
                    base_dir=self.config.data_dir.with_name(self.config.data_dir.name + "-cluster"),
                    unsafe_no_fsync=self.unsafe_no_fsync,
                    quota_backend_bytes=self.etcd_quota_bytes,
                    client_ports=self.etcd_ports(self.etcd_client_port) if fixed else (),
                    peer_ports=self.etcd_ports(self.etcd_peer_port) if fixed else (),
                )
                await self.etcd_cluster.start()
            elif not self.config.etcd_endpoints:
                self.etcd = EmbeddedEtcd(
                    self.config.data_dir,
                    client_port=self.etcd_client_port,
                    peer_port=self.etcd_peer_port,
                    unsafe_no_fsync=self.unsafe_no_fsync,
                    quota_backend_bytes=self.etcd_quota_bytes,
                )
                await self.etcd.start()
            else:
                await self.check_external_etcd()
            if self.config.auth:
                await self._bootstrap_credentials()
            starts = [
                self.start_replica(kind, timeout=timeout)
                for kind in self.services
                for _ in range(self.replicas)
            ]
            await asyncio.gather(*starts)
            # Started together, they were recorded as they came up: list them in replica order.
            order = {kind: i for i, kind in enumerate(self.services)}
            self.processes.sort(key=lambda p: (order.get(p.kind, len(order)), p.index))
        except BaseException:
            await self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    async def check_external_etcd(self, timeout: float = 5.0) -> None:
        """MeshStartError in one line when the etcd given (``--etcd``) does not answer."""
        where = ",".join(self.config.etcd_endpoints)
        client = await etcd_layer.connect(
            self.config.etcd_endpoints, tls=self.config.etcd_tls, timeout=timeout
        )
        try:
            await client.get(self.config.prefix.encode() + b"/")
        except Exception as exc:
            reason = _first_line(str(exc)) or type(exc).__name__
            raise MeshStartError(
                f"etcd at {where} is not reachable ({reason}): "
                "start it there, or leave out --etcd (and MABEAM_ETCD) to run an embedded etcd"
            ) from None
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    async def _bootstrap_credentials(self) -> None:
        """The admin and service tokens of this mesh, minted on its first start (files of mode 0600)."""
        client = await etcd_layer.connect(self.etcd_endpoints, tls=self.config.etcd_tls)
        try:
            self.credentials = await runtime_auth.bootstrap(
                client, self.config, self.token_dir or self.config.data_dir
            )
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    @property
    def admin_token(self) -> str | None:
        """The admin token clients of this mesh present (None without auth)."""
        if self.credentials is None:
            return None
        return read_token_file(self.credentials.admin_file)

    async def start_replica(
        self, kind: str, port: int | None = None, timeout: float = 30.0
    ) -> ServiceProcess:
        """Start one more replica of ``kind`` (port 0 when replicas share a host)."""
        n = self._started.get(kind, 0)
        self._started[kind] = n + 1
        if port is None:
            port = self.replica_port(kind, n)
        replica = await self._spawn_replica(kind, n, port, timeout)
        self.processes.append(replica)
        await wait_healthy(
            replica.address, SERVICE_NAMES[kind], timeout=timeout, tls=self.config.tls is not None
        )
        return replica

    async def restart_replica(self, replica: ServiceProcess, timeout: float = 30.0) -> ServiceProcess:
        """Start ``replica`` again (it has exited): same index, port and log; healthy when it returns."""
        port = self.replica_port(replica.kind, replica.index)
        new = await self._spawn_replica(replica.kind, replica.index, port, timeout)
        new.restarts = replica.restarts + 1
        try:
            await wait_healthy(
                new.address, SERVICE_NAMES[new.kind], timeout=timeout, tls=self.config.tls is not None
            )
        except BaseException:
            await process.terminate(new.proc, 1)
            raise
        self.processes = [new if p is replica else p for p in self.processes]
        return new

    async def _spawn_replica(self, kind: str, n: int, port: int, timeout: float) -> ServiceProcess:
        assert self.log_dir is not None
        log_file = self.log_dir / f"{kind}-{n}.log"
        argv = process.python_module_argv(
            f"mabeam.services.{kind}",
            "--etcd",
            ",".join(self.etcd_endpoints),
            "--prefix",
            self.config.prefix,
            "--host",
            self.config.host,
            f"--{kind}-port",
            str(port),
            "--grace",
            str(self.config.grace),
            # No health-only port: a MABEAM_HEALTH_PORT in the environment would be one port for all.
            "--health-port",
            "0",
        )
        if self.config.tls is not None:
            argv += ["--tls-cert", self.config.tls.cert_file, "--tls-key", self.config.tls.key_file]
            if self.config.tls.ca_file:
                argv += ["--tls-ca", self.config.tls.ca_file]
        if self.credentials is not None:
            argv += ["--token-file", str(self.credentials.service_file)]
        elif not self.config.auth:
            argv += ["--no-auth"]
        if self.config.insecure:
            argv += ["--insecure"]
        if kind == "registry":
            if self.agent_catalog:
                argv += ["--agent-catalog", self.agent_catalog]
            if self.allow_argv:
                argv += ["--allow-argv"]
        if self.config.etcd_tls is not None:
            for flag, value in (
                ("--etcd-ca", self.config.etcd_tls.ca_file),
                ("--etcd-cert", self.config.etcd_tls.cert_file),
                ("--etcd-key", self.config.etcd_tls.key_file),
            ):
                if value:
                    argv += [flag, value]
        with process.ReadyFile() as ready:
            env = {
                # A service presents the service token only: never a user's token from the environment.
                **{k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, TOKEN_FILE_ENV)},
                # Supervised agents' logs go beside the services' (registry: <log_dir>/agents/).
                "MABEAM_LOG_DIR": str(self.log_dir),
                **self.extra_env,
                "PYTHONUNBUFFERED": "1",
                **ready.env(),
            }
            # Its output goes to its log (both streams); its address comes in the ready file.
            with process.open_log(log_file) as log:
                proc = process.spawn(argv, env=env, stdout=log, stderr=log)
            try:
                address = (await ready.wait(proc, timeout)).address
            except TimeoutError:
                await process.terminate(proc, 1)
                raise MeshStartError(
                    f"{kind} did not start within {timeout:.0f} s; log: {log_file}"
                ) from None
            except process.ExitedBeforeReady as exc:
                raise MeshStartError(
                    f"{kind} exited with status {exc.status} before serving: "
                    f"{_last_failure(log_file)} (log: {log_file})"
                ) from None
            except BaseException:
                await process.terminate(proc, 1)
                raise
        return ServiceProcess(kind, proc, address, log_file, n)

    async def stop_replica(self, replica: ServiceProcess, grace: float | None = None) -> int | None:
        """Stop one replica gracefully (SIGTERM, then SIGKILL after the grace)."""
        return await process.terminate(replica.proc, (self.config.grace if grace is None else grace) + 2)

    def watch(self, report: Callable[[str], None]) -> None:
        """From now on, restart a replica or an etcd member of this mesh that dies, with back-off.

        Like compose's ``restart: unless-stopped``: a child that exits (a crash,
        a kill) is started again on its port with its log, tried again with
        doubling waits (stamina) until it is healthy; a child that dies again
        within RESTART_STABLE_S of its restart waits before it is restarted.
        ``report`` gets one line per event, for people. Replicas' logs are
        rotated here too (process.rotate_log). :meth:`stop` ends the watch first.
        """
        if self._watcher is None:
            # Each member's pid as last seen alive (a dead member's pid reads None).
            etcd_pids = {name: m.pid for name, m in self._etcd_members() if m.pid}
            self._watcher = asyncio.create_task(self._watch(report, etcd_pids), name="mesh-watch")

    async def _watch(self, report: Callable[[str], None], etcd_pids: dict[str, int]) -> None:
        reviving: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                await asyncio.sleep(WATCH_INTERVAL_S)
                for name, member in self._etcd_members():
                    if member.pid and process.pid_alive(member.pid):
                        etcd_pids[name] = member.pid
                    elif name not in reviving:
                        old = etcd_pids.get(name)
                        reviving[name] = asyncio.create_task(self._revive_etcd(name, member, old, report))
                for replica in list(self.processes):
                    process.rotate_log(replica.log_file)
                    if replica.name not in reviving and replica.proc.poll() is not None:
                        reviving[replica.name] = asyncio.create_task(self._revive(replica, report))
                for name, task in list(reviving.items()):
                    if task.done():
                        del reviving[name]
                        if not task.cancelled() and task.exception() is not None:
                            report(f"mabeam up: watching {name} failed: {task.exception()}")
        finally:
            for task in reviving.values():
                task.cancel()
            await asyncio.gather(*reviving.values(), return_exceptions=True)

    def _etcd_members(self) -> list[tuple[str, EmbeddedEtcd]]:
        if self.etcd is not None:
            return [("etcd", self.etcd)]
        if self.etcd_cluster is not None:
            return [(f"etcd-{i}", m) for i, m in enumerate(self.etcd_cluster.members)]
        return []

    async def _revive(self, replica: ServiceProcess, report: Callable[[str], None]) -> None:
        died = _how_it_ended(replica.proc.returncode)
        lived = time.monotonic() - replica.started_at
        if replica.restarts and lived < RESTART_STABLE_S:  # a crash loop: wait before trying again
            await asyncio.sleep(min(RESTART_WAIT_MAX_S, RESTART_WAIT_INITIAL_S * 2**replica.restarts))
        began = time.monotonic()
        new = await _until_back(
            replica.name, lambda: self.restart_replica(replica), (MeshStartError, OSError), report
        )
        report(
            f"mabeam up: {replica.name} (pid {replica.pid}) {died}; restarted as pid {new.pid} "
            f"on {new.address}, healthy in {time.monotonic() - began:.1f} s (log: {new.log_file})"
        )

    async def _revive_etcd(
        self, name: str, member: EmbeddedEtcd, old: int | None, report: Callable[[str], None]
    ) -> None:
        began = time.monotonic()
        await _until_back(name, member.restart, (RuntimeError, OSError), report)
        report(
            f"mabeam up: {name} (pid {old}) died; restarted as pid {member.pid} on {member.endpoint}, "
            f"healthy in {time.monotonic() - began:.1f} s"
        )

    async def stop(self) -> None:
        """Stop every replica, then etcd; safe to call twice."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        replicas, self.processes = self.processes, []
        self._started = {}
        await asyncio.gather(*(self.stop_replica(r) for r in replicas), return_exceptions=True)
        if self.etcd is not None:
            await self.etcd.stop()
        if self.etcd_cluster is not None:
            await self.etcd_cluster.stop()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> LocalMesh:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


T = TypeVar("T")


async def _until_back(
    name: str,
    start: Callable[[], Awaitable[T]],
    failures: tuple[type[Exception], ...],
    report: Callable[[str], None],
) -> T:
    """``start()`` again and again, with back-off, until it succeeds; each failure said in one line."""
    async for attempt in stamina.retry_context(
        on=failures,
        attempts=None,
        timeout=None,
        wait_initial=RESTART_WAIT_INITIAL_S,
        wait_max=RESTART_WAIT_MAX_S,
        wait_jitter=0,
    ):
        with attempt:
            try:
                return await start()
            except failures as exc:
                report(f"mabeam up: {name} did not come back ({_first_line(str(exc))}); trying again")
                raise
    raise AssertionError("unreachable: the retries are unbounded")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _how_it_ended(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _last_failure(path: Path) -> str:
    """Why a service did not start, in one line: its last CRITICAL or ERROR record, else its last line."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("level") in ("CRITICAL", "ERROR"):
            return _first_line(str(record.get("message", "")))
    return _first_line(lines[-1]) if lines else "(it logged nothing)"


class _NotServing(Exception):
    """The health check answered, but not SERVING (yet)."""


async def wait_healthy(address: str, service: str = "", *, timeout: float = 15.0, tls: bool = False) -> None:
    """Check grpc.health.v1 on ``address`` again (every 50 ms) until ``service`` is SERVING."""
    if tls:
        return  # the caller checks TLS endpoints with its own credentials
    async with aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            async for attempt in stamina.retry_context(
                on=(grpc.RpcError, _NotServing),
                attempts=None,
                timeout=timeout,
                wait_initial=0.05,
                wait_max=0.05,
                wait_jitter=0,
            ):
                with attempt:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                    if reply.status != health_pb2.HealthCheckResponse.SERVING:
                        raise _NotServing
        except (grpc.RpcError, _NotServing):
            raise MeshStartError(
                f"{service or address} at {address} not healthy within {timeout:.0f} s"
            ) from None
