"""Several "hosts" on one machine: Linux network namespaces joined by a bridge (:class:`NetworkLab`).

A lab is made of namespaces named ``mbl-<pid>-<net>-<role>`` (``pid`` the test
process, ``net`` the third octet of its private /24 ``10.231.<net>.0/24``):

=================  ==========================================================
namespace          what it holds
=================  ==========================================================
``...-sw``         the "switch": a Linux bridge ``br0`` and, per host, the
                   switch end ``v<i>`` of the host's veth pair
``...-h<i>``       host ``h<i>``: loopback, and ``eth0`` (the other end of
                   its veth pair) with the address ``10.231.<net>.<i+1>``
``...-client``     the ``client`` host, the same way (``10.231.<net>.200``):
                   where test-side clients run; no mesh process runs there
=================  ==========================================================

Nothing is added to the root namespace: the veth pairs are made inside the
switch namespace, and the test process itself is not on the bridge (it
starts everything with ``ip netns exec``). The addresses exist only inside
the lab's namespaces, so another lab (another test process) may pick the same
/24 without harm; a lab still avoids the /24s of the labs it sees.

``cut(host)`` sets the switch end of the host's link down (a partition, not a
crash: the host keeps its address and its processes keep running);
``heal(host)`` sets it up again. ``run(host, argv, ...)`` starts a process in
the host's namespace, in its own process group, its output to a log file.
On leaving ``async with``, every process the lab started is ended (SIGTERM,
then SIGKILL), with anything else still running in its namespaces, and the
namespaces are deleted, whether the test passed or failed. Labs left behind by
a test process that died (its pid gone) are removed when the next lab starts.

Needs root and ``ip`` with network namespaces: elsewhere :func:`require_netns`
skips the test with a one-line reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from mabeam.runtime import process

PREFIX = "mbl"
_NAME = re.compile(rf"^{PREFIX}-(\d+)-(\d+)-(\S+)")
CLIENT = "client"
CLIENT_OCTET = 200


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def require_netns() -> None:
    """Skip the calling test (one line saying why) unless network namespaces can be made here."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make network namespaces (CI runs it as root)")
    if shutil.which("ip") is None:
        pytest.skip("needs the `ip` command (iproute2) to make network namespaces")
    probe = f"{PREFIX}-{os.getpid()}-0-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        pytest.skip(f"network namespaces do not work here: {made.stderr.strip() or made.returncode}")
    _ip("netns", "del", probe, check=False)


