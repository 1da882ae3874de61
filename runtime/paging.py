"""Paging that pages: one bounded etcd range read per page, not the whole prefix.

Every range read of the stores is :func:`range_reply` (one ``RangeRequest``, aetcd's
errors); the stores (only they call etcd) list their keys with :func:`scan`: a range
read from the key after the page token's to the prefix's range end, sorted by
key, with ``limit = page_size + 1`` (the extra key says whether a next page
exists). A filter that cannot be pushed into the key range (``keep``) is
applied to successive bounded ranges until the page is full or
:data:`MAX_EXAMINED` keys were examined; the page may then be short, and its
token resumes after the last key examined (AIP-158 allows short pages). See
``docs/decisions.md``, "Paging that pages".

Page tokens are :func:`mabeam.runtime.validate.encode_page_token` of the key's
suffix under the prefix, bound to the request's filter.

The retention pruners want the other end: :func:`last_keys` finds the last
``limit`` keys of a range (the oldest of a newest-first index) without reading
the range. etcd drops the ``limit`` of a sorted range (a descending read
fetches every key and value of the range from its backend, sorts them, then
truncates), so it uses count-only ranges (etcd counts in its in-memory index,
reads no value and sends no key) to bisect the key space for a point with
between ``limit`` and ``2 * limit`` keys after it (at least
:data:`MIN_TAIL`), then one ascending read of those: at most
``max(2 * limit, MIN_TAIL) + 1`` keys come back. See ``docs/decisions.md``,
"The oldest keys of an index".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aetcd
import aetcd.utils as aetcd_utils
from grpc import aio

from mabeam.runtime.etcd import EtcdClient

MAX_EXAMINED = 5000  # keys one filtered list call reads at most before answering a short page
# last_keys: the bisection's probes at most (each halves an interval of the key space: enough for
# keys that first differ 250 bytes past their shared prefix); past it, bounded reads to the end.
MAX_PROBES = 2000
# last_keys reads a tail of at least this many keys when asked for fewer: a few dozen keys are
# cheaper than the probes it takes to split keys that differ only in their last bytes.
MIN_TAIL = 64


@dataclass
class ScanStats:
    """What the range reads of one store cost (for tests and the curious): calls and keys returned."""

    ranges: int = 0
    keys: int = 0
    largest: int = 0  # the most keys one range read returned
    limits: list[int] = field(default_factory=list)  # the last few limits asked
    counts: int = 0  # count-only range reads (no key returned)

    def count(self, limit: int, returned: int) -> None:
        self.ranges += 1
        self.keys += returned
        self.largest = max(self.largest, returned)
        self.limits = [*self.limits[-15:], limit]


async def range_reply(
    client: EtcdClient,
    start: bytes,
    end: bytes,
    limit: int = 0,
    *,
    serializable: bool = False,
    keys_only: bool = False,
    count_only: bool = False,
    revision: int = 0,
) -> Any:
    """One etcd range read of ``[start, end)`` (``limit`` 0: no limit; ``revision`` 0: the latest):
    etcd's reply, with ``kvs``, ``more``, ``count`` and the header. aetcd's errors as its own calls
    raise them. Every range read of the stores goes through here."""
    await client.connect()
    assert client.kvstub is not None
    request = aetcd.rpc.RangeRequest(
        key=start,
        range_end=end,
        limit=limit,
        serializable=serializable,
        keys_only=keys_only,
        count_only=count_only,
        revision=revision,
    )
    try:
        return await client.kvstub.Range(request, timeout=client.timeout, metadata=client.metadata)
    except aio.AioRpcError as exc:
        aetcd.exceptions._handle_exception(exc)
        raise


async def read_range(
    client: EtcdClient,
    start: bytes,
    end: bytes,
    limit: int,
    *,
    serializable: bool = False,
    keys_only: bool = False,
    stats: ScanStats | None = None,
) -> tuple[list[Any], bool]:
    """At most ``limit`` key-values in ``[start, end)`` by key, and whether more keys follow."""
    reply = await range_reply(client, start, end, limit, serializable=serializable, keys_only=keys_only)
    if stats is not None:
        stats.count(limit, len(reply.kvs))
    return list(reply.kvs), bool(reply.more)


async def scan(
    client: EtcdClient,
    prefix: bytes,
    after: str | None,
    size: int,
    *,
    narrow: str = "",
    keep: Callable[[Any], bool] | None = None,
    serializable: bool = False,
    max_examined: int = MAX_EXAMINED,
    stats: ScanStats | None = None,
) -> tuple[list[Any], str | None]:
    """One page of the key-values under ``prefix + narrow`` whose suffix (after ``prefix``) sorts
    after ``after``, that ``keep`` accepts; and the suffix the next page continues after (None: no
    next page).

    Without ``keep`` this is one range read of ``size + 1`` keys. With it, successive ranges of
    ``size + 1`` keys until ``size`` were kept or ``max_examined`` keys were read (a short page).
    """
    low = prefix + narrow.encode()
    end = aetcd_utils.prefix_range_end(low)
    cursor = prefix + after.encode() + b"\x00" if after is not None else low
    cursor = max(cursor, low)
    kept: list[Any] = []
    examined = 0
    while True:
        limit = min(size + 1, max(max_examined - examined, 1)) if keep is not None else size + 1
        kvs, more = await read_range(client, cursor, end, limit, serializable=serializable, stats=stats)
        for kv in kvs:
            examined += 1
            if keep is not None and not keep(kv):
                continue
            if len(kept) == size:  # one more beyond the page: there is a next page
                return kept, _suffix(prefix, kept[-1])
            kept.append(kv)
        if not more or not kvs:
            return kept, None
        cursor = kvs[-1].key + b"\x00"
        if len(kept) == size:
            return kept, _suffix(prefix, kept[-1])  # more keys follow: maybe an empty last page
        if examined >= max_examined:
            return kept, _suffix(prefix, kvs[-1])  # short page: resume after the last key examined


def _suffix(prefix: bytes, kv: Any) -> str:
    return bytes(kv.key[len(prefix) :]).decode()


async def count_range(client: EtcdClient, start: bytes, end: bytes, *, stats: ScanStats | None = None) -> int:
    """How many keys are in ``[start, end)``: a count-only range (etcd sends no key)."""
    reply = await range_reply(client, start, end, count_only=True)
    if stats is not None:
        stats.counts += 1
    return int(reply.count)


Count = Callable[[bytes, bytes], Awaitable[int]]
Read = Callable[[bytes, bytes, int], Awaitable[Sequence[Any]]]


async def last_keys(
    client: EtcdClient,
    start: bytes,
    end: bytes | None,
    limit: int,
    *,
    keys_only: bool = False,
    slack: int = 2,
    stats: ScanStats | None = None,
    count: Count | None = None,
    read: Read | None = None,
) -> list[Any]:
    """The last ``limit`` key-values of ``[start, end)`` in key order (fewer when the range holds
    fewer); ``end`` None: the range of the prefix ``start``. Bounded reads only.

    One count-only range of the whole; when it holds more than ``most = max(slack * limit,
    MIN_TAIL)`` keys, the shared prefix of its keys (one read of one key, and count-only ranges
    bisecting its length), then a bisection of the key space after that prefix by count-only
    ranges of ``[probe, end)`` until one holds between ``limit`` and ``most`` keys; those are read
    in one ascending range. At most ``most + 1`` keys are returned by etcd in all; the count-only
    ranges are a few per byte the keys of the range's tail differ in (30 to 40 for 3,000 or 30,000
    keys named by a 20-digit time). etcd 3.5 still walks its in-memory index over the span of each
    range (it counts the total even of a limited one), so the server's work grows with the range,
    but it reads no value from its backend, sorts nothing and holds no copy (a sorted range does
    all three). The reads are not at one revision: a key written or deleted meanwhile may make
    the answer a little short or not quite the last (callers check what they act on again).

    ``count(start, end)`` and ``read(start, end, limit)`` replace the etcd reads (a store that
    counts its reads); by default they are :func:`count_range` and :func:`read_range`.
    """
    if limit <= 0:
        return []
    if end is None:
        end = aetcd_utils.prefix_range_end(start)

    async def default_count(a: bytes, b: bytes) -> int:
        return await count_range(client, a, b, stats=stats)

    async def default_read(a: bytes, b: bytes, n: int) -> Sequence[Any]:
        return (await read_range(client, a, b, n, keys_only=keys_only, stats=stats))[0]

    count = count or default_count
    read = read or default_read
    most = max(max(slack, 1) * limit, MIN_TAIL)
    total = await count(start, end)
    if total == 0:
        return []
    if total <= most:
        return list(await read(start, end, total))[-limit:]
    first = await read(start, end, 1)
    if not first:
        return []  # deleted meanwhile
    lo, hi = await _shared_prefix_range(bytes(first[0].key), start, end, count)
    for _ in range(MAX_PROBES):
        mid = _between(lo, hi)
        n = await count(mid, end)
        if limit <= n <= most:
            return list(await read(mid, end, n))[-limit:]
        if n > most:
            lo = mid
        else:
            hi = mid
    # Not split by MAX_PROBES (keys alike for hundreds of bytes): bounded reads from lo to the end.
    kept: list[Any] = []
    while True:
        kvs = list(await read(lo, end, most))
        kept = (kept + kvs)[-limit:]
        if len(kvs) < most:
            return kept
        lo = bytes(kvs[-1].key) + b"\0"


async def _shared_prefix_range(key: bytes, start: bytes, end: bytes, count: Count) -> tuple[bytes, bytes]:
    """The narrowest ``[lo, hi)`` within ``[start, end)`` holding all its keys that is the range of
    a prefix of ``key``, its first key: count-only ranges of what is above the prefix's range (empty
    when it holds: cheap for etcd) bisecting the prefix's length."""

    def span(m: int) -> tuple[bytes, bytes]:
        if m == 0:
            return start, end
        prefix = key[:m].rstrip(b"\xff")  # the keys starting with key[:m] (0xff...: to the end)
        high = prefix[:-1] + bytes([prefix[-1] + 1]) if prefix else end
        return max(start, key[:m]), min(end, high)

    shared = 0  # every key of [start, end) starts with key[:shared]; what start and end share, first
    while shared < min(len(start), len(end)) and start[shared] == end[shared]:
        shared += 1
    good, bad = min(shared, len(key)), len(key) + 1
    while bad - good > 1:
        m = (good + bad) // 2
        # ``key`` is the first key: none is below the prefix's range; are some above it?
        above = span(m)[1]
        if above >= end or await count(above, end) == 0:
            good = m
        else:
            bad = m
    return span(good)


def _between(lo: bytes, hi: bytes) -> bytes:
    """A key strictly between ``lo`` and ``hi`` (``lo < hi``), halving the interval: the keys as
    base-256 fractions, padded with zero bytes; one more byte when they are adjacent at a width."""
    width = max(len(lo), len(hi)) + 1
    while True:
        a = int.from_bytes(lo.ljust(width, b"\0"), "big")
        b = int.from_bytes(hi.ljust(width, b"\0"), "big")
        if a == b:  # hi is lo and zero bytes: the only keys between are lo and zero bytes
            return lo + b"\0"
        mid = (a + b) // 2
        if mid > a:
            return mid.to_bytes(width, "big")
        width += 1
