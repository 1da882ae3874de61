"""Child processes that never outlive their parent.

Every process the mesh starts (etcd, service replicas, supervised agents) is
started through :func:`spawn`: on Linux the child asks the kernel for SIGKILL
when its parent dies (``PR_SET_PDEATHSIG``), so even a ``kill -9`` of
``mabeam up`` leaves no orphan behind.

Readiness is a structured signal, not a line of output to parse: the parent
passes ``MABEAM_READY_FILE=<path>`` (:class:`ReadyFile`, in a temporary
directory the parent owns and removes); once the child serves it writes one
JSON document ``{"address": "host:port", "pid": N}`` there, atomically (a
temporary file, then ``os.replace``), with :func:`mabeam.server.announce_ready`
(in the SDK: agents announce themselves as services do). The parent
waits for the file, with the child's exit as the other end of the wait and a
deadline. The child's output is then free to go to a log file.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mabeam.server import READY_FILE_ENV

_PR_SET_PDEATHSIG = 1
# Looked up now, in the parent: loading a library in a child between fork and
# exec can deadlock when other threads (grpc's) held the loader's lock.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(parent_pid: int | None = None) -> None:
    """preexec_fn: SIGKILL this child when its parent dies (Linux only).

    If the parent died between fork and prctl the signal would never come, so
    the child checks that its parent is still the one that forked it.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if parent_pid is not None and os.getppid() != parent_pid:
            os._exit(1)


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as a child that dies with this process."""
    return subprocess.Popen(
        list(argv),
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        preexec_fn=functools.partial(die_with_parent, os.getpid()),
        start_new_session=new_session,
    )


async def terminate(proc: subprocess.Popen[bytes], grace: float = 5.0) -> int | None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; returns the exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(proc.wait, grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    return await asyncio.to_thread(proc.wait)


async def wait_exit(proc: subprocess.Popen[bytes]) -> int:
    """Wait for ``proc`` to exit without a thread per process (pidfd on Linux); its status."""
    if proc.poll() is not None:
        return int(proc.returncode)
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: a thread waits instead
        return int(await asyncio.to_thread(proc.wait))
    exited: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, on_exit)
    try:
        if proc.poll() is None:
            await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return int(proc.wait())


# A child's log file (a service replica's under LocalMesh, a supervised agent's)
# is rotated once it passes this size: copied to ``<name>.1`` (the one older
# file kept) and emptied in place. The child writes with O_APPEND, so it goes
# on at the start of the emptied file; nothing reads its output through a pipe.
# A log takes at most about twice this size, plus what is written between looks.
LOG_MAX_BYTES = 10 * 1024 * 1024


def open_log(path: str | os.PathLike[str]) -> IO[bytes]:
    """``path`` opened for a child's stdout and stderr: appended to (O_APPEND), its folder made.

    Pass it to :func:`spawn` and close it once the child has started (the child keeps its own copy).
    """
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    return open(path, "ab")


def rotate_log(path: str | os.PathLike[str], max_bytes: int = LOG_MAX_BYTES) -> bool:
    """Copy-truncate ``path`` into ``<path>.1`` once it is larger than ``max_bytes``; True if it did.

    Copy and truncate, not rename: the child keeps writing to the file it has open.
    """
    try:
        if os.path.getsize(path) <= max_bytes:
            return False
        shutil.copyfile(path, f"{os.fspath(path)}.1")
        os.truncate(path, 0)
    except OSError:
        return False
    return True


def python_module_argv(module: str, *args: str) -> list[str]:
    """argv running ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def pid_alive(pid: int) -> bool:
    """True when a process with ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@dataclass(frozen=True)
class Ready:
    """What a child wrote to its ready file: the address it serves on, and its pid."""

    address: str
    pid: int


class ExitedBeforeReady(Exception):
    """The child exited before it wrote its ready file."""

    def __init__(self, status: int) -> None:
        super().__init__(f"exited with status {status} before serving")
        self.status = status


class ReadyFile:
    """Where one child says it serves; the parent creates it, passes :meth:`env`, then :meth:`wait`.

    Example::

        with ReadyFile() as ready:
            proc = spawn(argv, env={**os.environ, **ready.env()}, stdout=log, stderr=log)
            address = (await ready.wait(proc, timeout=30)).address
    """

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="mabeam-ready-")
        self.path = os.path.join(self._dir, "ready.json")

    def env(self) -> dict[str, str]:
        """The variable that tells the child where to write."""
        return {READY_FILE_ENV: self.path}

    def read(self) -> Ready | None:
        """The document once written (it appears whole: the child renames it into place)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return None
        return Ready(address=str(doc["address"]), pid=int(doc["pid"]))

    async def wait(self, proc: subprocess.Popen[bytes], timeout: float) -> Ready:
        """The child's document; ExitedBeforeReady if it exits first, TimeoutError at the deadline."""
        exited = asyncio.ensure_future(wait_exit(proc))
        try:
            async with asyncio.timeout(timeout):
                while True:
                    ready = self.read()
                    if ready is not None:
                        return ready
                    if exited.done():
                        raise ExitedBeforeReady(exited.result())
                    # A local file: looking every 10 ms costs nothing; the exit wakes us at once.
                    await asyncio.wait({exited}, timeout=0.01)
        finally:
            exited.cancel()

    def close(self) -> None:
        """Remove the directory (the child has written, or will never be read)."""
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ReadyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def all_threads_stopped(pid: int) -> bool:
    """True when every thread of ``pid`` is stopped (state T or t in ``/proc``); True where there is no ``/proc``."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.parent.exists():
        return not Path("/proc/self").exists()  # no such process (on Linux), or no /proc at all
    for stat in tasks.glob("*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # the thread ended meanwhile
        # pid (comm) STATE ...: comm may hold spaces or parentheses, the state follows the last ')'.
        if text[text.rindex(")") + 2] not in "Tt":
            return False
    return True
