"""The etcd client of the mesh, and the three primitives aetcd lacks.

* :func:`connect` / :class:`EtcdClient`: aetcd's client over several endpoints
  (``pick_first`` over the address list, so a dead member is skipped and the
  next call goes to a live one) and TLS.
* :class:`LeaseKeeper`: a lease kept alive by a background task; it says when
  the lease is lost instead of silently granting another (the owner decides
  what to redo).
* :class:`ResumingWatch`: a prefix watch that survives connection loss and
  etcd restarts, resuming from the last revision seen + 1, so no event is
  missed or repeated; a compacted revision raises :class:`WatchCompacted`.
  :func:`snapshot` and :func:`snapshot_and_watch` are the list-then-watch
  pattern of every watch-fed cache.
* :class:`Election`, :func:`try_acquire` and :func:`release`: leadership by
  lease + lowest create revision, and exclusive ownership of a key bound to a
  lease.

How failures surface (aetcd maps grpc status codes to its exceptions):

* ``ConnectionFailedError`` (UNAVAILABLE): etcd refused or dropped the
  connection, or the member has no leader / lost it / timed out a proposal
  (``etcdserver: no leader``, ``leader changed``, ``request timed out``).
  Retry, possibly on another member.
* ``ConnectionTimeoutError`` (DEADLINE_EXCEEDED): the call's own ``timeout``
  passed, typically a frozen or partitioned member.
* ``WatchTimeoutError``: aetcd's own watch (``client.watch``) was not created
  within ``timeout``.

:data:`UNREACHABLE` lists these three: each means "etcd could not be reached
or could not commit", never "the request was wrong". Without a ``timeout`` a
call to a frozen etcd (SIGSTOP, or a dead host that sends no RST) waits until
the channel's keepalive declares the connection dead, about 8 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.transactions
import aetcd.watcher
from aetcd import utils as aetcd_utils
from grpc import aio

from mabeam import errors
from mabeam.etcd_target import grpc_target, open_channel
from mabeam.etcd_target import split as grpc_target_check
from mabeam.tls import TLS

__all__ = [
    "UNREACHABLE",
    "ClientClosedError",
    "Election",
    "ElectionLost",
    "EtcdClient",
    "KeepAliveStream",
    "LeaseKeeper",
    "ResumingWatch",
    "WatchCompacted",
    "WatchEvent",
    "connect",
    "grpc_target",
    "release",
    "snapshot",
    "snapshot_and_watch",
    "to_mabeam_error",
    "try_acquire",
]

log = logging.getLogger("mabeam.runtime.etcd")

UNREACHABLE: tuple[type[Exception], ...] = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
    aetcd.exceptions.WatchTimeoutError,
)

# Keepalive pings find a dead connection (frozen member, vanished host) while
# calls are pending, in 5 + 3 s. etcd's server refuses pings closer than 5 s
# (--grpc-keepalive-min-time) and pings on an idle connection
# (PermitWithoutStream=false) with GOAWAY "too_many_pings", so 5 s, calls only;
# and without max_pings_without_data=0 grpc stops pinging after two pings.
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.lb_policy_name", "pick_first"),
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    # grpc >= 1.6x times a ping out after this, not keepalive_timeout_ms (60 s by default).
    ("grpc.http2.ping_timeout_ms", 3_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)

# Ask etcd to end a watch stream when its member loses the leader (clientv3's
# WithRequireLeader): otherwise a watch on a partitioned member goes silent.
_REQUIRE_LEADER = ("hasleader", "true")


def _cancelled_by_caller() -> bool:
    """True when the running task is being cancelled, as opposed to grpc raising
    CancelledError for a call that was cancelled locally (its channel closed)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def to_mabeam_error(exc: BaseException) -> errors.MabeamError | None:
    """etcd's exceptions in the mesh's error table (None for any other exception).

    Unreachable or unable to commit is ``UNAVAILABLE`` (retryable); a request
    etcd refused is a bug on our side, ``INTERNAL``, logged.
    """
    if isinstance(exc, UNREACHABLE):
        return errors.Unavailable(f"etcd is unreachable: {exc}")
    if isinstance(exc, aetcd.exceptions.ClientError):
        log.exception("etcd refused a request", exc_info=exc)
        return errors.Internal(f"etcd refused the request: {exc}")
    return None


class ClientClosedError(aetcd.exceptions.ClientError):
    """The :class:`EtcdClient` was closed; a closed client never reconnects."""


