"""The coordination store's transcript writes: a round cut into chunks, written within etcd's limits.

Part of :class:`.store.SessionStore` (keys in :mod:`.store`'s table:
``session-rounds/``, ``session-chunks/``; the limits and the order of the
writes are in its docstring). A round's serialized transcript is cut between
its top-level fields into chunks of at most :data:`CHUNK_BYTES`
(:func:`split_round`); the chunks go first, in as many transactions as
needed, then the manifest that counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import aetcd
import aetcd.exceptions
import aetcd.utils

from mabeam import errors
from mabeam.runtime.etcd.leases import lease_unknown
from mabeam.runtime.retention import ExpiryLeases
from mabeam.services.coordination.store_base import CHUNK_COUNT, SessionKeys
from mabeam.v1 import coordination_pb2

# Two fit one of etcd's 4 KiB pages. bbolt never splits a node of fewer than four items, so
# a node holds at least two, and a node larger than a page takes a run of contiguous pages;
# freed runs of many sizes no longer fit new ones and the database file creeps while the data
# in use is flat (the soak: 1.091 with 384 KiB chunks, 1.071 with 32 KiB; bench/README.md).
# Values this small always take one page, which any freed page can hold.
CHUNK_BYTES = 1536
OP_OVERHEAD = 32  # bytes a put costs beyond its key and value (framing), counted in the budget


class SessionChunks(SessionKeys):
    """Chunked, limit-bounded writes of rounds (a part of :class:`.store.SessionStore`)."""

    def _round_puts(
        self, session_id: str, record: coordination_pb2.Round
    ) -> tuple[tuple[bytes, bytes], list[tuple[bytes, bytes]]]:
        """The round's manifest and its chunks, as (key, value) puts."""
        pieces = split_round(record.SerializeToString(), self.chunk_bytes)
        header = coordination_pb2.Round(number=record.number)
        header.state.CopyFrom(record.state)
        header.started_at.CopyFrom(record.started_at)
        header.finished_at.CopyFrom(record.finished_at)
        manifest = (
            self.round_key(session_id, record.number),
            CHUNK_COUNT.pack(len(pieces)) + header.SerializeToString(),
        )
        prefix = self.chunks_prefix(session_id, record.number)
        return manifest, [(prefix + f"{k:06d}".encode(), piece) for k, piece in enumerate(pieces)]

    def batches(self, puts: Sequence[tuple[bytes, bytes]]) -> list[list[tuple[bytes, bytes]]]:
        """``puts`` in order, cut into transactions within :attr:`txn_max_ops` and :attr:`txn_max_bytes`."""
        out: list[list[tuple[bytes, bytes]]] = []
        size = 0
        for put in puts:
            cost = len(put[0]) + len(put[1]) + OP_OVERHEAD
            if not out or len(out[-1]) >= self.txn_max_ops or (out[-1] and size + cost > self.txn_max_bytes):
                out.append([])
                size = 0
            out[-1].append(put)
            size += cost
        return out

    async def _txn_puts(
        self, puts: Sequence[tuple[bytes, bytes]], lease: int | None = None, guard: Sequence[Any] = ()
    ) -> bool:
        """Put ``puts`` in one transaction, if every comparison of ``guard`` holds (False if not)."""
        c = self.client
        ok, _ = await c.transaction(
            compare=list(guard), success=[c.transactions.put(k, v, lease=lease) for k, v in puts], failure=[]
        )
        return bool(ok)

    async def _write_chunked(
        self,
        session_id: str,
        numbers: Sequence[int],
        chunks: Sequence[tuple[bytes, bytes]],
        final: Sequence[tuple[bytes, bytes]],
        leases: ExpiryLeases,
        owner: str | None = None,
    ) -> None:
        """Write ``chunks`` then ``final`` (the manifests that point at them) within etcd's limits,
        every key on one lease of ``leases``; a lease etcd no longer knows: all of it again, once,
        on a new lease (the keys put on the lost one are gone with it).

        With ``owner``, ``final`` is written only while the session's owner key names ``owner``:
        a replica whose session was ended by another (its lease lapsed) overwrites nothing and
        gets ABORTED."""
        guard = []
        if owner is not None:
            c = self.client
            guard = [c.transactions.value(self.owner_key(session_id)) == owner.encode()]
        for attempt in range(2):
            lease = await leases.lease()
            try:
                await self._write_chunked_on(session_id, numbers, chunks, final, lease, guard)
                return
            except aetcd.exceptions.ClientError as exc:
                if attempt or lease is None or not lease_unknown(exc):
                    raise
                leases.forget()

    async def _write_chunked_on(
        self,
        session_id: str,
        numbers: Sequence[int],
        chunks: Sequence[tuple[bytes, bytes]],
        final: Sequence[tuple[bytes, bytes]],
        lease: int | None,
        guard: Sequence[Any] = (),
    ) -> None:
        together = self.batches([*chunks, *final])
        if len(together) == 1:
            if not await self._txn_puts(together[0], lease, guard):  # all of it in one transaction
                raise _taken_over(session_id)
            return
        last = self.batches(final)
        if len(last) != 1:
            raise errors.ResourceExhausted(
                f"session {session_id}: its record ({sum(len(k) + len(v) for k, v in final)} bytes, "
                f"{len(final)} keys) does not fit one etcd transaction"
            )
        try:
            for batch in self.batches(chunks):
                await self._txn_puts(batch, lease)
            if not await self._txn_puts(last[0], lease, guard):
                raise _taken_over(session_id)
        except BaseException as exc:
            if isinstance(exc, aetcd.exceptions.ClientError) and lease is not None and lease_unknown(exc):
                raise  # written again whole on a new lease: no cleanup racing that write
            # Unreferenced chunks are deleted, unless their manifest was written after all.
            cleanup = asyncio.ensure_future(self._drop_orphans(session_id, numbers))
            cleanup.add_done_callback(_retrieved)
            raise

    async def _drop_orphans(self, session_id: str, numbers: Sequence[int]) -> None:
        c = self.client
        for number in numbers:
            prefix = self.chunks_prefix(session_id, number)
            await c.transaction(
                compare=[c.transactions.create(self.round_key(session_id, number)) == 0],
                success=[c.transactions.delete(prefix, aetcd.utils.prefix_range_end(prefix))],
                failure=[],
            )


def _taken_over(session_id: str) -> errors.MabeamError:
    return errors.Aborted(
        f"session {session_id} was ended by another coordination replica (this one's lease lapsed "
        "while it ran): its outcome is not recorded",
        metadata={"session_id": session_id},
    )


def split_round(data: bytes, budget: int) -> list[bytes]:
    """A serialized message cut between its top-level fields into pieces of at most ``budget`` bytes.

    A field larger than ``budget`` (one huge entry) is a piece of its own.
    The pieces concatenated are ``data``: parsed, the whole message.
    """
    if len(data) <= budget:
        return [data]
    pieces: list[bytes] = []
    begin = at = 0
    n = len(data)
    while at < n:
        field_start = at
        tag, at = _varint(data, at)
        wire = tag & 7
        if wire == 0:
            _, at = _varint(data, at)
        elif wire == 2:
            length, at = _varint(data, at)
            at += length
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        else:
            raise ValueError(f"unexpected wire type {wire}")
        if at - begin > budget and field_start > begin:
            pieces.append(data[begin:field_start])
            begin = field_start
    pieces.append(data[begin:])
    return pieces


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.exception()
