"""Run a coroutine eagerly: on the spot until it first suspends, in a task only if it does.

Most protocol handlers answer without waiting for anything. Run this way, a
``CoordinateBatch`` of 1,000 agents costs no task, no future and no callback
per agent (Python 3.12's eager task factory does much the same; we support
3.11). Used by the agent service (:mod:`mabeam._agent_service`) for batches and
idempotent steps; :mod:`mabeam.agent` re-exports :func:`run_eagerly`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")


class Finished(NamedTuple):
    """What a coroutine run eagerly ended with, without ever suspending."""

    value: Any
    error: BaseException | None


def run_eagerly(coro: Coroutine[Any, Any, T]) -> Finished | asyncio.Future[T]:
    """Run ``coro`` now until it first suspends; a task takes over only if it does.

    Most protocol handlers answer without waiting for anything: run that way,
    a batch of 1,000 agents costs no task, no future and no callback per
    agent (Python 3.12's eager task factory does much the same). Returns the
    result (or the exception) when the coroutine finished at once, else a
    future of it.
    """
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return Finished(stop.value, None)
    except Exception as exc:
        return Finished(None, exc)
    return asyncio.ensure_future(_resume(coro, yielded))


async def _resume(coro: Coroutine[Any, Any, T], yielded: Any) -> T:
    """Drive a started coroutine to its end, as a Task would.

    A coroutine suspended on a future yields it (flagged as blocking); a Task
    would clear the flag and resume the coroutine once the future is done.
    """
    loop = asyncio.get_running_loop()
    while True:
        if yielded is None:
            await asyncio.sleep(0)
        else:
            yielded._asyncio_future_blocking = False
            waiter: asyncio.Future[None] = loop.create_future()

            def wake(_: Any, waiter: asyncio.Future[None] = waiter) -> None:
                if not waiter.done():
                    waiter.set_result(None)

            yielded.add_done_callback(wake)
            try:
                await waiter
            except asyncio.CancelledError as exc:
                yielded.cancel()
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                continue
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