class EtcdClient(aetcd.Client):
    """aetcd's client over one or several endpoints, with optional TLS.

    Create it with :func:`connect`. All of aetcd's API is there (``get``,
    ``put``, ``transaction``, ``lease``, ``watch`` ...), plus :attr:`watchstub`
    for :class:`ResumingWatch` and :meth:`keepalive_once` for
    :class:`LeaseKeeper`. Calls go to the first endpoint that answers and move
    to the next when it dies; a call in flight on the dead one fails with
    ``ConnectionFailedError`` and may be retried at once.

    Several endpoints given by host name are resolved once, at connect time.
    With TLS and several endpoints, every member's certificate must carry the
    name (or IP address) of the first named endpoint, else of the first one:
    grpc checks one name for a whole address list.
    """

    watchstub: Any

    def __init__(
        self, endpoints: Sequence[str], tls: TLS | None = None, timeout: float | None = None
    ) -> None:
        grpc_target_check(endpoints)  # a malformed endpoint is an error now, not at the first call
        super().__init__(timeout=timeout)  # type: ignore[arg-type]
        self.endpoints = tuple(endpoints)
        self._tls = tls
        self._closed = False

    def _init_channel_attrs(self) -> None:
        super()._init_channel_attrs()
        self.watchstub = None

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def timeout(self) -> float | None:
        """The per-call timeout in seconds given to :func:`connect` (None: no deadline)."""
        return self._timeout

    async def connect(self) -> None:
        """Open the channel; idempotent, and concurrent callers wait for the first.

        No network traffic happens here: grpc connects on the first call.
        """
        if self._closed:
            raise ClientClosedError("etcd client is closed")
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            self.channel = await open_channel(self.endpoints, self._tls, _CHANNEL_OPTIONS)
            self.kvstub = aetcd.rpc.KVStub(self.channel)
            self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
            self.leasestub = aetcd.rpc.LeaseStub(self.channel)
            self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
            self.watchstub = aetcd.rpc.WatchStub(self.channel)
            # aetcd's own watch API multiplexes all its watches on one stream.
            self._watcher = aetcd.watcher.Watcher(
                self.watchstub, timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False

    async def close(self) -> None:
        """Close the channel (calls in flight fail with CANCELLED); safe to call twice.

        Final: aetcd would reopen a closed client on its next call, which would
        leak a channel nobody closes, so this one raises ClientClosedError instead.
        """
        self._closed = True
        await super().close()

    async def keepalive_once(self, lease_id: int) -> int:
        """Refresh a lease once; its TTL after the refresh, 0 when etcd no longer knows it.

        One short LeaseKeepAlive stream per refresh: nothing to resume after a
        reconnect, and a dead connection fails this call instead of a stream
        that looks open.
        """
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
        finally:
            call.cancel()
        # The stream ended without an answer: that says nothing about the lease.
        raise aetcd.exceptions.ConnectionFailedError("etcd ended the lease keep-alive without an answer")


async def connect(
    endpoints: Sequence[str], *, tls: TLS | None = None, timeout: float | None = None
) -> EtcdClient:
    """A connected :class:`EtcdClient` for ``endpoints``.

    ``endpoints`` are URLs (``http://127.0.0.1:2379``, ``https://etcd-0:2379``);
    https, or ``tls`` given, means TLS. ``timeout`` is the deadline of every
    unary call in seconds (None: none; see the module doc for what a frozen
    etcd then does). Connecting does not touch the network, so it succeeds
    even when etcd is down; the first call says whether it is up.

    Example::

        client = await connect(["http://127.0.0.1:2379", "http://127.0.0.1:2479"], timeout=5)
        await client.put(b"/k", b"v")
        await client.close()
    """
    client = EtcdClient(endpoints, tls=tls, timeout=timeout)
    await client.connect()
    return client


class KeepAliveStream:
    """Refreshes of many leases over a few long-lived LeaseKeepAlive streams.

    :meth:`EtcdClient.keepalive_once` opens a stream per refresh, right for a
    lease refreshed every few seconds; a registry refreshing a thousand
    agents' leases hundreds of times a second would spend most of its time
    opening and closing streams. Here refreshes share ``streams`` streams
    (a lease always uses the same one): etcd answers the requests of a stream
    in order, each with the lease's ID and its TTL after the refresh (0 when
    etcd no longer knows the lease).

    A refresh not answered within ``timeout`` (default: the client's, else
    5 s) raises ``ConnectionTimeoutError`` and drops its stream, since a
    stream that stops answering is as good as dead; a stream that fails fails
    every refresh waiting on it (``ConnectionFailedError`` or what etcd said).
    Either way the next refresh opens a new stream, on a live member. So, as
    with ``keepalive_once``, a dead connection fails the call instead of
    leaving a stream that looks open.

    Example::

        refresher = KeepAliveStream(client)
        ttl = await refresher.refresh(lease_id)   # 0: the lease is gone
        await refresher.close()
    """

    def __init__(self, client: EtcdClient, *, streams: int = 4, timeout: float | None = None) -> None:
        if streams < 1:
            raise ValueError("streams must be >= 1")
        self._client = client
        self._timeout = timeout or client.timeout or 5.0
        self._streams: list[_KeepAliveCall | None] = [None] * streams
        self._closed = False

    async def refresh(self, lease_id: int) -> int:
        """Refresh ``lease_id`` once; its TTL after the refresh, 0 when etcd no longer knows it."""
        if self._closed:
            raise ClientClosedError("keep-alive stream is closed")
        slot = lease_id % len(self._streams)
        stream = self._streams[slot]
        if stream is None or stream.closed:
            await self._client.connect()
            stream = self._streams[slot]  # another refresh may have opened it meanwhile
            if stream is None or stream.closed:
                assert self._client.leasestub is not None
                stream = _KeepAliveCall(self._client.leasestub, self._client.metadata)
                self._streams[slot] = stream
        answer = stream.send(lease_id)
        try:
            return await asyncio.wait_for(answer, self._timeout)
        except TimeoutError:
            error = aetcd.exceptions.ConnectionTimeoutError(
                f"etcd did not answer a lease keep-alive within {self._timeout:g} s"
            )
            stream.fail(error)
            raise error from None

    async def close(self) -> None:
        """Close every stream (refreshes in flight fail); safe to call twice."""
        self._closed = True
        streams, self._streams = self._streams, [None] * len(self._streams)
        for stream in streams:
            if stream is not None:
                stream.fail(ClientClosedError("keep-alive stream is closed"))
        await asyncio.gather(*(s.reader for s in streams if s is not None), return_exceptions=True)


class _KeepAliveCall:
    """One LeaseKeepAlive stream of a :class:`KeepAliveStream`, its requests paired with answers."""

    def __init__(self, stub: Any, metadata: Any) -> None:
        self.closed = False
        self._queue: asyncio.Queue[int | None] = asyncio.Queue()
        # Per lease, the refreshes sent and not yet answered, oldest first:
        # etcd answers a stream's requests in order.
        self._waiting: dict[int, deque[asyncio.Future[int]]] = {}
        self._call = stub.LeaseKeepAlive(self._requests(), metadata=metadata)
        self.reader = asyncio.create_task(self._read(), name="etcd-lease-keepalive")

    async def _requests(self) -> Any:
        while True:
            lease_id = await self._queue.get()
            if lease_id is None:
                return
            yield aetcd.rpc.LeaseKeepAliveRequest(ID=lease_id)

    def send(self, lease_id: int) -> asyncio.Future[int]:
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(lease_id, deque()).append(answer)
        self._queue.put_nowait(lease_id)
        return answer

    async def _read(self) -> None:
        error: Exception = aetcd.exceptions.ConnectionFailedError("etcd ended the lease keep-alive stream")
        try:
            async for reply in self._call:
                waiting = self._waiting.get(reply.ID)
                if not waiting:
                    continue
                answer = waiting.popleft()  # this reply's request (its caller may have given up)
                if not waiting:
                    del self._waiting[reply.ID]
                if not answer.done():
                    answer.set_result(int(reply.TTL))
        except aio.AioRpcError as exc:
            try:
                aetcd.exceptions._handle_exception(exc)
            except Exception as mapped:
                error = mapped
        except asyncio.CancelledError:
            error = aetcd.exceptions.ConnectionFailedError("lease keep-alive stream cancelled")
        except Exception as exc:
            error = exc
        self.fail(error)

    def fail(self, error: Exception) -> None:
        """End the stream; every refresh waiting on it raises ``error``."""
        if self.closed:
            return
        self.closed = True
        self._call.cancel()
        self._queue.put_nowait(None)
        waiting, self._waiting = self._waiting, {}
        for answers in waiting.values():
            for answer in answers:
                if not answer.done():
                    answer.set_exception(error)
                    answer.exception()  # retrieved: nobody may be waiting any more


class LeaseKeeper:
    """A lease kept alive in the background until stopped, revoked or lost.

    Refreshes every third of the TTL etcd granted (etcd 3.5 grants at least
    2 s whatever is asked). The lease is *lost* when a refresh says etcd no
    longer knows it (it expired or someone revoked it), or when no refresh
    succeeded for a whole TTL, counted from the send time of the last
    successful one: from then on etcd may have expired it, so the owner must
    stop acting on it. :attr:`lost` is set and ``on_lost`` called; the keeper
    grants no new lease by itself, because what hung on the old one (keys,
    leadership) is the owner's to redo.

    etcd renews every lease when it restarts or elects a leader, so a lease
    declared lost while etcd was unreachable may live on for a TTL once etcd
    is back: until :meth:`stop` or :meth:`revoke`, the keeper keeps trying to
    revoke it, so its keys go as soon as etcd answers.

    ``on_lost`` runs in the keeper's task; it must not block (set an event or
    start a task).

    Example::

        async with LeaseKeeper(client, ttl=5) as keeper:
            await client.put(b"/k", b"v", lease=keeper.lease_id)
            await keeper.wait_lost()          # returns if the lease is lost
    """

    def __init__(self, client: EtcdClient, ttl: int, *, on_lost: Callable[[], object] | None = None) -> None:
        if ttl < 1:
            raise ValueError(f"ttl {ttl}: a lease lives at least 1 s")
        self._client = client
        self.ttl = ttl
        self.granted_ttl = ttl
        self.lease_id = 0
        self.lost = asyncio.Event()
        self.on_lost = on_lost
        self._gone = False  # etcd no longer knows the lease: nothing left to revoke
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Grant the lease and start refreshing it; returns the lease id.

        Raises what the grant raises (etcd unreachable: one of
        :data:`UNREACHABLE`); a keeper is started once.
        """
        if self.lease_id:
            raise RuntimeError("a LeaseKeeper is started once; make a new one for a new lease")
        loop = asyncio.get_running_loop()
        sent = loop.time()
        lease = await self._client.lease(self.ttl)
        self.lease_id = int(lease.id)
        self.granted_ttl = int(lease.ttl) or self.ttl
        self._task = asyncio.create_task(self._keep(sent), name=f"lease-keeper-{self.lease_id:x}")
        return self.lease_id

    async def _keep(self, sent: float) -> None:
        loop = asyncio.get_running_loop()
        expires = sent + self.granted_ttl
        interval = max(self.granted_ttl / 3.0, 0.2)
        delay = interval
        while True:
            await asyncio.sleep(max(0.0, min(delay, expires - loop.time())))
            sent = loop.time()
            if sent >= expires:
                await self._declare_lost("no refresh reached etcd for a whole TTL", unreachable=True)
                return
            try:
                # A refresh that would come back after the expiry is worthless.
                ttl = await asyncio.wait_for(
                    self._client.keepalive_once(self.lease_id), timeout=min(interval, expires - sent)
                )
            except asyncio.CancelledError:
                if _cancelled_by_caller():
                    raise
                delay = min(interval, 0.25)  # the client's channel closed under the call
                continue
            except Exception as exc:
                log.debug("lease %x: refresh failed (%s)", self.lease_id, exc)
                delay = min(interval, 0.25)  # try again soon, the TTL is running
                continue
            if ttl <= 0:
                self._gone = True
                await self._declare_lost("etcd no longer knows it (expired or revoked)", unreachable=False)
                return
            expires, delay = sent + ttl, interval

    async def _declare_lost(self, why: str, *, unreachable: bool) -> None:
        log.warning("lease %x lost: %s", self.lease_id, why)
        self.lost.set()
        if self.on_lost is not None:
            try:
                self.on_lost()
            except Exception:
                log.exception("on_lost callback of lease %x failed", self.lease_id)
        if unreachable:
            await self._revoke_when_back()

    async def _revoke_when_back(self) -> None:
        # etcd renews every lease when it restarts or changes leader, so the
        # abandoned lease may outlive the outage by a whole TTL: worth chasing
        # for a while, bounded so a keeper of a dead etcd ends.
        loop = asyncio.get_running_loop()
        until = loop.time() + max(10.0, 3.0 * self.granted_ttl)
        while loop.time() < until:
            try:
                await asyncio.wait_for(self._client.revoke_lease(self.lease_id), timeout=1.0)
                self._gone = True
                return
            except asyncio.CancelledError:
                if _cancelled_by_caller():
                    raise
            except ClientClosedError:
                return
            except Exception as exc:
                if not isinstance(exc, (*UNREACHABLE, TimeoutError)):
                    self._gone = True  # lease not found
                    return
            await asyncio.sleep(0.25)

    async def wait_lost(self) -> None:
        """Return when the lease is lost (or revoked through :meth:`revoke`)."""
        await self.lost.wait()

    async def revoke(self) -> None:
        """Stop refreshing and revoke the lease, so its keys vanish at once; safe to call twice.

        Sets :attr:`lost` (the lease is gone) without calling ``on_lost`` (the
        owner knows). An unreachable etcd is not an error here: the lease then
        expires by itself, at most a TTL after etcd is back.
        """
        await self.stop()
        if self.lease_id and not self._gone:
            with contextlib.suppress(aetcd.exceptions.ClientError, TimeoutError):
                await asyncio.wait_for(self._client.revoke_lease(self.lease_id), timeout=5.0)
                self._gone = True
        self.lost.set()

    async def stop(self) -> None:
        """Stop refreshing (and chasing a lost lease), leaving it to lapse after its TTL; safe twice."""
        task, self._task = self._task, None
        if task is None or task.done():
            return
        # Cancelled until it ends: on Python 3.11 a cancellation that arrives as a refresh
        # completes is lost (asyncio.wait_for returns the result) and the keeper would refresh on.
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if not task.cancelled():
            await task  # it ended by itself meanwhile: its outcome, as before

    async def __aenter__(self) -> LeaseKeeper:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.revoke()


class WatchCompacted(Exception):
    """The revision to resume from was compacted away: list again, then watch from the new revision."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch revision compacted (first available revision {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change under a watched prefix.

    A DELETE carries the key and the revision of the deletion; its value,
    create revision, version and lease are empty / 0.
    """

    kind: str  # "PUT" or "DELETE"
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int


_DELETE = aetcd.rpc.Event.EventType.Value("DELETE")


class _StreamBroken(Exception):
    pass


class ResumingWatch:
    """Events under a prefix, in revision order, each exactly once, across reconnects.

    Each watch has its own etcd watch stream. When the stream breaks (etcd
    restarted, the connection or the member's leader lost), it is opened
    again with backoff (50 ms doubling to 1 s) from the revision after the
    last event delivered. ``start_revision`` None starts at the revision
    current when the stream is first created. When the revision to resume
    from was compacted, iteration raises :class:`WatchCompacted`: list again
    and start a new watch. ``single_key`` watches exactly ``prefix`` instead
    of every key under it.

    Iterating it is the only activity: no task runs in the background.
    Iteration ends after :meth:`close`, and raises
    :class:`ClientClosedError` once the client is closed.

    Example::

        kvs, revision, watch = await snapshot_and_watch(client, b"/mabeam/agents/")
        async with watch:
            async for event in watch:
                ...
    """

    def __init__(
        self,
        client: EtcdClient,
        prefix: bytes,
        start_revision: int | None = None,
        *,
        single_key: bool = False,
    ) -> None:
        self._client = client
        self.prefix = prefix
        self._range_end = b"" if single_key else aetcd_utils.prefix_range_end(prefix)
        self.next_revision = start_revision
        self.reconnects = 0
        self._pending: deque[WatchEvent] = deque()
        self._call: Any = None
        self._closed = False
        self._compacted: WatchCompacted | None = None

    def __aiter__(self) -> ResumingWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        delay = 0.05
        while True:
            if self._pending:
                event = self._pending.popleft()
                # A revision's events arrive in one response; resuming happens
                # only once all of them were delivered, so rev + 1 is exact.
                self.next_revision = event.mod_revision + 1
                return event
            if self._closed:
                raise StopAsyncIteration
            if self._compacted is not None:
                raise self._compacted
            try:
                if self._call is None:
                    await self._open()
                await self._receive()
                delay = 0.05
            except asyncio.CancelledError:
                self._drop_stream()
                if _cancelled_by_caller() or not (self._closed or self._client.closed):
                    raise
                if not self._closed:  # the client was closed under us
                    raise ClientClosedError("etcd client is closed") from None
            except WatchCompacted as exc:
                self._drop_stream()
                self._compacted = exc
            except ClientClosedError:
                self._drop_stream()
                raise
            except (
                aio.AioRpcError,
                aetcd.exceptions.ClientError,
                _StreamBroken,
                OSError,
                asyncio.InvalidStateError,  # grpc: writing to a call that already ended
            ) as exc:
                self._drop_stream()
                if self._client.closed:
                    raise ClientClosedError("etcd client is closed") from None
                self.reconnects += 1
                log.info(
                    "watch on %r broke (%s); resuming at revision %s",
                    self.prefix,
                    _brief(exc),
                    self.next_revision,
                )
                await asyncio.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 1.0)

    async def _open(self) -> None:
        await self._client.connect()
        metadata = (*(self._client.metadata or ()), _REQUIRE_LEADER)
        call = self._client.watchstub.Watch(metadata=metadata)
        self._call = call
        request = aetcd.rpc.WatchCreateRequest(
            key=self.prefix, range_end=self._range_end, start_revision=self.next_revision or 0
        )
        await call.write(aetcd.rpc.WatchRequest(create_request=request))

    async def _receive(self) -> None:
        """Read one response; queue its events or raise why the stream ended."""
        reply = await self._call.read()
        if reply is aio.EOF:  # type: ignore[attr-defined]
            raise _StreamBroken("etcd closed the watch stream")
        if reply.compact_revision:
            raise WatchCompacted(int(reply.compact_revision))
        if reply.canceled:
            raise _StreamBroken(f"etcd cancelled the watch: {reply.cancel_reason or 'no reason given'}")
        if reply.created and self.next_revision is None:
            # etcd starts a watch without a revision at header.revision + 1.
            self.next_revision = int(reply.header.revision) + 1
        for ev in reply.events:
            kv = ev.kv
            self._pending.append(
                WatchEvent(
                    kind="DELETE" if ev.type == _DELETE else "PUT",
                    key=kv.key,
                    value=kv.value,
                    mod_revision=int(kv.mod_revision),
                    create_revision=int(kv.create_revision),
                    version=int(kv.version),
                    lease=int(kv.lease),
                )
            )

    def _drop_stream(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    def close(self) -> None:
        """Stop the watch: events already received are still delivered, then iteration ends.

        A consumer blocked waiting for the next event wakes up and ends too.
        """
        self._closed = True
        self._drop_stream()

    async def aclose(self) -> None:
        """Async form of :meth:`close`, for ``contextlib.aclosing``."""
        self.close()

    def __del__(self) -> None:
        # A consumer that leaves ``async for`` early (break, return) and forgets
        # close() would leave its etcd watch stream open for good: the call lives
        # on in grpc, and so does the watcher in etcd. Dropped with the last reference.
        with contextlib.suppress(Exception):
            self._drop_stream()

    async def __aenter__(self) -> ResumingWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _brief(exc: BaseException) -> str:
    if isinstance(exc, aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__


async def snapshot(client: EtcdClient, prefix: bytes, *, serializable: bool = False) -> tuple[list[Any], int]:
    """Every key-value under ``prefix`` (etcd ``KeyValue`` messages) and the revision they were read at.

    Watching from ``revision + 1`` then sees every later change exactly once.
    ``serializable`` reads the member's local state: cheaper and available
    without a quorum, possibly stale.
    """
    await client.connect()
    assert client.kvstub is not None
    request = aetcd.rpc.RangeRequest(
        key=prefix, range_end=aetcd_utils.prefix_range_end(prefix), serializable=serializable
    )
    try:
        reply = await client.kvstub.Range(request, timeout=client.timeout, metadata=client.metadata)
    except aio.AioRpcError as exc:
        aetcd.exceptions._handle_exception(exc)
        raise
    return list(reply.kvs), int(reply.header.revision)


async def snapshot_and_watch(
    client: EtcdClient, prefix: bytes, *, serializable: bool = False
) -> tuple[list[Any], int, ResumingWatch]:
    """List ``prefix``, and a watch of it starting right after the listing's revision.

    The pattern of every watch-fed cache: apply ``kvs``, then every event of
    ``watch``, and the cache equals etcd at each event's revision.
    """
    kvs, revision = await snapshot(client, prefix, serializable=serializable)
    return kvs, revision, ResumingWatch(client, prefix, start_revision=revision + 1)


class _LeaseCompare(aetcd.transactions.BaseCompare):
    # aetcd lacks the LEASE compare target (etcd >= 3.3).
    def build_compare(self, compare: Any) -> None:
        compare.target = aetcd.rpc.Compare.LEASE
        compare.lease = int(self.value)


async def try_acquire(client: EtcdClient, key: bytes, owner: str, lease_id: int) -> bool:
    """Take ``key`` for ``owner`` if nobody holds it; True when ``owner`` holds it now.

    The key is created with ``owner`` as value, bound to ``lease_id``, so it
    is released when the holder's lease goes. Asking again with the same
    owner and lease is True (idempotent). One transaction.

    Example::

        if await try_acquire(client, b"/mabeam/owners/agent-7", replica_id, keeper.lease_id):
            ...  # supervise agent-7
    """
    t = client.transactions
    ok, replies = await client.transaction(
        compare=[t.create(key) == 0],
        success=[t.put(key, owner.encode(), lease=lease_id)],
        failure=[t.get(key)],
    )
    if ok:
        return True
    current = replies[0] if replies else []
    if not current:
        return False  # deleted between the compare and the read: someone else's turn anyway
    _, kv = current[0]
    return bool(kv.value == owner.encode() and int(kv.lease) == lease_id)


async def release(client: EtcdClient, key: bytes, owner: str, lease_id: int | None = None) -> bool:
    """Delete ``key`` if ``owner`` holds it (and, given ``lease_id``, on that lease); True when deleted."""
    t = client.transactions
    compare: list[Any] = [t.value(key) == owner.encode()]
    if lease_id is not None:
        compare.append(_LeaseCompare(key) == lease_id)
    ok, _ = await client.transaction(compare=compare, success=[t.delete(key)], failure=[])
    return bool(ok)


class ElectionLost(RuntimeError):
    """The candidacy ended before or while leading: the lease or the candidate key is gone."""


class Election:
    """Leader election by lease + create revision (etcd's concurrency/election recipe).

    Each candidate puts ``<name>/<lease id hex>`` -> ``candidate_id`` bound to
    its own lease; the key with the lowest create revision leads; the others
    each wait for the deletion of the key just before theirs, so a departure
    wakes one candidate, not all. Leadership ends with :meth:`resign`, or is
    lost when the lease is lost or the key deleted: then :attr:`is_leader`
    turns False and :attr:`lost` is set. Writes made on behalf of the leader
    carry :meth:`leader_txn_guard` in their transaction, so a deposed leader
    that does not know it yet cannot write.

    After a resignation or a loss, :meth:`campaign` may be called again: it
    stands with a new lease.

    Example::

        election = Election(client, b"/mabeam/orchestrator/leader", "replica-1", ttl=5)
        await election.campaign()                     # returns once leading
        ok, _ = await client.transaction(
            compare=[election.leader_txn_guard()], success=[client.transactions.put(k, v)], failure=[]
        )
        await election.resign()
    """

    def __init__(self, client: EtcdClient, name: bytes, candidate_id: str, ttl: int) -> None:
        self._client = client
        self.name = name.rstrip(b"/") + b"/"
        self.candidate_id = candidate_id
        self.ttl = ttl
        self.key = b""
        self.create_revision = 0
        self.is_leader = False
        self.lost = asyncio.Event()
        self._keeper: LeaseKeeper | None = None
        self._monitor: asyncio.Task[None] | None = None

    @property
    def lease_id(self) -> int:
        """The candidacy's lease (0 when not standing)."""
        return self._keeper.lease_id if self._keeper is not None else 0

    async def campaign(self) -> None:
        """Stand for election and return once this candidate leads.

        Raises :class:`ElectionLost` if the lease or the candidate key goes
        while waiting. Cancelling it withdraws the candidacy.
        """
        if self.is_leader:
            return
        try:
            if self._keeper is None or self._keeper.lost.is_set():
                await self._withdraw()
                await self._stand()
            keeper = self._keeper
            assert keeper is not None
            while True:
                if keeper.lost.is_set():
                    raise ElectionLost(f"election {self.name!r}: lease lost while campaigning")
                kvs, revision = await snapshot(self._client, self.name)
                if not any(kv.key == self.key for kv in kvs):
                    raise ElectionLost(f"election {self.name!r}: candidate key {self.key!r} vanished")
                earlier = [kv for kv in kvs if kv.create_revision < self.create_revision]
                if not earlier:
                    break
                predecessor = max(earlier, key=lambda kv: kv.create_revision).key
                with contextlib.suppress(WatchCompacted):  # then look again
                    await self._first_of(self._deleted(predecessor, revision + 1), keeper.lost.wait())
        except ElectionLost:
            await self.resign()
            raise
        except BaseException:
            # Cancelled or etcd unreachable: do not leave a candidacy nobody follows.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(self.resign())
            raise
        self.is_leader = True
        self.lost.clear()
        self._monitor = asyncio.create_task(
            self._watch_leadership(revision + 1), name=f"election-{self.candidate_id}"
        )

    async def _stand(self) -> None:
        self.lost.clear()
        keeper = LeaseKeeper(self._client, self.ttl)
        self._keeper = keeper
        lease_id = await keeper.start()
        self.key = self.name + f"{lease_id:x}".encode()
        t = self._client.transactions
        ok, replies = await self._client.transaction(
            compare=[t.create(self.key) == 0],
            success=[t.put(self.key, self.candidate_id.encode(), lease=lease_id)],
            failure=[t.get(self.key)],
        )
        if ok:
            self.create_revision = int(replies[0].response_put.header.revision)
        else:  # a key on our own fresh lease: only a retried request can have made it
            self.create_revision = int(replies[0][0][1].create_revision)

    async def _deleted(self, key: bytes, start_revision: int) -> None:
        async with ResumingWatch(self._client, key, start_revision, single_key=True) as watch:
            async for event in watch:
                if event.kind == "DELETE":
                    return

    @staticmethod
    async def _first_of(*waits: Any) -> None:
        tasks = [asyncio.ensure_future(w) for w in waits]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _watch_leadership(self, start_revision: int) -> None:
        keeper = self._keeper
        assert keeper is not None
        try:
            await self._first_of(self._deleted(self.key, start_revision), keeper.lost.wait())
        except (WatchCompacted, ClientClosedError):
            pass  # cannot follow the key any more: count leadership as lost, the safe side
        log.warning("election %r: %s lost leadership", self.name, self.candidate_id)
        self.is_leader = False
        self._monitor = None
        self.lost.set()
        if not keeper.lost.is_set():
            # The key went but the lease lives: the candidacy is over, free the lease.
            # (A lost lease is left to its keeper, which revokes it once etcd answers.)
            await keeper.revoke()

    def leader_txn_guard(self) -> Any:
        """The transaction compare that holds only while this candidate still leads.

        ``create_revision(own key) == the revision it was created at``: it
        fails once the key is gone (lease lost, resigned), even if the same
        lease id were somehow reused.
        """
        if not self.key:
            raise RuntimeError("not a candidate: campaign() first")
        return self._client.transactions.create(self.key) == self.create_revision

    def guard(self) -> Any:
        """Same as :meth:`leader_txn_guard`."""
        return self.leader_txn_guard()

    async def leader(self) -> str | None:
        """The candidate id of the current leader, read from etcd (None when nobody stands)."""
        kvs, _ = await snapshot(self._client, self.name)
        if not kvs:
            return None
        return bytes(min(kvs, key=lambda kv: kv.create_revision).value).decode()

    async def resign(self) -> None:
        """Give up leadership or candidacy at once (the key is deleted); safe to call twice.

        Sets :attr:`lost`. Does not fail when etcd is unreachable: the lease
        then expires within its TTL and the next candidate takes over.
        """
        self.is_leader = False
        monitor, self._monitor = self._monitor, None
        if monitor is not None and monitor is not asyncio.current_task():
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await monitor
        await self._withdraw()
        self.lost.set()

    async def _withdraw(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            await keeper.revoke()

    async def __aenter__(self) -> Election:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.resign()


async def while_leading(
    client: EtcdClient,
    name: bytes,
    candidate_id: str,
    ttl: int,
    work: Callable[[], Awaitable[object]],
    interval: float,
    what: str = "",
) -> None:
    """Forever: win the election ``name``, then run ``work`` every ``interval`` s while leading.

    When the lead is lost (the lease lapsed, etcd was unreachable too long)
    the loop stops working at once and campaigns again; a failing ``work`` is
    logged and retried on the next tick. Cancelling it resigns. This is how a
    service runs the loops only one replica may run (the registry's health
    prober, the orchestrator's adaptation loop).
    """
    while True:
        election = Election(client, name, candidate_id, ttl)
        try:
            await election.campaign()
            log.info("%s: %s leads", what or name.decode(), candidate_id)
            while not election.lost.is_set():
                try:
                    await work()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("%s: %s", what or name.decode(), exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(election.lost.wait(), interval)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(election.resign())
            raise
        except Exception as exc:
            log.info("%s: %s; campaigning again", what or name.decode(), exc)
            with contextlib.suppress(Exception):
                await election.resign()
            await asyncio.sleep(interval)
