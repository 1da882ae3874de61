"""The deadline of a Run* call: its session's deadline bounds the whole call, what wraps the session too.

:func:`within_deadline` decorates the coordination service's Run* handlers;
the session inside reads its call (:func:`current_call`) to count its time
from the call's start and to leave its answer or error where the decorator
finds it when the deadline passes first.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from mabeam import errors
from mabeam.runtime import validate
from mabeam.services.coordination.engine import FINISH_MIN_S
from mabeam.v1 import coordination_pb2


def deadline_s(settings: coordination_pb2.SessionSettings) -> float:
    return validate.seconds(settings.deadline, "settings.deadline", default=10.0, minimum=0.01, maximum=600)


@dataclass
class Call:
    """One Run* call: when it began, and the session's answer or why it has none."""

    started: float
    session: coordination_pb2.Session | None = None
    error: errors.MabeamError | None = None


_CALL: contextvars.ContextVar[Call | None] = contextvars.ContextVar("coordination_call", default=None)
R = TypeVar("R")


def _background_done(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a call given up on is not an unhandled error


def within_deadline(
    response_type: Callable[[], R],
) -> Callable[[Callable[[Any, Any, Any], Awaitable[R]]], Callable[[Any, Any, Any], Awaitable[R]]]:
    """Bound a Run* call by its session's deadline, what wraps the session included.

    The session's own waits are bounded inside (:meth:`.server.CoordinationServicer._session`);
    this bounds what surrounds it, e.g. the request_id's record in etcd
    (:func:`mabeam.runtime.idempotency.idempotent`, which it must wrap). The
    session's time counts from here. At the deadline (and ``FINISH_MIN_S``)
    the call answers: the session if it was stored (only its request record
    is late), else the session's own DEADLINE_EXCEEDED, else one naming the
    wait; the work left is cancelled in the background.
    """

    def wrap(fn: Callable[[Any, Any, Any], Awaitable[R]]) -> Callable[[Any, Any, Any], Awaitable[R]]:
        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: Any) -> R:
            deadline = deadline_s(request.settings)
            call = Call(time.monotonic())
            token = _CALL.set(call)
            try:
                task = asyncio.ensure_future(fn(self, request, context))  # with the call in its context
            finally:
                _CALL.reset(token)
            try:
                done, _ = await asyncio.wait({task}, timeout=deadline + FINISH_MIN_S)
            except asyncio.CancelledError:
                task.cancel()
                raise
            if done:
                return task.result()
            task.cancel()
            task.add_done_callback(_background_done)
            if call.session is not None:
                response = response_type()
                response.session.CopyFrom(call.session)  # type: ignore[attr-defined]
                return response
            if call.error is not None:
                raise call.error
            raise errors.DeadlineExceeded(
                f"the session's deadline ({deadline:g} s) passed while etcd did not answer "
                "(the session's or its request_id's record); it may have run"
            )

        return handler

    return wrap


def current_call() -> Call | None:
    """The Run* call this task serves (None outside :func:`within_deadline`)."""
    return _CALL.get()
