"""Leases kept alive: one lease by its own task, or many over shared streams.

A lease is how the mesh says "this process is alive": keys bound to it
(endpoints, ownership, candidacy) vanish when it lapses. etcd only lets a
lease live while someone refreshes it, and aetcd's keep-alive neither says
when a lease is lost nor survives a reconnect, so:

* :class:`LeaseKeeper` keeps one lease alive from a background task and says
  when it is lost instead of silently granting another: what hung on the
  old lease (keys, leadership) is the owner's to redo.
* :class:`KeepAliveStream` refreshes many leases (a registry's agents) over a
  few long-lived LeaseKeepAlive streams, since a stream per refresh would
  cost more than the refreshes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

import aetcd
import aetcd.exceptions
import aetcd.rpc
import grpc
import stamina
from grpc import aio

from mabeam.runtime.etcd.client import UNREACHABLE, ClientClosedError, EtcdClient, _cancelled_by_caller, log
from mabeam.runtime.etcd.members import LATE_TICK_S, TICK_S, Member


class LeaseNotFound(Exception):
    """A write bound to a lease etcd does not know (it lapsed or was never granted): forget it and write again."""

    def __init__(self, lease: int) -> None:
        super().__init__(f"lease {lease} not found")
        self.lease = lease


def lease_unknown(exc: BaseException) -> bool:
    """Whether ``exc`` (an aetcd error of a write bound to a lease) is etcd's NOT_FOUND: what it
    answers to a put bound to a lease it does not know (lapsed, revoked, never granted)."""
    cause = exc.__cause__
    return (
        isinstance(cause, grpc.RpcError)
        and hasattr(cause, "code")
        and cause.code() == grpc.StatusCode.NOT_FOUND
    )


def raise_if_lease_unknown(exc: BaseException, lease: int | None) -> None:
    """Raise :class:`LeaseNotFound` from ``exc`` (an aetcd error of a write bound to ``lease``) when
    etcd does not know the lease (:func:`lease_unknown`)."""
    if lease and lease_unknown(exc):
        raise LeaseNotFound(lease) from exc


# With several members: a stream with refreshes waiting that answered nothing for this
# long, while its member answers other calls, is given up and its refreshes sent again
# on a new stream (see _KeepAliveCall._supervise). A busy etcd answers every stream late,
# but each keeps answering; a refresh a follower forwards to a frozen leader holds one
# stream until the follower's request timeout (7 s), longer than an agent's lease.
STREAM_STALL_S = 1.5


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
    5 s) raises ``ConnectionTimeoutError``; its stream is dropped too when it
    answered nothing for that long, since a stream that stops answering is as
    good as dead (one that answers slowly, a busy etcd, is kept: dropping it
    failed every refresh behind the late one); a stream that fails fails
    every refresh waiting on it (``ConnectionFailedError`` or what etcd said).
    Either way the next refresh opens a new stream, on a live member. So, as
    with ``keepalive_once``, a dead connection fails the call instead of
    leaving a stream that looks open.

    With several members, refreshes do not fail for a member that stops
    answering: when the client judges the member stuck, or when one stream
    answered nothing for :data:`STREAM_STALL_S` while its member answers the
    rest (a follower forwarding a refresh to a frozen leader), the refreshes
    waiting on that stream are sent once more on a new one (to the member now
    in use) and their callers get the first answer. A merely slow stream is
    waited for: nothing is resent on a deadline.

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
        await self._client.connect()
        stream = self._stream_for(lease_id)
        answer = stream.send(lease_id)
        try:
            return await asyncio.wait_for(answer, self._timeout)
        except TimeoutError:
            error = aetcd.exceptions.ConnectionTimeoutError(
                f"etcd did not answer a lease keep-alive within {self._timeout:g} s"
            )
            stream = self._stream_holding(answer) or stream
            if stream.silent_for() >= self._timeout or stream.oldest_waiting() >= 2 * self._timeout:
                # It answers nothing (as good as dead), or so late that what is queued on it
                # was given up long ago: new refreshes start on a new stream.
                stream.fail(error)
            # Else it answers, slowly (etcd renews a lease once its apply loop caught up): the
            # refreshes behind this one keep their places; this one's late answer is dropped.
            raise error from None

    def _stream_for(self, lease_id: int) -> _KeepAliveCall:
        """The open stream of the lease's slot, to the member in use (opened if need be)."""
        slot = lease_id % len(self._streams)
        stream = self._streams[slot]
        member = self._client.member()
        if stream is not None and not stream.closed and stream.member is member:
            return stream
        if stream is not None and not stream.closed:
            stream.retire()  # the client moved to another member: this one ends once answered
        stub = member.leasestub if member is not None else self._client.leasestub
        assert stub is not None
        stream = _KeepAliveCall(stub, self._client.metadata, member, self._hand_over)
        self._streams[slot] = stream
        return stream

    def _stream_holding(self, answer: asyncio.Future[int]) -> _KeepAliveCall | None:
        for stream in self._streams:
            if stream is not None and stream.holds(answer):
                return stream
        return None

    def _hand_over(self, waiting: dict[int, deque[asyncio.Future[int]]]) -> None:
        """Refreshes left unanswered on a member judged stuck: sent once more, to the member in use."""
        if self._closed:
            for answers in waiting.values():
                for answer in answers:
                    if not answer.done():
                        answer.set_exception(ClientClosedError("keep-alive stream is closed"))
                        answer.exception()
            return
        for lease_id, answers in waiting.items():
            self._stream_for(lease_id).adopt(lease_id, answers)

    async def close(self) -> None:
        """Close every stream (refreshes in flight fail); safe to call twice."""
        self._closed = True
        streams, self._streams = self._streams, [None] * len(self._streams)
        for stream in streams:
            if stream is not None:
                stream.fail(ClientClosedError("keep-alive stream is closed"))
        await asyncio.gather(*(s.reader for s in streams if s is not None), return_exceptions=True)