def _kill_namespace_processes(namespace: str) -> None:
    pids = _ip("netns", "pids", namespace, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def remove_stale_labs() -> list[str]:
    """Delete the namespaces of labs whose test process is gone (and kill what still runs in them)."""
    removed = []
    for namespace in _namespaces():
        m = _NAME.match(namespace)
        if m and not process.pid_alive(int(m.group(1))):
            _kill_namespace_processes(namespace)
            _ip("netns", "del", namespace, check=False)
            removed.append(namespace)
    return removed


@dataclass
class Host:
    """One namespace of a lab: its name, its address on the bridge, its switch port."""

    name: str
    namespace: str
    address: str
    port: str  # the switch end of its veth pair, in the switch namespace


@dataclass
class NetworkLab:
    """``hosts`` hosts ``h0`` ... and a ``client`` host on one bridge; see the module docstring."""

    workdir: Path
    hosts: int = 3
    net: int = 0
    switch: str = ""
    by_name: dict[str, Host] = field(default_factory=dict)
    _processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    _logs: list[IO[bytes]] = field(default_factory=list)
    _made: list[str] = field(default_factory=list)

    @property
    def host_names(self) -> list[str]:
        return [f"h{i}" for i in range(self.hosts)]

    def address(self, host: str) -> str:
        return self.by_name[host].address

    async def __aenter__(self) -> NetworkLab:
        require_netns()
        remove_stale_labs()
        try:
            await asyncio.to_thread(self._make)
        except BaseException:
            await asyncio.to_thread(self._delete)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_all()
        await asyncio.to_thread(self._delete)

    def _make(self) -> None:
        taken = {int(m.group(2)) for n in _namespaces() if (m := _NAME.match(n))}
        free = [n for n in range(1, 255) if n not in taken]
        self.net = random.choice(free)
        base = f"{PREFIX}-{os.getpid()}-{self.net}"
        self.switch = f"{base}-sw"
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        names = [*self.host_names, CLIENT]
        for i, name in enumerate(names):
            octet = CLIENT_OCTET if name == CLIENT else i + 1
            host = Host(name, f"{base}-{name}", f"10.231.{self.net}.{octet}", f"v{i}")
            self._add_namespace(host.namespace)
            # Both ends made inside the lab: the pair never shows in the root namespace.
            _ip("-n", self.switch, "link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)  # fmt: skip
            _ip("-n", self.switch, "link", "set", host.port, "master", "br0")
            _ip("-n", self.switch, "link", "set", host.port, "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.namespace, "link", "set", "eth0", "up")
            self.by_name[name] = host

    def _add_namespace(self, namespace: str) -> None:
        _ip("netns", "add", namespace)
        self._made.append(namespace)

    def _delete(self) -> None:
        for namespace in reversed(self._made):
            _kill_namespace_processes(namespace)
            _ip("netns", "del", namespace, check=False)
        self._made.clear()

    # -- processes -------------------------------------------------------------------------

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` as run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.by_name[host].namespace, *argv]

    async def run(
        self, host: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, log: Path
    ) -> asyncio.subprocess.Process:
        """Start ``argv`` in ``host``'s namespace, in a process group of its own, output to ``log``.

        ``ip netns exec`` execs the command: the process is the command itself.
        The lab ends it on exit if the test has not.
        """
        log.parent.mkdir(parents=True, exist_ok=True)
        out = log.open("ab")
        self._logs.append(out)
        proc = await asyncio.create_subprocess_exec(
            *self.command(host, argv),
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._processes.append(proc)
        return proc

    async def output(
        self, host: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 60
    ) -> tuple[int, str, str]:
        """Run ``argv`` in ``host``'s namespace to its end: (exit code, stdout, stderr)."""
        proc = await asyncio.create_subprocess_exec(
            *self.command(host, argv),
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._processes.append(proc)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            await self.stop(proc, grace=0)
            raise AssertionError(
                f"{' '.join(argv)[:200]} in {host}: not finished within {timeout} s"
            ) from None
        return proc.returncode or 0, out.decode(), err.decode()

    async def stop(self, proc: asyncio.subprocess.Process, *, grace: float = 5.0) -> int:
        """End ``proc``'s process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
            try:
                await asyncio.wait_for(proc.wait(), grace if grace > 0 else 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        with contextlib.suppress(ProcessLookupError):  # what the process group left behind
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode if proc.returncode is not None else -1

    async def stop_all(self, grace: float = 5.0) -> None:
        await asyncio.gather(*(self.stop(p, grace=grace) for p in self._processes), return_exceptions=True)
        self._processes.clear()
        for out in self._logs:
            out.close()
        self._logs.clear()

    # -- the network -------------------------------------------------------------------------

    async def cut(self, host: str) -> None:
        """Partition ``host``: its link down on the switch side (it keeps its address and processes)."""
        await asyncio.to_thread(_ip, "-n", self.switch, "link", "set", self.by_name[host].port, "down")

    async def heal(self, host: str) -> None:
        """Join ``host`` to the bridge again."""
        await asyncio.to_thread(_ip, "-n", self.switch, "link", "set", self.by_name[host].port, "up")

    def link_up(self, host: str) -> bool:
        out = _ip("-n", self.switch, "-br", "link", "show", self.by_name[host].port).stdout
        return " UP " in f" {out} " or "UP" in out.split()[1:2]

    def describe(self) -> dict[str, Any]:
        return {name: h.address for name, h in self.by_name.items()}
