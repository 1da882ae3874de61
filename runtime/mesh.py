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
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import stamina
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mabeam.config import SERVICE_NAMES, SERVICES, MeshConfig
from mabeam.runtime import process
from mabeam.runtime.embedded_etcd import EmbeddedEtcd, EtcdCluster

# Replica n of a service on a fixed port listens on that port + n * REPLICA_PORT_STEP
# (registry 50051, 50151, ...); etcd member n on its ports + n * ETCD_PORT_STEP.
REPLICA_PORT_STEP = 100
ETCD_PORT_STEP = 10


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

    @property
    def pid(self) -> int:
        return self.proc.pid


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
    log_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    etcd: EmbeddedEtcd | None = None
    etcd_cluster: EtcdCluster | None = None
    processes: list[ServiceProcess] = field(default_factory=list)
    startup_seconds: float = 0.0
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    # Replicas started so far per kind, counted before the first await: replicas
    # started together (gather) must not all take index 0 (same port, same log).
    _started: dict[str, int] = field(default_factory=dict)

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
                )
                await self.etcd.start()
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

    async def start_replica(
        self, kind: str, port: int | None = None, timeout: float = 30.0
    ) -> ServiceProcess:
        """Start one more replica of ``kind`` (port 0 when replicas share a host)."""
        assert self.log_dir is not None
        n = self._started.get(kind, 0)
        self._started[kind] = n + 1
        if port is None:
            port = self.replica_port(kind, n)
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
        )
        if self.config.tls is not None:
            argv += ["--tls-cert", self.config.tls.cert_file, "--tls-key", self.config.tls.key_file]
            if self.config.tls.ca_file:
                argv += ["--tls-ca", self.config.tls.ca_file]
        if self.config.etcd_tls is not None:
            for flag, value in (
                ("--etcd-ca", self.config.etcd_tls.ca_file),
                ("--etcd-cert", self.config.etcd_tls.cert_file),
                ("--etcd-key", self.config.etcd_tls.key_file),
            ):
                if value:
                    argv += [flag, value]
        with process.ReadyFile() as ready:
            env = {**os.environ, **self.extra_env, "PYTHONUNBUFFERED": "1", **ready.env()}
            # Its output goes to its log (both streams); its address comes in the ready file.
            with open(log_file, "ab") as log:  # noqa: ASYNC230 (a local file, opened once)
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
                    f"{kind} exited with status {exc.status} before serving:\n{_tail(log_file)}"
                ) from None
            except BaseException:
                await process.terminate(proc, 1)
                raise
        replica = ServiceProcess(kind, proc, address, log_file, n)
        self.processes.append(replica)
        await wait_healthy(address, SERVICE_NAMES[kind], timeout=timeout, tls=self.config.tls is not None)
        return replica

    async def stop_replica(self, replica: ServiceProcess, grace: float | None = None) -> int | None:
        """Stop one replica gracefully (SIGTERM, then SIGKILL after the grace)."""
        return await process.terminate(replica.proc, (self.config.grace if grace is None else grace) + 2)

    async def stop(self) -> None:
        """Stop every replica, then etcd; safe to call twice."""
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


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


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
