"""The SDK's channel pool: one reused channel per address, its stubs, bounded in number and idleness.

Re-exported by :mod:`mabeam.client` (``ChannelPool``, ``CHANNEL_OPTIONS``); see
``docs/decisions.md``, "Bounded memory per connection".
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any, TypeVar

from grpc import aio

from mabeam import auth, telemetry
from mabeam.tls import TLS

S = TypeVar("S")

# Keep-alive pings find a dead peer (a vanished host sends no RST) on idle
# channels too. Every 10 s is twice the interval the mesh's servers accept
# (mabeam.server.MIN_PING_INTERVAL_MS); without max_pings_without_data=0 grpc
# stops pinging an idle channel after two pings.
KEEPALIVE_TIME_MS = 10_000

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


CHANNEL_IDLE_TIMEOUT = 60.0
"""Seconds a pooled channel may stay unused (no call in flight, not taken from the pool) before it is closed."""

MAX_CHANNELS = 1024
"""Open channels a pool keeps at most; past it the least recently used idle one is closed."""


class _InFlight:
    """Calls in flight on one channel, counted by the channel's wrapper (:class:`_Channel`)."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = 0

    def done(self, _call: Any) -> None:
        self.active -= 1


def _with_token(metadata: Any, token: tuple[tuple[str, str], ...]) -> Any:
    """``metadata`` plus the pool's ``authorization``, unless the caller passes one of its own."""
    if metadata is None:
        return token
    pairs = tuple(metadata)
    if any(key == "authorization" for key, _ in pairs):
        return pairs
    return pairs + token


class _MultiCallable:
    """A channel's callable for one method: adds the pool's token and counts the call while it runs.

    Not a grpc interceptor: grpc.aio's interceptors wrap every call in an extra
    task and cost about a tenth of a loopback call (measured: 776 µs plain,
    859 µs through one interceptor, 816 µs with the metadata passed as here).
    """

    __slots__ = ("_calls", "_inner", "_token")

    def __init__(self, inner: Any, token: tuple[tuple[str, str], ...], calls: _InFlight) -> None:
        self._inner = inner
        self._token = token
        self._calls = calls

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._token:
            kwargs["metadata"] = _with_token(kwargs.get("metadata"), self._token)
        call = self._inner(*args, **kwargs)
        self._calls.active += 1
        call.add_done_callback(self._calls.done)
        return call


class _Channel:
    """An ``aio.Channel`` whose calls carry the pool's token and are counted (what the pool hands out).

    Stubs built on it (``AgentServiceStub(channel)``) and calls made through
    :meth:`unary_unary` and friends go through :class:`_MultiCallable`;
    everything else is the channel's own.
    """

    __slots__ = ("_calls", "_channel", "_token")

    def __init__(self, channel: aio.Channel, token: tuple[tuple[str, str], ...], calls: _InFlight) -> None:
        self._channel = channel
        self._token = token
        self._calls = calls

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _MultiCallable(self._channel.unary_unary(*args, **kwargs), self._token, self._calls)

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _MultiCallable(self._channel.unary_stream(*args, **kwargs), self._token, self._calls)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _MultiCallable(self._channel.stream_unary(*args, **kwargs), self._token, self._calls)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _MultiCallable(self._channel.stream_stream(*args, **kwargs), self._token, self._calls)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)


class _Pooled:
    """A pooled channel, its stubs, its calls in flight and when it was last taken."""

    __slots__ = ("calls", "channel", "last_used", "stubs")

    def __init__(self, channel: Any, calls: _InFlight, now: float) -> None:
        self.channel = channel
        self.stubs: dict[Callable[[aio.Channel], Any], Any] = {}
        self.calls = calls
        self.last_used = now


