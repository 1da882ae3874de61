"""The etcd client of the mesh, and the three primitives aetcd lacks.

* :func:`connect` / :class:`EtcdClient`: aetcd's client over several endpoints
  (``pick_first`` over the address list, so a dead member is skipped) and TLS.
* :class:`LeaseKeeper`: a lease kept alive by a background task; says when it
  is lost instead of silently re-granting (the owner decides what to redo).
* :class:`ResumingWatch`: a prefix watch that survives connection loss and
  etcd restarts, resuming from the last revision seen + 1 (no event missed or
  repeated); a compacted revision raises :class:`WatchCompacted`.
* :class:`Election` and :func:`try_acquire`: leadership by lease + lowest
  create revision, and exclusive ownership of a key bound to a lease.

aetcd raises ``aetcd.exceptions.ConnectionFailedError`` (UNAVAILABLE) or
``ConnectionTimeoutError`` (DEADLINE_EXCEEDED) when etcd cannot be reached;
:data:`UNREACHABLE` lists them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.watcher
import grpc
from aetcd import utils as aetcd_utils
from grpc import aio

log = logging.getLogger("mabeam.etcd")

UNREACHABLE: tuple[type[Exception], ...] = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
)


@dataclass(frozen=True)
class EtcdTLS:
    """TLS to etcd: the CA of its certificate, and a client certificate for mTLS."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def grpc_target(endpoints: Sequence[str]) -> tuple[str, bool]:
    """A grpc target for etcd endpoint URLs, and whether they use https.

    ``["http://127.0.0.1:2379", "http://127.0.0.1:2479"]`` ->
    ``("ipv4:127.0.0.1:2379,127.0.0.1:2479", False)``.
    """
    if not endpoints:
        raise ValueError("no etcd endpoints")
    hosts: list[str] = []
    secure = False
    for raw in endpoints:
        url = urlsplit(raw if "://" in raw else f"http://{raw}")
        secure = secure or url.scheme == "https"
        if url.hostname is None or url.port is None:
            raise ValueError(f"etcd endpoint {raw!r} needs a host and a port")
        hosts.append(f"[{url.hostname}]:{url.port}" if ":" in url.hostname else f"{url.hostname}:{url.port}")
    if len(hosts) == 1:
        return hosts[0], secure
    if all(h[0].isdigit() for h in hosts):
        return "ipv4:" + ",".join(hosts), secure
    if all(h.startswith("[") for h in hosts):
        return "ipv6:" + ",".join(hosts), secure
    # Names: let the DNS resolver of the first one stand; grpc has no mixed list.
    return hosts[0], secure


