"""The etcd client of the mesh: aetcd's client over several endpoints, with TLS.

aetcd talks to one endpoint and reopens a closed client on its next call;
the mesh needs a client that fails over between members, speaks TLS, finds a
dead connection in seconds, and stays closed once closed. With several
endpoints the client keeps a channel per member and talks to one at a time,
moving to another when that one is down or stuck (frozen: it answers nothing
for about a second), see :mod:`.members`; with one, grpc's channel does it all. The primitives of the other modules (leases, watches,
elections) are built on :class:`EtcdClient`.

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
the channel's keepalive declares the connection dead, about 8 s, with one
endpoint; with several, until the member is judged stuck (about 1 s), when a
read is sent to another member and a write fails with ``ConnectionFailedError``.
:func:`to_mabeam_error` puts them (and the requests etcd refused) in the
mesh's error table.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.watcher
import grpc
from aetcd import rtypes
from grpc import aio

from mabeam import errors
from mabeam.etcd_target import _is_ip, open_channel
from mabeam.etcd_target import split as grpc_target_check
from mabeam.runtime.etcd.members import Member, Members, RoutedStub
from mabeam.tls import TLS

# One logger for the whole etcd layer, named as before the package was split,
# so log configuration and filters keep working.
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


def _cancelled_by_caller() -> bool:
    """True when the running task is being cancelled, as opposed to grpc raising
    CancelledError for a call that was cancelled locally (its channel closed)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def to_mabeam_error(exc: BaseException) -> errors.MabeamError | None:
    """etcd's exceptions in the mesh's error table (None for any other exception).

    Unreachable or unable to commit (etcd's ``DEADLINE_EXCEEDED`` too, and its
    ``UNKNOWN`` "context deadline exceeded": no quorum on this side of a
    partition) is ``UNAVAILABLE`` (retryable); a write
    refused for lack of resources (etcd answers ``RESOURCE_EXHAUSTED``: its
    database reached the space quota, the NOSPACE alarm) is
    ``RESOURCE_EXHAUSTED`` with etcd's words; any other request etcd refused
    is a bug on our side, ``INTERNAL``, logged. Mapped by cause: the aetcd
    exception's type, else the status code of the grpc error it wraps
    (``__cause__``), by the text only for etcd's "context deadline exceeded".
    """
    if isinstance(exc, UNREACHABLE):
        return errors.Unavailable(f"etcd is unreachable: {exc}")
    cause = exc.__cause__
    if (
        isinstance(exc, aetcd.exceptions.ClientError)
        and isinstance(cause, aio.AioRpcError)
        and cause.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ):
        return errors.ResourceExhausted(
            f"etcd refused the write for lack of resources ({cause.details()}): its database is full "
            "or it is overloaded; an operator must compact, defragment and disarm the NOSPACE alarm"
        )
    if (
        isinstance(exc, aetcd.exceptions.ClientError)
        and isinstance(cause, aio.AioRpcError)
        and (
            cause.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # etcd's server answers its own proposal timeout as UNKNOWN with Go's fixed
            # context.DeadlineExceeded text: the one case mapped by text.
            or (cause.code() == grpc.StatusCode.UNKNOWN and cause.details() == "context deadline exceeded")
        )
    ):
        # etcd could not commit in time: e.g. a member on the minority side of a partition
        # (tests/test_multihost.py); not a request etcd refused.
        return errors.Unavailable(
            f"etcd could not commit the request in time (no quorum?): {cause.details()}"
        )
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
    for :class:`~mabeam.runtime.etcd.ResumingWatch` and :meth:`keepalive_once`
    for :class:`~mabeam.runtime.etcd.LeaseKeeper`. Calls go to one member
    and move to the next when it dies or is judged stuck (:mod:`.members`); a
    write in flight on that member fails with ``ConnectionFailedError`` and may
    be retried at once, a read or a lease refresh is sent again by itself.

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
        self._members: Members | None = None

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
            if len(self.endpoints) > 1:
                await self._open_members()
            else:
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

    async def _open_members(self) -> None:
        """One channel per member, the calls routed to the one in use (see :mod:`.members`)."""
        hosts, secure = grpc_target_check(self.endpoints)
        options = list(_CHANNEL_OPTIONS)
        if secure or self._tls is not None:
            # As with one address list: every member's certificate is checked against one name.
            named = [h for h, _ in hosts if not _is_ip(h)]
            options.append(("grpc.ssl_target_name_override", named[0] if named else hosts[0][0]))
        channels = [await open_channel([endpoint], self._tls, options) for endpoint in self.endpoints]
        members = Members(
            [Member(endpoint, channel) for endpoint, channel in zip(self.endpoints, channels, strict=True)],
            metadata=self.metadata,
        )
        self._members = members
        self.channel = channels[0]  # what aetcd's close() looks at; _members closes them all
        self.kvstub = RoutedStub(members, "kvstub")
        self.clusterstub = RoutedStub(members, "clusterstub")
        self.leasestub = RoutedStub(members, "leasestub")
        self.maintenancestub = RoutedStub(members, "maintenancestub")
        self.watchstub = RoutedStub(members, "watchstub")
        members.start()

    def member(self) -> Member | None:
        """The etcd member calls go to now (None with a single endpoint: grpc's channel picks)."""
        return self._members.pick() if self._members is not None else None

    @property
    def member_switches(self) -> int:
        """How many times a stuck member was given up for another (0 with a single endpoint)."""
        return self._members.switches if self._members is not None else 0

    async def close(self) -> None:
        """Close the channel (calls in flight fail with CANCELLED); safe to call twice.

        Final: aetcd would reopen a closed client on its next call, which would
        leak a channel nobody closes, so this one raises ClientClosedError instead.
        """
        self._closed = True
        members, self._members = self._members, None
        await super().close()
        if members is not None:
            await members.close()

    async def transaction(self, compare: Any, success: Any = None, failure: Any = None) -> Any:
        """aetcd's ``transaction``, except that a read-only one is sent as ranges.

        etcd before 3.5.5 (the embedded one is 3.5.1) panics and exits when a
        read-only ``Txn`` (only ranges, in both branches) is cancelled while it
        is applied: "unexpected error during txn" (etcd issue #14110, fixed by
        PR #14178). A deadline or a member given up cancels calls, so such a
        transaction here is sent as one ``Range`` per get instead, the later
        ones at the revision the first was read at: the same consistent view,
        and a cancelled range just fails. A read-only transaction with
        comparisons has no such equivalent and is refused (ValueError).
        """
        success, failure = list(success or []), list(failure or [])
        if not all(isinstance(op, aetcd.transactions.Get) for op in (*success, *failure)):
            return await super().transaction(compare, success=success, failure=failure)
        if compare:
            raise ValueError(
                "a read-only etcd transaction with comparisons (etcd 3.5.1 may panic when one is "
                "cancelled, etcd #14110): read with ranges, or write something in the transaction"
            )
        return True, await self._ranges_at_one_revision(success)

    async def _ranges_at_one_revision(self, gets: list[Any]) -> list[list[tuple[bytes, Any]]]:
        """Each get as a ``Range``: the first at the current revision, the others at that one, at once."""
        await self.connect()
        assert self.kvstub is not None
        stub = self.kvstub

        async def one(op: Any, revision: int | None) -> Any:
            request = self._build_get_range_request(op.key, op.range_end, revision=revision)
            try:
                return await stub.Range(request, timeout=self._timeout, metadata=self.metadata)
            except aio.AioRpcError as exc:
                aetcd.exceptions._handle_exception(exc)  # raises aetcd's error for it, as aetcd's calls do
                raise

        if not gets:
            return []
        first = await one(gets[0], None)
        rest = await asyncio.gather(*(one(op, int(first.header.revision)) for op in gets[1:]))
        replies = [first, *rest]
        return [[(kv.value, rtypes.Get(reply.header, kv)) for kv in reply.kvs] for reply in replies]

    async def keepalive_once(self, lease_id: int) -> int:
        """Refresh a lease once; its TTL after the refresh, 0 when etcd no longer knows it.

        One short LeaseKeepAlive stream per refresh: nothing to resume after a
        reconnect, and a dead connection fails this call instead of a stream
        that looks open.
        """
        await self.connect()
        if self._members is not None:
            return await self._keepalive_once_routed(self._members, lease_id)
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

    async def _keepalive_once_routed(self, members: Members, lease_id: int) -> int:
        # Sent to the member in use; sent again to the next one only if that member is
        # judged stuck meanwhile (a refresh is idempotent; a late one does no harm).
        while True:
            member = members.pick()
            call = member.leasestub.LeaseKeepAlive(
                iter([aetcd.rpc.LeaseKeepAliveRequest(ID=lease_id)]),
                timeout=self._timeout,
                metadata=self.metadata,
            )
            member.calls.add(call)
            try:
                async for reply in call:
                    member.heard()
                    return int(reply.TTL)
            except asyncio.CancelledError:
                if member.stuck and not _cancelled_by_caller():
                    continue
                raise
            except aio.AioRpcError as exc:
                member.heard_error(exc)
                members.failed(member, exc)
                aetcd.exceptions._handle_exception(exc)
            finally:
                member.calls.discard(call)
                call.cancel()
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
