"""Several etcd members behind one client: stick to one, give up a stuck one, go on through another.

A frozen member (SIGSTOP, a hung host) keeps its TCP connections open and
answers nothing, so grpc's channel still calls it READY and ``pick_first``
keeps sending to it until the keepalive declares the connection dead (5 + 3 s:
longer than an agent's 5 s lease). A busy member answers late, but it
answers. So the client opens one channel per member, talks to one member at a
time (sticky, like ``pick_first``) and tells the two apart by *silence*, not by
one missed ping: the member in use is judged stuck when nothing at all came
back from it (no call answered, no stream reply, no probe answered) for
:data:`STUCK_AFTER_S` while calls or a probe were outstanding, seen on
:data:`STUCK_TICKS` consecutive checks of a monitor that was itself on time
(a stalled event loop proves nothing). A member that serves hundreds of
requests a second and is merely slow is heard from constantly and never
judged stuck; when the client is idle, a cheap probe (``Status``) is sent after
:data:`PROBE_AFTER_S` of silence so that there is something to hear.

When the member in use is judged stuck, the client moves to the next member
not judged stuck (nothing happens when there is none: one member, or all
silent), and what was in flight on the stuck one is given up *once*, not on
every missed deadline: its calls in flight are cancelled, reads are sent again
to the new member, writes fail with ``ConnectionFailedError`` (their outcome
is unknown, as after a dropped connection), lease refreshes are sent again on
the new member (a refresh is idempotent: the first may still land, which does
no harm). A member judged stuck keeps a probe outstanding and is usable again
once it answers. Nothing is resent on a mere deadline: a busy member's answers
are waited for, so refreshes do not pile onto an etcd already behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import aetcd.exceptions
import aetcd.rpc
import grpc
from grpc import aio

log = logging.getLogger("mabeam.runtime.etcd")

# Monitor period, and how late a tick may be before it proves nothing (the event
# loop was stalled: answers may be waiting to be processed).
TICK_S = 0.25
LATE_TICK_S = 0.25
# Silence of the member in use after which a probe is sent (an idle client hears nothing).
PROBE_AFTER_S = 0.5
# Silence, with something outstanding, after which the member in use is judged stuck,
# on this many consecutive on-time ticks (so at least STUCK_AFTER_S + TICK_S of silence).
STUCK_AFTER_S = 0.75
STUCK_TICKS = 2

# Unary methods that only read: sent again to another member when theirs is judged stuck.
_REREAD = frozenset({"Range", "LeaseTimeToLive", "LeaseLeases", "Status", "MemberList"})
# Streaming methods of etcd's API (every other method is unary-unary).
_STREAMS = frozenset({"LeaseKeepAlive", "Watch", "Snapshot"})
# grpc codes that are an answer from the member (it is alive), as opposed to the call
# timing out, being cancelled, or the connection failing.
_NOT_AN_ANSWER = frozenset(
    {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}
)


class Member:
    """One etcd member: its channel and stubs, when it was last heard from, its calls in flight."""

    def __init__(self, endpoint: str, channel: aio.Channel) -> None:
        self.endpoint = endpoint
        self.channel = channel
        self.kvstub = aetcd.rpc.KVStub(channel)
        self.leasestub = aetcd.rpc.LeaseStub(channel)
        self.watchstub = aetcd.rpc.WatchStub(channel)
        self.maintenancestub = aetcd.rpc.MaintenanceStub(channel)
        self.clusterstub = aetcd.rpc.ClusterStub(channel)
        self.heard_at = asyncio.get_running_loop().time()
        self.stuck = False
        # Set when the member is judged stuck (replaced by a fresh one when it answers again).
        self.stuck_event = asyncio.Event()
        self.calls: set[Any] = set()  # calls in flight, cancelled when the member is judged stuck
        self.probe: asyncio.Task[None] | None = None

    def heard(self) -> None:
        """Something came back from the member: it is alive (busy maybe, not stuck)."""
        self.heard_at = asyncio.get_running_loop().time()
        if self.stuck:
            self.stuck = False
            self.stuck_event = asyncio.Event()
            log.warning("etcd member %s answers again", self.endpoint)

    def heard_error(self, exc: aio.AioRpcError) -> None:
        if exc.code() not in _NOT_AN_ANSWER:
            self.heard()

    def stub(self, service: str) -> Any:
        return getattr(self, service)


class Members:
    """The members of one client, the one in use, and the monitor that gives up a stuck one."""

    def __init__(self, members: Sequence[Member], metadata: Any = None) -> None:
        self.members = list(members)
        self.current = self.members[0]
        self.switches = 0
        self._metadata = metadata
        self._monitor: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._monitor = asyncio.create_task(self._watch(), name="etcd-member-monitor")

    async def close(self) -> None:
        tasks = [t for t in (self._monitor, *(m.probe for m in self.members)) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(m.channel.close(None) for m in self.members), return_exceptions=True)

    def pick(self) -> Member:
        """The member calls go to now."""
        return self.current

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        streak = 0
        expected = loop.time() + TICK_S
        while True:
            await asyncio.sleep(max(0.0, expected - loop.time()))
            now = loop.time()
            late = now - expected > LATE_TICK_S
            expected = now + TICK_S
            for member in self.members:
                if member.probe is None and (member.stuck or now - member.heard_at >= PROBE_AFTER_S):
                    member.probe = asyncio.create_task(self._probe(member), name="etcd-member-probe")
            member = self.current
            silent = now - member.heard_at >= STUCK_AFTER_S and bool(member.calls or member.probe)
            streak = 0 if late or not silent else streak + 1
            if streak >= STUCK_TICKS:
                streak = 0
                self._give_up(member, now)

    async def _probe(self, member: Member) -> None:
        try:
            await member.maintenancestub.Status(aetcd.rpc.StatusRequest(), metadata=self._metadata)
            member.heard()
        except aio.AioRpcError as exc:
            member.heard_error(exc)
            await asyncio.sleep(TICK_S)  # a refused connection: not again at once
        finally:
            member.probe = None

    def failed(self, member: Member, exc: aio.AioRpcError) -> bool:
        """A call on ``member`` failed: when its connection is down (refused, dropped), go on
        through another member. True when the client moved away from ``member``."""
        if exc.code() != grpc.StatusCode.UNAVAILABLE or member is not self.current:
            return member is not self.current
        if member.channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY:
            return False  # etcd itself said UNAVAILABLE (no leader ...): the member is up
        return self._give_up(member, asyncio.get_running_loop().time(), f"is unreachable ({exc.details()})")

    def _give_up(self, member: Member, now: float, why: str = "") -> bool:
        others = [m for m in self.members if m is not member and not m.stuck]
        if not others:
            return False  # nowhere better to go: wait for the keepalive or for it to answer
        start = self.members.index(member)
        ordered = self.members[start + 1 :] + self.members[:start]
        chosen = next(m for m in ordered if m in others)
        log.warning(
            "etcd member %s %s: going on through %s (%d calls in flight given up)",
            member.endpoint,
            why or f"answered nothing for {now - member.heard_at:.2f} s",
            chosen.endpoint,
            len(member.calls),
        )
        member.stuck = True
        chosen.heard_at = now  # its silence so far says nothing: it was not in use
        self.current = chosen
        self.switches += 1
        member.stuck_event.set()
        calls, member.calls = member.calls, set()
        for call in calls:
            call.cancel()
        return True


async def write_request(call: Any, request: Any) -> None:
    """``call.write(request)`` on a grpc.aio stream, failing (AioRpcError) when the call ends first.

    grpc.aio's write waits for the call's initial metadata to be sent, and a
    call that ends before that (cancelled, or failed while connecting, as
    when every etcd member restarts) never sends it: the write would wait for
    good. Seen as a watch that never resumed after a full etcd restart.
    """
    write = asyncio.ensure_future(call.write(request))
    ended = asyncio.get_running_loop().create_future()

    def on_end(_: Any) -> None:
        if not ended.done():
            ended.set_result(None)

    call.add_done_callback(on_end)
    try:
        await asyncio.wait({write, ended}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        write.cancel()
        raise
    finally:
        if not ended.done():
            ended.cancel()
    if write.done():
        write.result()  # raises what the write raised
        return
    write.cancel()
    await asyncio.gather(write, return_exceptions=True)
    raise aio.AioRpcError(  # CANCELLED too: a call cancelled under the write is a stream that broke
        await call.code(),
        aio.Metadata(),
        aio.Metadata(),
        details=(await call.details()) or "the call ended before the request was sent",
        debug_error_string="",
    )


def _reads_only(method: str, request: Any) -> bool:
    """A transaction of reads only (no put, no delete): safe to send again."""
    if method != "Txn":
        return False
    return all(op.WhichOneof("request") == "request_range" for op in (*request.success, *request.failure))


def _never_sent(exc: aio.AioRpcError) -> bool:
    """The call failed before reaching the member (no connection): sending it elsewhere is safe."""
    return "failed to connect" in (exc.details() or "")


class GaveUp(aetcd.exceptions.ConnectionFailedError):
    """A call in flight on a member judged stuck: its outcome is unknown."""


def _given_up(member: Member) -> bool:
    task = asyncio.current_task()
    return member.stuck and (task is None or task.cancelling() == 0)


class RoutedStub:
    """Stands for one of aetcd's stubs (``kvstub``, ``leasestub`` ...) and sends each call to the member in use."""

    def __init__(self, members: Members, service: str) -> None:
        self._members = members
        self._service = service

    def __getattr__(self, method: str) -> Any:
        if method in _STREAMS:
            return _RoutedStream(self._members, self._service, method)
        return _RoutedUnary(self._members, self._service, method)