class EtcdClient(aetcd.Client):
    """aetcd's client over one or several endpoints, with optional TLS.

    Create it with :func:`connect`. All of aetcd's API is available: ``get``,
    ``put``, ``transaction``, ``lease``, ``watch`` ...
    """

    def __init__(self, endpoints: Sequence[str], tls: EtcdTLS | None = None, timeout: float | None = None):
        super().__init__(timeout=timeout)  # type: ignore[arg-type]
        self.endpoints = tuple(endpoints)
        self._tls = tls

    async def connect(self) -> None:
        """Open the channel (idempotent; concurrent callers wait for the first)."""
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            target, secure = grpc_target(self.endpoints)
            options = [
                ("grpc.lb_policy_name", "pick_first"),
                ("grpc.keepalive_time_ms", 5_000),
                ("grpc.keepalive_timeout_ms", 3_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1_000),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ]
            if secure or self._tls is not None:
                tls = self._tls or EtcdTLS()
                creds = grpc.ssl_channel_credentials(
                    root_certificates=_read(tls.ca_file),
                    private_key=_read(tls.key_file),
                    certificate_chain=_read(tls.cert_file),
                )
                self.channel = aio.secure_channel(target, creds, options=options)
            else:
                self.channel = aio.insecure_channel(target, options=options)
            self.kvstub = aetcd.rpc.KVStub(self.channel)
            self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
            self.leasestub = aetcd.rpc.LeaseStub(self.channel)
            self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(
                aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False

    async def keepalive_once(self, lease_id: int) -> int:
        """Refresh a lease once; returns its TTL after the refresh (0 = the lease is gone)."""
        await self.connect()
        assert self.leasestub is not None
        call = self.leasestub.LeaseKeepAlive(
            iter([aetcd.rpc.LeaseKeepAliveRequest(ID=lease_id)]),
            timeout=self._timeout,
            metadata=self.metadata,
        )
        try:
            async for reply in call:
                return int(reply.TTL)
        except aio.AioRpcError as exc:
            aetcd.exceptions._handle_exception(exc)
        return 0


async def connect(
    endpoints: Sequence[str], *, tls: EtcdTLS | None = None, timeout: float | None = None
) -> EtcdClient:
    """A connected :class:`EtcdClient` for ``endpoints`` (URLs such as ``http://127.0.0.1:2379``)."""
    client = EtcdClient(endpoints, tls=tls, timeout=timeout)
    await client.connect()
    return client


class LeaseKeeper:
    """A lease kept alive in the background until stopped, revoked or lost.

    Refreshes every ``ttl / 3`` seconds. When a refresh says the lease is gone,
    or etcd stays unreachable until the lease must have expired, :attr:`lost` is
    set; the keeper does not grant a new lease by itself.

    Example::

        keeper = LeaseKeeper(client, ttl=5)
        await keeper.start()
        await client.put(b"/k", b"v", lease=keeper.lease_id)
        ...
        await keeper.revoke()   # or: await keeper.wait_lost()
    """

    def __init__(self, client: EtcdClient, ttl: int) -> None:
        if ttl < 1:
            raise ValueError(f"ttl {ttl}: a lease lives at least 1 s")
        self._client = client
        self.ttl = ttl
        self.lease_id = 0
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Grant the lease and start refreshing it; returns the lease id."""
        lease = await self._client.lease(self.ttl)
        self.lease_id = int(lease.id)
        self._task = asyncio.create_task(self._keep(), name=f"lease-keeper-{self.lease_id:x}")
        return self.lease_id

    async def _keep(self) -> None:
        loop = asyncio.get_running_loop()
        expires = loop.time() + self.ttl
        interval = max(self.ttl / 3.0, 0.2)
        while True:
            await asyncio.sleep(interval)
            try:
                ttl = await asyncio.wait_for(self._client.keepalive_once(self.lease_id), timeout=interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if loop.time() >= expires:
                    log.warning("lease %x lost: etcd unreachable past its TTL (%s)", self.lease_id, exc)
                    self.lost.set()
                    return
                continue
            if ttl <= 0:
                log.warning("lease %x lost: etcd no longer knows it", self.lease_id)
                self.lost.set()
                return
            expires = loop.time() + ttl

    async def wait_lost(self) -> None:
        """Return when the lease is lost."""
        await self.lost.wait()

    async def revoke(self) -> None:
        """Stop refreshing and revoke the lease (its keys vanish at once)."""
        await self.stop()
        if self.lease_id and not self.lost.is_set():
            with contextlib.suppress(*UNREACHABLE, aetcd.exceptions.ClientError):
                await self._client.revoke_lease(self.lease_id)
        self.lost.set()

    async def stop(self) -> None:
        """Stop refreshing (the lease then lapses after its TTL); safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class WatchCompacted(Exception):
    """The revision to resume from was compacted: re-list, then watch again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch revision compacted (first available revision {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched prefix."""

    kind: str  # "PUT" or "DELETE"
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int


class ResumingWatch:
    """Events under a prefix, resumed after connection loss without gaps or repeats.

    Example::

        kvs, revision = await snapshot(client, b"/mabeam/agents/")
        async for event in ResumingWatch(client, b"/mabeam/agents/", start_revision=revision + 1):
            ...
    """

    def __init__(self, client: EtcdClient, prefix: bytes, start_revision: int | None = None) -> None:
        self._client = client
        self._prefix = prefix
        self.next_revision = start_revision
        self._closed = False

    async def _stream(self) -> AsyncIterator[WatchEvent]:
        delay = 0.05
        while not self._closed:
            queue: asyncio.Queue[Any] = asyncio.Queue()
            watch_id: int | None = None
            try:
                await self._client.connect()
                watcher = self._client._watcher
                assert watcher is not None
                callback = await watcher.add_callback(
                    self._prefix,
                    queue.put,
                    range_end=aetcd_utils.prefix_range_end(self._prefix),
                    start_revision=self.next_revision,
                )
                watch_id = callback.watch_id
                delay = 0.05
                while True:
                    item = await queue.get()
                    if isinstance(item, aetcd.exceptions.RevisionCompactedError):
                        raise WatchCompacted(item.compacted_revision)
                    if isinstance(item, BaseException):
                        raise item
                    kv = item.kv
                    self.next_revision = int(kv.mod_revision) + 1
                    yield WatchEvent(
                        kind=str(item.kind),
                        key=kv.key,
                        value=kv.value,
                        mod_revision=int(kv.mod_revision),
                        create_revision=int(kv.create_revision),
                        version=int(kv.version),
                        lease=int(kv.lease),
                    )
            except WatchCompacted:
                raise
            except aetcd.exceptions.RevisionCompactedError as exc:
                raise WatchCompacted(exc.compacted_revision) from None
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:
                log.info(
                    "watch on %r broke (%s); resuming at revision %s",
                    self._prefix,
                    exc,
                    self.next_revision,
                )
                await asyncio.sleep(delay + random.random() * delay)
                delay = min(delay * 2, 1.0)
            finally:
                if watch_id is not None and self._client._watcher is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._client._watcher.cancel(watch_id), 1.0)

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        return self._stream()

    def close(self) -> None:
        """Stop after the current event (cancel the consuming task to stop at once)."""
        self._closed = True


