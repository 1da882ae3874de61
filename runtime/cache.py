"""A watch-fed cache of everything under an etcd prefix.

Services answer lookups from memory instead of an etcd read per call: the
cache lists the prefix once, then follows a :class:`mabeam.runtime.etcd.ResumingWatch`
from the next revision, so it sees every change exactly once, also across
etcd restarts. If the revision was compacted meanwhile, or following fails in
any other way, it lists again (with backoff) and goes on. etcd stays the
source of truth: the cache is only ever fed from it.

A cache says whether it can follow (:attr:`PrefixCache.healthy`, and its
health listeners): not while its watch stream is broken (etcd down or out of
reach) nor until a failed follow has listed again. :func:`report_health`
turns that into the owning server's gRPC health: NOT_SERVING while any of
its caches cannot follow, since it would answer from a frozen copy. A value
that cannot be decoded is logged with its key and skipped (as if absent),
never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable, ItemsView
from typing import Any, Generic, TypeVar

import stamina

from mabeam.runtime.etcd import (
    ClientClosedError,
    EtcdClient,
    ResumingWatch,
    WatchCompacted,
    WatchEvent,
    snapshot,
)
from mabeam.server import MeshServer

T = TypeVar("T")
log = logging.getLogger("mabeam.runtime.cache")

Listener = Callable[[str, bytes, "T | None", "T | None", int], None]
HealthListener = Callable[["PrefixCache[Any]", bool], None]

# Waits between attempts to list again after following failed.
RELOAD_WAIT_INITIAL_S = 0.1
RELOAD_WAIT_MAX_S = 2.0


class PrefixCache(Generic[T]):
    """key -> decoded value for every key under ``prefix``, kept current by a watch.

    ``decode(key, value)`` returns the cached object or None to ignore the key.
    Listeners get ``(kind, key, old, new, revision)`` for each change, kind
    "PUT" or "DELETE" (and "RESET" with key b"" after a re-list). ``decode``
    raising is logged with the key and the key is skipped (as if None).
    Health listeners get ``(cache, healthy)`` when :attr:`healthy` changes.
    """

    def __init__(self, client: EtcdClient, prefix: bytes, decode: Callable[[bytes, bytes], T | None]) -> None:
        self._client = client
        self.prefix = prefix
        self._decode = decode
        self._items: dict[bytes, T] = {}
        self._revisions: dict[bytes, tuple[int, int]] = {}  # key -> (create, mod) revision
        self.revision = 0
        self._listeners: list[Listener[T]] = []
        self._health_listeners: list[HealthListener] = []
        # False until listed, and while following is broken (see the module's docstring).
        self.healthy = False
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

    def add_health_listener(self, listener: HealthListener) -> None:
        """Call ``listener(cache, healthy)`` whenever :attr:`healthy` changes."""
        self._health_listeners.append(listener)

    def get(self, key: bytes) -> T | None:
        """The cached value of ``key``."""
        return self._items.get(key)

    def mod_revision(self, key: bytes) -> int:
        """The etcd revision that last wrote the cached ``key`` (0 when not cached)."""
        return self._revisions.get(key, (0, 0))[1]

    def create_revision(self, key: bytes) -> int:
        """The etcd revision that created the cached ``key`` (0 when not cached)."""
        return self._revisions.get(key, (0, 0))[0]

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
        revisions: dict[bytes, tuple[int, int]] = {}
        for kv in kvs:
            value = self._decode_or_skip(kv.key, kv.value)
            if value is not None:
                fresh[kv.key] = value
                revisions[kv.key] = (int(kv.create_revision), int(kv.mod_revision))
        old, self._items = self._items, fresh
        self._revisions = revisions
        self.revision = revision
        # Listeners see the initial listing as PUTs too, so indexes built
        # from them start complete.
        for key in old.keys() - fresh.keys():
            self._emit("DELETE", key, old[key], None, revision)
        for key, value in fresh.items():
            if old.get(key) is not value:
                self._emit("PUT", key, old.get(key), value, revision)
        self.ready.set()
        self._set_healthy(True)

    def _decode_or_skip(self, key: bytes, value: bytes) -> T | None:
        try:
            return self._decode(key, value)
        except Exception as exc:
            log.warning(
                "cache %s: cannot decode the value of %r (%s); skipped",
                self.prefix.decode(errors="replace"),
                key,
                exc,
            )
            return None

    def _set_healthy(self, healthy: bool) -> None:
        if healthy == self.healthy:
            return
        self.healthy = healthy
        if not healthy:
            log.warning(
                "cache %s cannot follow etcd; stale until it can", self.prefix.decode(errors="replace")
            )
        else:
            log.info("cache %s follows etcd again", self.prefix.decode(errors="replace"))
        for listener in self._health_listeners:
            try:
                listener(self, healthy)
            except Exception:
                log.exception("cache health listener failed")

    async def _follow(self) -> None:
        """Follow the watch for good: after any failure, wait (with backoff), list again and go on.

        The watch itself resumes across reconnects (the cache is unhealthy
        while it is broken); what reaches here is a compacted revision or a
        failure of anything else, after which the listing is the only sound
        way back. A closed client ends following.
        """

        def retry(exc: BaseException) -> bool:
            # stamina asks about every exception, cancellation included: that one ends following.
            if not isinstance(exc, Exception) or isinstance(exc, ClientClosedError) or self._client.closed:
                return False
            if isinstance(exc, WatchCompacted):
                log.warning(
                    "cache %s: revision compacted; listing again", self.prefix.decode(errors="replace")
                )
            else:
                log.warning(
                    "cache %s stopped following (%s: %s); listing again",
                    self.prefix.decode(errors="replace"),
                    type(exc).__name__,
                    exc,
                    exc_info=not isinstance(exc, OSError | TimeoutError),
                )
            self._set_healthy(False)
            return True

        with contextlib.suppress(ClientClosedError):
            async for attempt in stamina.retry_context(
                on=retry,
                attempts=None,
                timeout=None,
                wait_initial=RELOAD_WAIT_INITIAL_S,
                wait_max=RELOAD_WAIT_MAX_S,
                wait_jitter=RELOAD_WAIT_INITIAL_S,
            ):
                with attempt:
                    if not self.healthy:
                        await self._load()
                    watch = ResumingWatch(
                        self._client,
                        self.prefix,
                        start_revision=self.revision + 1,
                        on_connection=self._set_healthy,
                    )
                    async with watch:
                        async for event in watch:
                            self._apply(event)
        self._set_healthy(False)

    def _apply(self, event: WatchEvent) -> None:
        self.revision = event.mod_revision
        advanced, self._advanced = self._advanced, asyncio.Event()
        advanced.set()
        old = self._items.get(event.key)
        if event.kind == "PUT":
            new = self._decode_or_skip(event.key, event.value)
            if new is None:
                self._items.pop(event.key, None)
                self._revisions.pop(event.key, None)
                if old is not None:
                    self._emit("DELETE", event.key, old, None, event.mod_revision)
                return
            self._items[event.key] = new
            self._revisions[event.key] = (event.create_revision, event.mod_revision)
            self._emit("PUT", event.key, old, new, event.mod_revision)
        else:
            self._items.pop(event.key, None)
            self._revisions.pop(event.key, None)
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


class _HealthReport:
    """One server's gRPC health, following the health of the caches it answers from."""

    def __init__(self, server: MeshServer) -> None:
        self._server = server
        self._unhealthy: set[int] = set()
        self._changed = asyncio.Event()
        self._published: bool | None = True  # a server starts SERVING
        server.spawn(self._publish(), "cache-health")

    def on_health(self, cache: PrefixCache[Any], healthy: bool) -> None:
        if healthy:
            self._unhealthy.discard(id(cache))
        else:
            self._unhealthy.add(id(cache))
        self._changed.set()

    def republish(self) -> None:
        """Publish the current state again, even if unchanged (start set SERVING meanwhile)."""
        self._published = None
        self._changed.set()

    async def _publish(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            wanted = not self._unhealthy
            if wanted != self._published:
                self._published = wanted
                await self._server.set_serving(wanted)


_reports: weakref.WeakKeyDictionary[MeshServer, _HealthReport] = weakref.WeakKeyDictionary()


def report_health(server: MeshServer, *caches: PrefixCache[Any]) -> None:
    """Make ``server``'s gRPC health NOT_SERVING while any of ``caches`` cannot follow etcd.

    Call it for every cache the server answers from (it may be called several
    times for one server); SERVING again once all of them follow. Call it
    before the server starts, and :func:`republish_health` once it has (start
    sets SERVING whatever the caches say).
    """
    report = _reports.get(server)
    if report is None:
        report = _reports[server] = _HealthReport(server)
    for cache in caches:
        cache.add_health_listener(report.on_health)
        if not cache.healthy and cache._task is not None:
            report.on_health(cache, False)


def republish_health(server: MeshServer) -> None:
    """Set ``server``'s health from its caches again: after :meth:`MeshServer.start`, which sets SERVING."""
    report = _reports.get(server)
    if report is not None:
        report.republish()
