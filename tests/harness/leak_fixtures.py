"""A test may leave no asyncio task and no child process behind (a pytest plugin).

The session has one event loop: a task a test cancelled and never awaited, or
forgot, runs on (or dies noisily) during later tests; a child process a test
started and never ended holds ports and files. Each test is compared before and
after (its fixtures torn down, with a short grace for what is just ending);
what is left fails it at teardown, and is then cancelled or killed so that the
next test starts clean.

What a session-, package-, module- or class-scoped fixture starts lives on by
design (the session's etcd, its client): the tasks and children that appear
while such a fixture is set up are recorded and allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Generator
from typing import Any

import psutil
import pytest

from harness.wait import eventually

GRACE = 2.0  # seconds for tasks and processes that are just ending (a loaded machine is slow)

_loop: asyncio.AbstractEventLoop | None = None
_allowed_tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
_allowed_pids: set[int] = set()


def _tasks() -> set[asyncio.Task[Any]]:
    if _loop is None or _loop.is_closed():
        return set()
    return {t for t in asyncio.all_tasks(_loop) if not t.done()}


def _children() -> dict[int, psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return {p.pid: p for p in psutil.Process().children(recursive=True)}
    return {}


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())[:200]!r} ({process.status()})"
    except psutil.Error:
        return f"{process.pid} (gone)"


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: Any, request: Any) -> Generator[None, Any, Any]:
    if fixturedef.scope == "function":
        return (yield)
    tasks, children = _tasks(), set(_children())
    try:
        return (yield)
    finally:
        _allowed_tasks.update(_tasks() - tasks)
        _allowed_pids.update(set(_children()) - children)


@pytest.fixture(scope="session", autouse=True)
async def _session_loop() -> AsyncIterator[None]:
    """Records the session's event loop (set up before any other session fixture: autouse goes first)."""
    global _loop
    _loop = asyncio.get_running_loop()
    yield


@pytest.fixture(autouse=True)
async def no_leaks(_session_loop: None) -> AsyncIterator[None]:
    """Fails a test that leaves an asyncio task or a child process behind."""
    tasks_before = _tasks()
    children_before = set(_children())
    yield
    me = asyncio.current_task()  # the teardown runs in a task of its own

    def left_tasks() -> set[asyncio.Task[Any]]:
        return {t for t in _tasks() - tasks_before - set(_allowed_tasks) if t is not me}

    def left_children() -> list[psutil.Process]:
        return [
            p
            for pid, p in _children().items()
            if pid not in children_before and pid not in _allowed_pids and _alive(p)
        ]

    with contextlib.suppress(AssertionError):
        await eventually(lambda: not (left_tasks() or left_children()), timeout=GRACE, what="no leftovers")
    tasks, children = left_tasks(), left_children()
    if not tasks and not children:
        return
    lines = [f"task {t.get_name()}: {t.get_coro()!r}" for t in tasks]
    lines += [f"child process {_describe(p)}" for p in children]
    for task in tasks:
        task.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), GRACE)
    for process in children:
        with contextlib.suppress(psutil.Error):
            process.kill()
    await asyncio.to_thread(psutil.wait_procs, children, timeout=GRACE)
    pytest.fail("the test left behind (now cancelled/killed):\n  " + "\n  ".join(lines), pytrace=False)