class ChannelPool:
    """One reused channel per address (fresh channels cost 2.2x a call), and its stubs; bounded.

    ``token``, when given, is presented on every call (``authorization:
    Bearer``): the caller's identity (see :mod:`mabeam.auth`).

    The pool does not keep every channel it ever opened: a channel unused for
    ``idle_timeout`` seconds (default :data:`CHANNEL_IDLE_TIMEOUT`, 60 s) is
    closed, and past ``max_channels`` open channels (default
    :data:`MAX_CHANNELS`, 1,024) the least recently used idle one is closed;
    its stubs go with it, and the next use opens a new one. A channel with a
    call in flight is never closed by either rule: each channel counts its
    calls (started, done: the channel the pool hands out wraps each method's
    callable, see :class:`_MultiCallable`), so a long stream keeps its channel.
    "Used" means taken from the pool (:meth:`get`, :meth:`stub`) or carrying
    a call; a caller keeping a stub or channel should take it again from the
    pool (a dict lookup) for calls more than ``idle_timeout`` apart. Idle
    channels are found at most every ``idle_timeout / 4`` seconds, by the next
    use of the pool or by a timer while it holds channels. ``clock`` is for
    tests.
    """

    def __init__(
        self,
        tls: TLS | None = None,
        token: str | None = None,
        *,
        idle_timeout: float = CHANNEL_IDLE_TIMEOUT,
        max_channels: int = MAX_CHANNELS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if idle_timeout <= 0 or max_channels < 1:
            raise ValueError("idle_timeout must be > 0 and max_channels >= 1")
        self._tls = tls
        self._token = auth.call_metadata(token)
        self._channels: collections.OrderedDict[str, _Pooled] = collections.OrderedDict()
        self.idle_timeout = idle_timeout
        self.max_channels = max_channels
        self._clock = clock
        self._next_sweep = clock() + idle_timeout / 4
        self._timer: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.closed_idle = 0  # channels closed for idleness or the cap (a statistic)

    def __len__(self) -> int:
        return len(self._channels)

    def stub(self, address: str, stub_class: Callable[[aio.Channel], S]) -> S:
        """The ``stub_class`` stub over the channel to ``address``, made once per channel.

        A stub builds a callable per RPC of its service: calls on a hot path
        (a step, a round, a probe) reuse it. Example::

            stub = pool.stub("127.0.0.1:7001", agent_pb2_grpc.AgentServiceStub)
        """
        pooled = self._take(address)
        stub = pooled.stubs.get(stub_class)
        if stub is None:
            stub = pooled.stubs[stub_class] = stub_class(pooled.channel)
        return stub  # type: ignore[no-any-return]

    def get(self, address: str) -> aio.Channel:
        """The channel to ``address``, created on first use (or after it was closed as idle)."""
        return self._take(address).channel  # type: ignore[no-any-return]

    def _take(self, address: str) -> _Pooled:
        now = self._clock()
        pooled = self._channels.get(address)
        if pooled is not None:
            pooled.last_used = now
            self._channels.move_to_end(address)
        else:
            pooled = self._open(address, now)
        if now >= self._next_sweep or len(self._channels) > self.max_channels:
            self._sweep(now)
        return pooled

    def _open(self, address: str, now: float) -> _Pooled:
        calls = _InFlight()
        options = list(CHANNEL_OPTIONS)
        interceptors = telemetry.client_interceptors()
        if self._tls is not None:
            if self._tls.server_name:
                options.append(("grpc.ssl_target_name_override", self._tls.server_name))
            channel = aio.secure_channel(
                address, self._tls.channel_credentials(), options=options, interceptors=interceptors
            )
        else:
            channel = aio.insecure_channel(address, options=options, interceptors=interceptors)
        pooled = self._channels[address] = _Pooled(_Channel(channel, self._token, calls), calls, now)
        self._arm_timer()
        return pooled

    def _sweep(self, now: float | None = None) -> None:
        """Close the channels idle too long, then the least recently used idle ones over the cap."""
        if now is None:
            now = self._clock()
        self._next_sweep = now + self.idle_timeout / 4
        cutoff = now - self.idle_timeout
        over = len(self._channels) - self.max_channels
        # Oldest use first: stop at the first channel used recently, once under the cap.
        for address, pooled in list(self._channels.items()):
            if pooled.last_used > cutoff and over <= 0:
                break
            if pooled.calls.active > 0:
                pooled.last_used = now  # busy: in use now, whatever its age
                continue
            del self._channels[address]
            over -= 1
            self.closed_idle += 1
            self._close_later(pooled.channel)

    def _close_later(self, channel: aio.Channel) -> None:
        try:
            task = asyncio.get_running_loop().create_task(channel.close(None))
        except RuntimeError:  # no loop running: grpc closes it when it is collected
            return
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _arm_timer(self) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(self.idle_timeout / 2, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._sweep()
        if self._channels:
            self._arm_timer()

    async def discard(self, address: str) -> None:
        """Close and forget the channel to ``address`` (its endpoint went away)."""
        pooled = self._channels.pop(address, None)
        if pooled is not None:
            await pooled.channel.close(None)

    async def close(self) -> None:
        """Close every channel; safe to call twice."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pooled, self._channels = list(self._channels.values()), collections.OrderedDict()
        closing = list(self._closing)
        await asyncio.gather(*(p.channel.close(None) for p in pooled), *closing, return_exceptions=True)
