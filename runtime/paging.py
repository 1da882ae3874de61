"""Paging that pages: one bounded etcd range read per page, not the whole prefix.

The stores (only they call etcd) list their keys with :func:`scan`: a range
read from the key after the page token's to the prefix's range end, sorted by
key, with ``limit = page_size + 1`` (the extra key says whether a next page
exists). A filter that cannot be pushed into the key range (``keep``) is
applied to successive bounded ranges until the page is full or
:data:`MAX_EXAMINED` keys were examined; the page may then be short, and its
token resumes after the last key examined (AIP-158 allows short pages). See
``docs/decisions.md``, "Paging that pages".

Page tokens are :func:`mabeam.runtime.validate.encode_page_token` of the key's
suffix under the prefix, bound to the request's filter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aetcd
import aetcd.utils as aetcd_utils
from grpc import aio

from mabeam.runtime.etcd import EtcdClient

MAX_EXAMINED = 5000  # keys one filtered list call reads at most before answering a short page


@dataclass
class ScanStats:
    """What the range reads of one store cost (for tests and the curious): calls and keys returned."""

    ranges: int = 0
    keys: int = 0
    largest: int = 0  # the most keys one range read returned
    limits: list[int] = field(default_factory=list)  # the last few limits asked

    def count(self, limit: int, returned: int) -> None:
        self.ranges += 1
        self.keys += returned
        self.largest = max(self.largest, returned)
        self.limits = [*self.limits[-15:], limit]


async def read_range(
    client: EtcdClient,
    start: bytes,
    end: bytes,
    limit: int,
    *,
    serializable: bool = False,
    stats: ScanStats | None = None,
) -> tuple[list[Any], bool]:
    """At most ``limit`` key-values in ``[start, end)`` by key, and whether more keys follow."""
    await client.connect()
    assert client.kvstub is not None
    request = aetcd.rpc.RangeRequest(key=start, range_end=end, limit=limit, serializable=serializable)
    try:
        reply = await client.kvstub.Range(request, timeout=client.timeout, metadata=client.metadata)
    except aio.AioRpcError as exc:
        aetcd.exceptions._handle_exception(exc)
        raise
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