async def snapshot(client: EtcdClient, prefix: bytes, *, serializable: bool = False) -> tuple[list[Any], int]:
    """Every key-value under ``prefix`` and the store revision they were read at.

    Watch from ``revision + 1`` to see every later change exactly once.
    ``serializable`` reads from the member's local state (may be stale).
    """
    await client.connect()
    assert client.kvstub is not None
    request = aetcd.rpc.RangeRequest(
        key=prefix, range_end=aetcd_utils.prefix_range_end(prefix), serializable=serializable
    )
    try:
        reply = await client.kvstub.Range(request, timeout=client._timeout, metadata=client.metadata)
    except aio.AioRpcError as exc:
        aetcd.exceptions._handle_exception(exc)
        raise
    return list(reply.kvs), int(reply.header.revision)


async def try_acquire(client: EtcdClient, key: bytes, owner: str, lease_id: int) -> bool:
    """Create ``key`` -> ``owner`` bound to ``lease_id`` if nobody holds it; True when we do."""
    ok, _ = await client.transaction(
        compare=[client.transactions.create(key) == 0],
        success=[client.transactions.put(key, owner.encode(), lease=lease_id)],
        failure=[],
    )
    if ok:
        return True
    current = await client.get(key)
    return current is not None and current.value == owner.encode() and int(current.lease) == lease_id


async def release(client: EtcdClient, key: bytes, owner: str) -> bool:
    """Delete ``key`` if ``owner`` holds it; True when deleted."""
    ok, _ = await client.transaction(
        compare=[client.transactions.value(key) == owner.encode()],
        success=[client.transactions.delete(key)],
        failure=[],
    )
    return bool(ok)


class Election:
    """Leader election by lease + create revision (etcd's election recipe).

    Each candidate puts ``<name>/<lease id hex>`` bound to its own lease; the key
    with the lowest create revision leads. Others wait for the deletion of the
    key just before theirs. Writes on behalf of the leader should use
    :meth:`guard` in their transaction, so a deposed leader's writes fail.

    Example::

        election = Election(client, b"/mabeam/orchestrator/leader", "replica-1", ttl=5)
        await election.campaign()          # returns once leading
        ok, _ = await client.transaction(compare=[election.guard()], success=[...], failure=[])
        await election.resign()
    """

    def __init__(self, client: EtcdClient, name: bytes, candidate_id: str, ttl: int) -> None:
        self._client = client
        self._name = name.rstrip(b"/") + b"/"
        self.candidate_id = candidate_id
        self._keeper = LeaseKeeper(client, ttl)
        self.key = b""
        self.create_revision = 0
        self.is_leader = False
        self.lost = asyncio.Event()

    async def campaign(self) -> None:
        """Stand for election and return once this candidate leads."""
        if not self.key:
            lease_id = await self._keeper.start()
            self.key = self._name + f"{lease_id:x}".encode()
            await self._client.put(self.key, self.candidate_id.encode(), lease=lease_id)
            got = await self._client.get(self.key)
            assert got is not None
            self.create_revision = int(got.create_revision)
        while True:
            if self._keeper.lost.is_set():
                self.lost.set()
                raise RuntimeError("election lease lost while campaigning")
            kvs, revision = await snapshot(self._client, self._name)
            earlier = [kv for kv in kvs if 0 < kv.create_revision < self.create_revision]
            if not any(kv.key == self.key for kv in kvs):
                self.lost.set()
                raise RuntimeError("election key vanished while campaigning")
            if not earlier:
                self.is_leader = True
                asyncio.get_running_loop().create_task(self._watch_lease())
                return
            predecessor = max(earlier, key=lambda kv: kv.create_revision).key
            await self._wait_deleted(predecessor, revision + 1)

    async def _wait_deleted(self, key: bytes, start_revision: int) -> None:
        async for event in ResumingWatch(self._client, key, start_revision=start_revision):
            if event.key == key and event.kind == "DELETE":
                return
            if self._keeper.lost.is_set():
                return

    async def _watch_lease(self) -> None:
        await self._keeper.wait_lost()
        self.is_leader = False
        self.lost.set()

    def guard(self) -> Any:
        """The transaction compare that holds only while this candidate leads."""
        return self._client.transactions.create(self.key) == self.create_revision

    async def leader(self) -> str | None:
        """The candidate id of the current leader (None when nobody stands)."""
        kvs, _ = await snapshot(self._client, self._name)
        if not kvs:
            return None
        first = min(kvs, key=lambda kv: kv.create_revision)
        return bytes(first.value).decode()

    async def resign(self) -> None:
        """Give up leadership (or candidacy) at once; safe to call twice."""
        self.is_leader = False
        await self._keeper.revoke()
        self.lost.set()