class _RoutedUnary:
    def __init__(self, members: Members, service: str, method: str) -> None:
        self._members, self._service, self._method = members, service, method

    async def __call__(self, request: Any, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        tries = len(self._members.members)
        while True:
            tries -= 1
            member = self._members.pick()
            left = None if deadline is None else max(0.0, deadline - loop.time())
            call = getattr(member.stub(self._service), self._method)(request, *args, timeout=left, **kwargs)
            member.calls.add(call)
            try:
                reply = await call
            except asyncio.CancelledError:
                if not _given_up(member):
                    raise
                if self._method in _REREAD or _reads_only(self._method, request):
                    continue  # a read: ask the member now in use
                raise GaveUp(
                    f"etcd member {member.endpoint} stopped answering; the {self._method} call's outcome is unknown"
                ) from None
            except aio.AioRpcError as exc:
                member.heard_error(exc)
                moved = self._members.failed(member, exc)
                if (
                    moved
                    and tries > 0
                    and (self._method in _REREAD or _reads_only(self._method, request) or _never_sent(exc))
                ):
                    continue
                raise
            finally:
                member.calls.discard(call)
            member.heard()
            return reply


class _RoutedStream:
    def __init__(self, members: Members, service: str, method: str) -> None:
        self._members, self._service, self._method = members, service, method

    def __call__(self, *args: Any, **kwargs: Any) -> _StreamCall:
        member = self._members.pick()
        call = getattr(member.stub(self._service), self._method)(*args, **kwargs)
        member.calls.add(call)
        call.add_done_callback(lambda _: member.calls.discard(call))
        return _StreamCall(self._members, member, call)


class _StreamCall:
    """A streaming call on one member: its replies count as the member heard; a given-up member's
    call fails with :class:`GaveUp` (``ConnectionFailedError``) rather than a bare cancellation."""

    def __init__(self, members: Members, member: Member, call: Any) -> None:
        self._members = members
        self._member = member
        self._call = call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    async def read(self) -> Any:
        try:
            reply = await self._call.read()
        except asyncio.CancelledError:
            if _given_up(self._member):
                raise GaveUp(f"etcd member {self._member.endpoint} stopped answering") from None
            raise
        except aio.AioRpcError as exc:
            self._member.heard_error(exc)
            self._members.failed(self._member, exc)
            raise
        if reply is not aio.EOF:  # type: ignore[attr-defined]
            self._member.heard()
        return reply

    async def write(self, request: Any) -> None:
        try:
            await write_request(self._call, request)
        except asyncio.CancelledError:
            if _given_up(self._member):
                raise GaveUp(f"etcd member {self._member.endpoint} stopped answering") from None
            raise
        except aio.AioRpcError as exc:
            if _given_up(self._member):
                raise GaveUp(f"etcd member {self._member.endpoint} stopped answering") from None
            self._member.heard_error(exc)
            self._members.failed(self._member, exc)
            raise

    def __aiter__(self) -> Any:
        return self._replies()

    async def _replies(self) -> Any:
        while True:
            reply = await self.read()
            if reply is aio.EOF:  # type: ignore[attr-defined]
                return
            yield reply