class _KeepAliveCall:
    """One LeaseKeepAlive stream of a :class:`KeepAliveStream`, its requests paired with answers.

    With several members (``member`` given), the stream is to that member;
    when the client judges it stuck, the refreshes still waiting are handed
    to ``hand_over`` (sent again elsewhere) instead of failing.
    """

    def __init__(
        self,
        stub: Any,
        metadata: Any,
        member: Member | None = None,
        hand_over: Callable[[dict[int, deque[asyncio.Future[int]]]], None] | None = None,
    ) -> None:
        self.closed = False
        self.member = member
        self._retiring = False
        self._hand_over = hand_over
        self._queue: asyncio.Queue[int | None] = asyncio.Queue()
        # Per lease, the refreshes sent and not yet answered, oldest first:
        # etcd answers a stream's requests in order.
        self._waiting: dict[int, deque[asyncio.Future[int]]] = {}
        self._sent_at: deque[float] = deque()  # when each refresh not yet answered was sent, in order
        self._call = stub.LeaseKeepAlive(self._requests(), metadata=metadata)
        self.reader = asyncio.create_task(self._read(), name="etcd-lease-keepalive")
        self._progress_at = asyncio.get_running_loop().time()  # last reply, or first request since
        self._stuck_watch: asyncio.Task[None] | None = None
        if member is not None:
            self._stuck_watch = asyncio.create_task(
                self._supervise(member), name="etcd-lease-keepalive-watch"
            )

    async def _requests(self) -> Any:
        while True:
            lease_id = await self._queue.get()
            if lease_id is None:
                return
            yield aetcd.rpc.LeaseKeepAliveRequest(ID=lease_id)

    def send(self, lease_id: int) -> asyncio.Future[int]:
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.adopt(lease_id, [answer])
        return answer

    def adopt(self, lease_id: int, answers: Any) -> None:
        """Send one refresh of ``lease_id`` per answer still awaited; its reply resolves it."""
        for answer in answers:
            if answer.done():
                continue
            if not self._waiting:
                self._progress_at = asyncio.get_running_loop().time()
            self._waiting.setdefault(lease_id, deque()).append(answer)
            self._sent_at.append(asyncio.get_running_loop().time())
            self._queue.put_nowait(lease_id)

    def oldest_waiting(self) -> float:
        """Seconds the oldest refresh not yet answered has waited (0 with none)."""
        return asyncio.get_running_loop().time() - self._sent_at[0] if self._sent_at else 0.0

    def silent_for(self) -> float:
        """Seconds since this stream last answered while refreshes waited (or since the first of them)."""
        return asyncio.get_running_loop().time() - self._progress_at

    def holds(self, answer: asyncio.Future[int]) -> bool:
        return any(answer in answers for answers in self._waiting.values())

    def retire(self) -> None:
        """Send nothing more; end once every refresh sent was answered."""
        self._retiring = True
        if not self._waiting:
            self.fail(aetcd.exceptions.ConnectionFailedError("lease keep-alive stream retired"))

    async def _supervise(self, member: Member) -> None:
        """Hand the refreshes waiting here over to another stream when the member is judged
        stuck, or when this stream alone stopped answering while the member answers the rest
        (a follower's refresh forwarded to a frozen leader holds up the whole stream: etcd
        answers a stream's requests one after another)."""
        loop = asyncio.get_running_loop()
        expected = loop.time() + TICK_S
        while not self.closed:
            await asyncio.sleep(max(0.0, expected - loop.time()))
            now = loop.time()
            late = now - expected > LATE_TICK_S  # the loop stalled: answers may be unprocessed
            expected = now + TICK_S
            if self.closed:
                return
            if member.stuck:
                why = f"etcd member {member.endpoint} stopped answering"
            elif (
                not late
                and self._waiting
                and now - self._progress_at >= STREAM_STALL_S
                and now - member.heard_at < 1.0  # the member itself answers
            ):
                why = f"lease keep-alive stream to {member.endpoint} answered nothing for {now - self._progress_at:.2f} s"
            else:
                continue
            waiting, self._waiting = self._waiting, {}
            self.fail(aetcd.exceptions.ConnectionFailedError(why))
            if waiting and self._hand_over is not None:
                log.info("%s: %d lease refreshes sent again", why, sum(len(a) for a in waiting.values()))
                self._hand_over(waiting)
            return

    async def _read(self) -> None:
        error: Exception = aetcd.exceptions.ConnectionFailedError("etcd ended the lease keep-alive stream")
        try:
            async for reply in self._call:
                self._progress_at = asyncio.get_running_loop().time()
                if self._sent_at:
                    self._sent_at.popleft()  # etcd answers a stream's requests in order
                if self.member is not None:
                    self.member.heard()
                waiting = self._waiting.get(reply.ID)
                if not waiting:
                    continue
                answer = waiting.popleft()  # this reply's request (its caller may have given up)
                if not waiting:
                    del self._waiting[reply.ID]
                if not answer.done():
                    answer.set_result(int(reply.TTL))
                if self._retiring and not self._waiting:
                    break
        except aio.AioRpcError as exc:
            if self.member is not None:
                self.member.heard_error(exc)
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
        if self._stuck_watch is not None and self._stuck_watch is not asyncio.current_task():
            self._stuck_watch.cancel()
        waiting, self._waiting = self._waiting, {}
        for answers in waiting.values():
            for answer in answers:
                if not answer.done():
                    answer.set_exception(error)
                    answer.exception()  # retrieved: nobody may be waiting any more


class _NotRevokedYet(Exception):
    """etcd did not answer the revocation of a lost lease: try again."""


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
        # Not a stamina retry: each wait is bounded by the lease's expiry, which a backoff cannot respect.
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
        with contextlib.suppress(_NotRevokedYet):  # chased long enough: it lapses by itself
            async for attempt in stamina.retry_context(
                on=_NotRevokedYet,
                attempts=None,
                timeout=max(10.0, 3.0 * self.granted_ttl),
                wait_initial=0.25,
                wait_max=0.25,
                wait_jitter=0.0,
            ):
                with attempt:
                    await self._revoke_once()

    async def _revoke_once(self) -> None:
        """Revoke the lost lease; :class:`_NotRevokedYet` while etcd does not answer."""
        try:
            await asyncio.wait_for(self._client.revoke_lease(self.lease_id), timeout=1.0)
            self._gone = True
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
            # The client's channel closed under the call: the next try says whether for good.
            raise _NotRevokedYet("revoke cancelled") from None
        except ClientClosedError:
            return
        except Exception as exc:
            if isinstance(exc, (*UNREACHABLE, TimeoutError)):
                raise _NotRevokedYet(str(exc) or type(exc).__name__) from exc
            self._gone = True  # lease not found

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
