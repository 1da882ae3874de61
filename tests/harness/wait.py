"""Waiting for the mesh to converge, by polling what a user can observe."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], T | Awaitable[T]], *, timeout: float = 5.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        result = probe()
        last = await result if inspect.isawaitable(result) else result  # type: ignore[assignment]
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or probe} (last: {last!r})")
        await asyncio.sleep(interval)
