"""A watch-fed cache of everything under an etcd prefix.

Services answer lookups from memory instead of an etcd read per call: the
cache lists the prefix once, then follows a :class:`mabeam.runtime.etcd.ResumingWatch`
from the next revision, so it sees every change exactly once, also across
etcd restarts. If the revision was compacted meanwhile, it lists again. etcd
stays the source of truth: the cache is only ever fed from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, ItemsView
from typing import Generic, TypeVar

import stamina

from mabeam.runtime.etcd import EtcdClient, ResumingWatch, WatchCompacted, WatchEvent, snapshot

T = TypeVar("T")
log = logging.getLogger("mabeam.runtime.cache")

Listener = Callable[[str, bytes, "T | None", "T | None", int], None]


class PrefixCache(Generic[T]):
    """key -> decoded value for every key under ``prefix``, kept current by a watch.

    ``decode(key, value)`` returns the cached object or None to ignore the key.
    Listeners get ``(kind, key, old, new, revision)`` for each change, kind
    "PUT" or "DELETE" (and "RESET" with key b"" after a re-list).
    """

    def __init__(self, client: EtcdClient, prefix: bytes, decode: Callable[[bytes, bytes], T | None]) -> None:
        self._client = client
        self.prefix = prefix
        self._decode = decode
        self._items: dict[bytes, T] = {}
        self.revision = 0
        self._listeners: list[Listener[T]] = []
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        # Replaced on every change; waiters hold the old one, which is set.
        self._advanced = asyncio.Event()

    def add_listener(self, listener: Listener[T]) -> None:
        """Call ``listener`` on every change (synchronously, from the watch task)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener[T]) -> None:
        """Stop calling ``listener``."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def get(self, key: bytes) -> T | None:
        """The cached value of ``key``."""
        return self._items.get(key)

    def items(self) -> ItemsView[bytes, T]:
        """Every cached key and value."""
        return self._items.items()

    def __len__(self) -> int:
        return len(self._items)

    async def start(self) -> None:
        """List the prefix, then follow changes in the background."""
        await self._load()
        self._task = asyncio.create_task(self._follow(), name=f"cache:{self.prefix.decode()}")

    async def _load(self) -> None:
        kvs, revision = await snapshot(self._client, self.prefix)
        fresh: dict[bytes, T] = {}
        for kv in kvs:
            value = self._decode(kv.key, kv.value)
            if value is not None:
                fresh[kv.key] = value
        old, self._items = self._items, fresh
        self.revision = revision
        # Listeners see the initial listing as PUTs too, so indexes built
        # from them start complete.
        for key in old.keys() - fresh.keys():
            self._emit("DELETE", key, old[key], None, revision)
        for key, value in fresh.items():
            if old.get(key) is not value:
                self._emit("PUT", key, old.get(key), value, revision)
        self.ready.set()

    async def _follow(self) -> None:
        while True:
            try:
                async for event in ResumingWatch(self._client, self.prefix, start_revision=self.revision + 1):
                    self._apply(event)
            except WatchCompacted:
                log.warning("cache %s: revision compacted; listing again", self.prefix.decode())
                async for attempt in stamina.retry_context(
                    on=Exception, attempts=None, timeout=None, wait_initial=0.5, wait_max=0.5, wait_jitter=0.0
                ):
                    with attempt:
                        await self._load()

    def _apply(self, event: WatchEvent) -> None:
        self.revision = event.mod_revision
        advanced, self._advanced = self._advanced, asyncio.Event()
        advanced.set()
        old = self._items.get(event.key)
        if event.kind == "PUT":
            new = self._decode(event.key, event.value)
            if new is None:
                self._items.pop(event.key, None)
                if old is not None:
                    self._emit("DELETE", event.key, old, None, event.mod_revision)
                return
            self._items[event.key] = new
            self._emit("PUT", event.key, old, new, event.mod_revision)
        else:
            self._items.pop(event.key, None)
            self._emit("DELETE", event.key, old, None, event.mod_revision)

    def _emit(self, kind: str, key: bytes, old: T | None, new: T | None, revision: int) -> None:
        for listener in self._listeners:
            try:
                listener(kind, key, old, new, revision)
            except Exception:
                log.exception("cache listener failed")

    async def wait_revision(self, revision: int, timeout: float = 5.0) -> None:
        """Wait until the cache has seen ``revision`` (read-your-writes after a put)."""
        async with asyncio.timeout(timeout):
            while self.revision < revision:
                await self._advanced.wait()

    async def stop(self) -> None:
        """Stop following; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
