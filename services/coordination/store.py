"""The coordination service's etcd keyspace (under the mesh prefix P).

=======================================  ==========================================================  ==========
key                                      value                                                       lease
=======================================  ==========================================================  ==========
P/sessions/<id>                          ``mabeam.v1.Session`` without rounds (summary)              R, then E
P/session-index/<t:020d>/<id>            the session's protocol name; ``t`` = 2^63 - started_at in   R, then E
                                         ns, so a range read lists sessions newest first
P/session-index-version                  ``1``: sessions stored before the index have their keys     none
                                         (:meth:`SessionStore.backfill_index`, once per mesh)
P/session-rounds/<id>/<n:06d>            round n's manifest: its chunk count (4 bytes, big endian)   R (rounds
                                         then ``mabeam.v1.Round`` without entries (a round stored    written as
                                         before chunking: the whole ``Round``, read as is)           they end),
                                                                                                     E (at the
                                                                                                     finish)
P/session-rounds/<id>/~end               empty: the session is finished (for watchers)               E
P/session-chunks/<id>/<n:06d>/<k:06d>    chunk k of round n: a serialized ``mabeam.v1.Round``        as its
                                         cut between top-level fields (its entries); the chunks      manifest
                                         concatenated in order parse as the whole round
P/session-owner/<id>                     id of the replica running the session (one whose record     the owner
                                         is written before its end); deleted when it finishes        replica's
                                         (:mod:`.orphans` ends it when the lease takes it)
P/session-running/<id>                   id of the replica that started it: the session is           none
                                         unfinished (deleted after its finish)
P/session-retention/<lease>              candidates for the count cap's pruner (election)            candidate's
P/protocols/<name>                       ``mabeam.v1.ProtocolInfo`` of a registered protocol         none
P/requests/coordination/<m>/<id>         outcome of a call by ``request_id``, on the window's        window's
                                         lease (:mod:`mabeam.runtime.idempotency`)
=======================================  ==========================================================  ==========

Leases (retention, :mod:`mabeam.runtime.retention`; ``MABEAM_SESSION_RETENTION``,
default 7 days): **E** is the *expiry lease* of the current bucket (TTL the
period plus a bucket): the transaction that finishes a session (its summary,
index key, end marker, the rounds not written yet and their chunks) binds
them to it, so etcd deletes the session at least the period after it
finished, without a scan. **R** is the *running lease* (TTL the period, a
bucket and :data:`RUNNING_EXTRA_S`), for what is written while a session
runs (its claim, the rounds of an iterative session as they end): a session
lasts at most 600 s, so those keys too are kept at least the period after
the finish; the finish puts the summary and index key again, on E. A
session that never finishes (its replica died and nobody ended it) is gone
when R runs out. With the period ``0`` nothing is bound (kept for good). A
write whose lease etcd no longer knows is written again, whole, on a new
lease (once). The cap ``MABEAM_SESSION_RETENTION_COUNT`` is enforced by one
elected replica (:meth:`SessionStore.prune_oldest`): it deletes the oldest
finished sessions, every key of each, never a running one.

Every etcd request stays within etcd's limits (``--max-txn-ops`` 128 and
``--max-request-bytes`` 1.5 MiB by default): a transaction carries at most
:data:`TXN_MAX_OPS` operations and :data:`TXN_MAX_BYTES` of keys and values; a
round's transcript is cut into chunks of at most :data:`CHUNK_BYTES` (one
entry larger than that is a chunk of its own). Chunks are written first, in as
many transactions as needed, then the manifest that counts them (with the
summary and the end marker, for a one-shot session) in one last transaction:
a reader that finds a manifest finds its chunks, and checks their number. A
write that fails after its chunks deletes them unless their manifest exists
(one transaction); a replica that dies in between leaves them under
``session-chunks/<id>/``, deleted with the session (see docs/decisions.md,
"Paging that pages"). When everything fits one transaction (a round of up to
a few thousand entries) it is one transaction, as before.

A one-shot session is written once, at its end (the outcome is durable when
the RPC answers). Iterative sessions write each round as it finishes, so
WatchSession can stream them. Lists read bounded ranges: ListSessions reads
one page of ``session-index/`` (and, with a filter the key cannot express,
successive ranges up to :data:`LIST_MAX_EXAMINED` keys per call).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.utils
import grpc
from grpc import aio

from mabeam import errors
from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient, LeaseKeeper, ResumingWatch, while_leading
from mabeam.runtime.idempotency import RequestLog
from mabeam.runtime.paging import last_keys, scan
from mabeam.runtime.retention import ExpiryLeases, Retention
from mabeam.v1 import coordination_pb2

END_MARKER = b"~end"
# Half of etcd's default --max-txn-ops (128) and two thirds of its
# --max-request-bytes (1.5 MiB), leaving room for framing and for an etcd run tighter.
TXN_MAX_OPS = 64
TXN_MAX_BYTES = 1024 * 1024
CHUNK_BYTES = 384 * 1024  # two chunks per transaction
OP_OVERHEAD = 32  # bytes a put costs beyond its key and value (framing), counted in the budget
# ListSessions: the most index keys one call reads when a filter is not in the key (a short page then).
LIST_MAX_EXAMINED = 2000
# GetSession / ListSessions FULL: the most transcript bytes one answer carries (gRPC's limit
# in the mesh is 64 MiB); a larger transcript is read round by round with WatchSession.
MAX_TRANSCRIPT_BYTES = 48 * 1024 * 1024
_CHUNK_READ = 8  # chunks per range read (at most 3 MiB)
_INVERT = 1 << 63
# The running lease outlives the expiry lease by this much: a session's deadline is at most
# 600 s (server.py) plus the least time its finish gets; a minute of slack beyond.
RUNNING_EXTRA_S = 660
# The count cap's pruner: index keys examined per tick (oldest first), sessions per transaction
# (4 operations and a compare each: 64 operations).
PRUNE_EXAMINED = 100
PRUNE_PER_TXN = 16
_RUNNING_STATES = (coordination_pb2.SESSION_STATE_UNSPECIFIED, coordination_pb2.SESSION_STATE_RUNNING)
_COUNT = struct.Struct(">I")


def _too_large() -> errors.FailedPrecondition:
    return errors.FailedPrecondition(
        f"the transcript asked for is over {MAX_TRANSCRIPT_BYTES >> 20} MiB, more than one answer "
        "carries: read it round by round with WatchSession (ListSessions: a smaller page_size), "
        "or ask for the BASIC view"
    )


def _lease_gone(exc: BaseException) -> bool:
    """Whether etcd refused a write because a lease it was bound to is gone (it answers NOT_FOUND)."""
    cause = exc.__cause__
    if isinstance(cause, grpc.RpcError) and hasattr(cause, "code"):
        return bool(cause.code() == grpc.StatusCode.NOT_FOUND)
    return "lease not found" in str(exc)


class SessionStore:
    """Reads and writes sessions and registered protocols.

    ``retention``: how long finished sessions are kept (default: 7 days, the
    default of ``MABEAM_SESSION_RETENTION``); the store binds the leases
    itself, so every caller of :meth:`create`, :meth:`put_round` and
    :meth:`finish` gets them.
    """

    def __init__(
        self,
        client: EtcdClient,
        config: MeshConfig,
        *,
        txn_max_ops: int = TXN_MAX_OPS,
        txn_max_bytes: int = TXN_MAX_BYTES,
        chunk_bytes: int = CHUNK_BYTES,
        list_max_examined: int = LIST_MAX_EXAMINED,
        retention: Retention | None = None,
    ) -> None:
        self.client = client
        self.retention = retention if retention is not None else Retention.load("session", {})
        r = self.retention
        self.expiry = ExpiryLeases(client, r)  # what a finish writes
        running = r if r.keeps_forever else Retention(r.kind, r.period_s + RUNNING_EXTRA_S, r.bucket_s)
        self.running = ExpiryLeases(client, running)  # what is written while a session runs
        self.pruner_election = config.key("session-retention")
        self.sessions = config.key("sessions") + b"/"
        self.index = config.key("session-index") + b"/"
        self.index_version = config.key("session-index-version")
        self.rounds = config.key("session-rounds") + b"/"
        self.chunks = config.key("session-chunks") + b"/"
        self.protocols = config.key("protocols") + b"/"
        self.session_owners = config.key("session-owner") + b"/"  # sessions in flight (.orphans)
        self.sessions_running = config.key("session-running") + b"/"
        self.requests = RequestLog(client, config, "coordination")  # outcomes by request_id
        self.txn_max_ops = txn_max_ops
        self.txn_max_bytes = txn_max_bytes
        self.chunk_bytes = chunk_bytes
        self.list_max_examined = list_max_examined

    def session_key(self, session_id: str) -> bytes:
        return self.sessions + session_id.encode()

    def index_key(self, session: coordination_pb2.Session) -> bytes:
        return self.index + index_position(session).encode()

    def rounds_prefix(self, session_id: str) -> bytes:
        return self.rounds + session_id.encode() + b"/"

    def round_key(self, session_id: str, number: int) -> bytes:
        return self.rounds_prefix(session_id) + f"{number:06d}".encode()

    def chunks_prefix(self, session_id: str, number: int | None = None) -> bytes:
        prefix = self.chunks + session_id.encode() + b"/"
        return prefix if number is None else prefix + f"{number:06d}/".encode()

    # -- writing -----------------------------------------------------------------------

    async def create(
        self, session: coordination_pb2.Session, *, owner: str = "", owner_lease: int = 0
    ) -> bool:
        """Claim the session id (False when it exists already).

        With ``owner`` (a replica id) the session is also marked in flight on
        that replica in the same transaction: ``session-owner/<id>`` on
        ``owner_lease`` and ``session-running/<id>`` (:mod:`.orphans`).
        """
        c = self.client
        key = self.session_key(session.session_id)
        for attempt in range(2):
            lease = await self.running.lease()
            try:
                ok, _ = await c.transaction(
                    compare=[c.transactions.create(key) == 0],
                    success=[
                        c.transactions.put(key, _summary(session).SerializeToString(), lease=lease),
                        c.transactions.put(self.index_key(session), session.protocol.encode(), lease=lease),
                        *self._in_flight_puts(session.session_id, owner, owner_lease),
                    ],
                    failure=[],
                )
            except aetcd.exceptions.ClientError as exc:
                if attempt or lease is None or not _lease_gone(exc):
                    raise
                self.running.forget()  # etcd lost the lease (e.g. restored from a backup): a new one
                continue
            return bool(ok)
        raise AssertionError("unreachable")

    async def put_round(self, session_id: str, record: coordination_pb2.Round) -> None:
        manifest, chunks = self._round_puts(session_id, record)
        await self._write_chunked(session_id, [record.number], chunks, [manifest], self.running)

    async def finish(
        self, session: coordination_pb2.Session, rounds: Sequence[coordination_pb2.Round]
    ) -> None:
        """Write the finished session: ``rounds`` not written yet, its summary, index key and end
        marker, all bound to the expiry lease (the summary and index key put again if claimed)."""
        sid = session.session_id
        final: list[tuple[bytes, bytes]] = [
            (self.session_key(sid), _summary(session).SerializeToString()),
            (self.index_key(session), session.protocol.encode()),
        ]
        chunks: list[tuple[bytes, bytes]] = []
        for record in rounds:
            manifest, puts = self._round_puts(sid, record)
            final.append(manifest)
            chunks += puts
        final.append((self.rounds_prefix(sid) + END_MARKER, b""))
        await self._write_chunked(sid, [r.number for r in rounds], chunks, final, self.expiry)

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
            _COUNT.pack(len(pieces)) + header.SerializeToString(),
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

    async def _txn_puts(self, puts: Sequence[tuple[bytes, bytes]], lease: int | None = None) -> None:
        c = self.client
        await c.transaction(
            compare=[], success=[c.transactions.put(k, v, lease=lease) for k, v in puts], failure=[]
        )

    async def _write_chunked(
        self,
        session_id: str,
        numbers: Sequence[int],
        chunks: Sequence[tuple[bytes, bytes]],
        final: Sequence[tuple[bytes, bytes]],
        leases: ExpiryLeases,
    ) -> None:
        """Write ``chunks`` then ``final`` (the manifests that point at them) within etcd's limits,
        every key on one lease of ``leases``; a lease etcd no longer knows: all of it again, once,
        on a new lease (the keys put on the lost one are gone with it)."""
        for attempt in range(2):
            lease = await leases.lease()
            try:
                await self._write_chunked_on(session_id, numbers, chunks, final, lease)
                return
            except aetcd.exceptions.ClientError as exc:
                if attempt or lease is None or not _lease_gone(exc):
                    raise
                leases.forget()

    async def _write_chunked_on(
        self,
        session_id: str,
        numbers: Sequence[int],
        chunks: Sequence[tuple[bytes, bytes]],
        final: Sequence[tuple[bytes, bytes]],
        lease: int | None,
    ) -> None:
        together = self.batches([*chunks, *final])
        if len(together) == 1:
            await self._txn_puts(together[0], lease)  # all of it in one transaction
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
            await self._txn_puts(last[0], lease)
        except BaseException as exc:
            if isinstance(exc, aetcd.exceptions.ClientError) and lease is not None and _lease_gone(exc):
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

    # -- reading -----------------------------------------------------------------------

    async def _range(
        self, start: bytes, end: bytes, limit: int = 0, *, keys_only: bool = False, revision: int = 0
    ) -> Any:
        """One etcd range read (``limit`` 0: no limit): the reply, with ``kvs``, ``more`` and the header."""
        c = self.client
        await c.connect()
        assert c.kvstub is not None
        request = aetcd.rpc.RangeRequest(
            key=start, range_end=end, limit=limit, keys_only=keys_only, revision=revision
        )
        try:
            return await c.kvstub.Range(request, timeout=c.timeout, metadata=c.metadata)
        except aio.AioRpcError as exc:
            aetcd.exceptions._handle_exception(exc)
            raise

    async def get(self, session_id: str, full: bool) -> coordination_pb2.Session | None:
        got = await self.client.get(self.session_key(session_id))
        if got is None:
            return None
        session = coordination_pb2.Session.FromString(got.value)
        if full:
            session.rounds.extend(await self.get_rounds(session_id))
        return session

    async def _manifests(self, session_id: str) -> tuple[list[tuple[int, int, bytes]], bool, int]:
        """The session's round manifests (number, chunk count, header), whether it ended, the revision."""
        prefix = self.rounds_prefix(session_id)
        reply = await self._range(prefix, aetcd.utils.prefix_range_end(prefix))
        manifests = [
            _manifest(kv.key[len(prefix) :], kv.value) for kv in reply.kvs if not kv.key.endswith(END_MARKER)
        ]
        finished = any(kv.key.endswith(END_MARKER) for kv in reply.kvs)
        return manifests, finished, int(reply.header.revision)

    async def _assemble(
        self, session_id: str, manifest: tuple[int, int, bytes], budget: list[int]
    ) -> coordination_pb2.Round:
        """A round from its manifest's chunks, read a few at a time (``budget``: bytes left)."""
        number, count, value = manifest
        if count < 0:  # stored whole, before chunking
            budget[0] -= len(value)
            if budget[0] < 0:
                raise _too_large()
            return coordination_pb2.Round.FromString(value)
        prefix = self.chunks_prefix(session_id, number)
        end = aetcd.utils.prefix_range_end(prefix)
        pieces: list[bytes] = []
        start = prefix
        while True:
            reply = await self._range(start, end, _CHUNK_READ)
            for kv in reply.kvs:
                budget[0] -= len(kv.value)
                if budget[0] < 0:
                    raise _too_large()
                pieces.append(kv.value)
            if not reply.more or not reply.kvs:
                break
            start = reply.kvs[-1].key + b"\0"
        if len(pieces) != count:
            raise errors.Internal(
                f"session {session_id}: round {number} has {len(pieces)} of its {count} transcript "
                "chunks in etcd (deleted meanwhile?)"
            )
        return coordination_pb2.Round.FromString(b"".join(pieces))

    async def get_rounds(
        self, session_id: str, budget: list[int] | None = None
    ) -> list[coordination_pb2.Round]:
        """Every round of the session, whole; FAILED_PRECONDITION past the bytes left in ``budget``
        (:data:`MAX_TRANSCRIPT_BYTES` when None; a list so that a page's sessions share one)."""
        manifests, _, _ = await self._manifests(session_id)
        budget = [MAX_TRANSCRIPT_BYTES] if budget is None else budget
        return [await self._assemble(session_id, m, budget) for m in manifests]

    async def rounds_so_far(self, session_id: str) -> tuple[list[coordination_pb2.Round], bool, int]:
        """The session's rounds written so far, whether it finished, and the revision read at."""
        manifests, finished, revision = await self._manifests(session_id)
        budget = [1 << 62]  # streamed one round per message: no bound on the whole
        rounds = [await self._assemble(session_id, m, budget) for m in manifests]
        return rounds, finished, revision

    async def follow_rounds(
        self, session_id: str, start_revision: int
    ) -> AsyncIterator[coordination_pb2.Round]:
        """The session's rounds written from ``start_revision`` on, as they come, until it finishes."""
        prefix = self.rounds_prefix(session_id)
        async for event in ResumingWatch(self.client, prefix, start_revision=start_revision):
            if event.kind != "PUT":
                continue
            if event.key.endswith(END_MARKER):
                break
            yield await self._assemble(
                session_id, _manifest(event.key[len(prefix) :], event.value), [1 << 62]
            )

    async def list_page(
        self,
        *,
        size: int,
        after: str | None,
        protocol: str = "",
        started_after_ns: int | None = None,
        started_before_ns: int | None = None,
    ) -> tuple[list[coordination_pb2.Session], str | None]:
        """One page of summaries, newest first, and where the next page starts (None: the last page).

        The time filters are the key range of ``session-index/``; the protocol
        filter is checked on each key's value. Reads ``size + 1`` keys (no
        protocol filter: one range read), or successive ranges until the page
        is full or :attr:`list_max_examined` keys were read: the page may then
        be short, and the next starts after the last key examined.
        """
        start = self.index
        if started_before_ns is not None:
            start = max(start, self.index + f"{_INVERT - started_before_ns + 1:020d}/".encode())
        if after is not None:
            start = max(start, self.index + after.encode() + b"\0")
        end = aetcd.utils.prefix_range_end(self.index)
        if started_after_ns is not None:
            end = min(end, self.index + f"{_INVERT - started_after_ns + 1:020d}/".encode())
        found: list[bytes] = []  # index keys of the page, and one more if there is a next page
        examined = 0
        last: bytes | None = None
        exhausted = False
        while len(found) <= size and start < end:
            want = size + 1 - len(found)
            if protocol:
                want = min(max(want, 100), self.list_max_examined - examined)
                if want <= 0:
                    break
            reply = await self._range(start, end, want)
            examined += len(reply.kvs)
            for kv in reply.kvs:
                last = kv.key
                if not protocol or kv.value == protocol.encode():
                    found.append(kv.key)
                    if len(found) > size:
                        break
            if not reply.more:
                exhausted = True
                break
            if not reply.kvs:
                exhausted = True
                break
            start = reply.kvs[-1].key + b"\0"
        page = found[:size]
        if len(found) > size:
            following: str | None = page[-1][len(self.index) :].decode()
        elif exhausted or last is None:
            following = None
        else:
            following = last[len(self.index) :].decode()  # a short page: the cap was reached
        summaries = await self._summaries([key.rsplit(b"/", 1)[1].decode() for key in page])
        return summaries, following

    async def backfill_index(self) -> int:
        """Give sessions stored before ``session-index/`` existed their index keys.

        Once per mesh (``session-index-version``); pages through ``sessions/``
        in ranges of 500; each key is created only where missing, so replicas
        running it at once agree. Returns how many sessions it looked at.
        """
        c = self.client
        if await c.get(self.index_version) is not None:
            return 0
        seen = 0
        start, end = self.sessions, aetcd.utils.prefix_range_end(self.sessions)
        while True:
            reply = await self._range(start, end, 500)
            for kv in reply.kvs:
                seen += 1
                session = coordination_pb2.Session.FromString(kv.value)
                key = self.index_key(session)
                await c.transaction(
                    compare=[c.transactions.create(key) == 0],
                    success=[c.transactions.put(key, session.protocol.encode())],
                    failure=[],
                )
            if not reply.more or not reply.kvs:
                break
            start = reply.kvs[-1].key + b"\0"
        await c.put(self.index_version, b"1")
        return seen

    async def _summaries(self, session_ids: Sequence[str]) -> list[coordination_pb2.Session]:
        """The summaries of ``session_ids``, in order (one transaction per :attr:`txn_max_ops`)."""
        c = self.client
        out: list[coordination_pb2.Session] = []
        for at in range(0, len(session_ids), self.txn_max_ops):
            ids = session_ids[at : at + self.txn_max_ops]
            _, responses = await c.transaction(
                compare=[], success=[c.transactions.get(self.session_key(i)) for i in ids], failure=[]
            )
            out += [coordination_pb2.Session.FromString(r[0][0]) for r in responses if r]
        return out

    # -- the count cap -----------------------------------------------------------------

    async def count_indexed(self, start: bytes | None = None, end: bytes | None = None) -> int:
        """How many keys ``session-index/`` holds (finished and running sessions), or its keys in
        ``[start, end)``: one count-only range (etcd counts in its in-memory index; no key is sent)."""
        c = self.client
        await c.connect()
        assert c.kvstub is not None
        request = aetcd.rpc.RangeRequest(
            key=start or self.index,
            range_end=end or aetcd.utils.prefix_range_end(self.index),
            count_only=True,
        )
        try:
            reply = await c.kvstub.Range(request, timeout=c.timeout, metadata=c.metadata)
        except aio.AioRpcError as exc:
            aetcd.exceptions._handle_exception(exc)
            raise
        return int(reply.count)

    async def _read_keys(self, start: bytes, end: bytes, limit: int) -> list[Any]:
        return list((await self._range(start, end, limit, keys_only=True)).kvs)

    async def prune_oldest(self, keep: int, examine: int = PRUNE_EXAMINED) -> int:
        """Delete the oldest finished sessions beyond ``keep``; returns how many it deleted.

        One count-only range of ``session-index/`` (finished and running
        sessions), then its oldest keys, at most ``examine`` of them, from the
        end of the index (:func:`mabeam.runtime.paging.last_keys`: count-only
        ranges and one bounded read, no sorted range). Each one's record is read: a finished session
        (a terminal state) is deleted whole (record, index key, the
        ``session-rounds/<id>/`` and ``session-chunks/<id>/`` prefixes), a few
        per transaction, each guarded by its record's revision; a running one
        is never deleted and is not counted against the cap (an index key
        without a record, left half-deleted, goes too). So the newest ``keep``
        sessions stay, and running sessions older than those besides; the
        rest goes over as many calls as it takes.
        """
        c = self.client
        excess = await self.count_indexed() - keep
        deleted = examined = 0
        before = aetcd.utils.prefix_range_end(self.index)
        while excess > 0 and examined < examine:
            tail = await last_keys(
                c,
                self.index,
                before,
                min(excess, examine - examined),
                count=self.count_indexed,
                read=self._read_keys,
            )
            keys = [bytes(kv.key) for kv in reversed(tail)]  # the oldest first
            if not keys:
                break
            examined += len(keys)
            before = keys[-1]
            doomed: list[tuple[str, bytes, int]] = []  # (session id, index key, record mod revision)
            for at in range(0, len(keys), self.txn_max_ops):
                part = keys[at : at + self.txn_max_ops]
                ids = [k.rsplit(b"/", 1)[1].decode() for k in part]
                _, responses = await c.transaction(
                    compare=[], success=[c.transactions.get(self.session_key(i)) for i in ids], failure=[]
                )
                for sid, key, got in zip(ids, part, responses, strict=True):
                    if not got:
                        doomed.append((sid, key, 0))  # no record: a leftover index key
                        continue
                    value, meta = got[0]
                    if coordination_pb2.Session.FromString(value).state in _RUNNING_STATES:
                        excess -= 1  # kept, and not counted against the cap
                        continue
                    doomed.append((sid, key, int(meta.mod_revision)))
            doomed = doomed[: max(excess, 0)]
            for at in range(0, len(doomed), PRUNE_PER_TXN):
                deleted += await self._delete_sessions(doomed[at : at + PRUNE_PER_TXN])
            excess -= len(doomed)
        return deleted

    async def _delete_sessions(self, doomed: Sequence[tuple[str, bytes, int]]) -> int:
        """Delete these sessions whole, in one transaction guarded by each record's revision (0: the
        record must not exist); when a guard fails (a record changed meanwhile), one at a time."""
        c = self.client
        t = c.transactions

        def compare(sid: str, revision: int) -> Any:
            key = self.session_key(sid)
            return t.mod(key) == revision if revision else t.create(key) == 0

        def deletes(sid: str, index_key: bytes) -> list[Any]:
            rounds, chunks = self.rounds_prefix(sid), self.chunks_prefix(sid)
            return [
                t.delete(self.session_key(sid)),
                t.delete(index_key),
                t.delete(rounds, aetcd.utils.prefix_range_end(rounds)),
                t.delete(chunks, aetcd.utils.prefix_range_end(chunks)),
            ]

        ok, _ = await c.transaction(
            compare=[compare(sid, rev) for sid, _, rev in doomed],
            success=[op for sid, key, _ in doomed for op in deletes(sid, key)],
            failure=[],
        )
        if ok:
            return len(doomed)
        if len(doomed) == 1:
            return 0
        return sum([await self._delete_sessions([one]) for one in doomed])

    async def while_leading_pruner(
        self, candidate_id: str, ttl: int, work: Callable[[], Awaitable[object]], interval: float
    ) -> None:
        """Run ``work`` every ``interval`` while this replica leads the count cap's election."""
        await while_leading(
            self.client, self.pruner_election, candidate_id, ttl, work, interval, what="session retention"
        )

    async def put_protocol(self, info: coordination_pb2.ProtocolInfo, replace: bool) -> bool:
        c = self.client
        key = self.protocols + info.name.encode()
        compare = [] if replace else [c.transactions.create(key) == 0]
        ok, _ = await c.transaction(
            compare=compare, success=[c.transactions.put(key, info.SerializeToString())], failure=[]
        )
        return bool(ok)

    async def delete_protocol(self, name: str) -> bool:
        return bool(await self.client.delete(self.protocols + name.encode()))

    # -- sessions in flight: owner and running keys (what :mod:`.orphans` follows) ------

    def owner_key(self, session_id: str) -> bytes:
        return self.session_owners + session_id.encode()

    def running_key(self, session_id: str) -> bytes:
        return self.sessions_running + session_id.encode()

    def _in_flight_puts(self, session_id: str, owner: str, owner_lease: int) -> list[Any]:
        if not owner:
            return []
        c = self.client
        return [
            c.transactions.put(self.owner_key(session_id), owner.encode(), lease=owner_lease),
            c.transactions.put(self.running_key(session_id), owner.encode()),
        ]

    def owner_lease_keeper(self, ttl: int) -> LeaseKeeper:
        """A lease for this replica's ``session-owner/`` keys, kept alive while it runs (started by its owner)."""
        return LeaseKeeper(self.client, ttl)

    async def drop_in_flight(self, session_id: str, owner: str) -> None:
        """The session finished: delete its running key, and its owner key if ``owner`` holds it."""
        c = self.client
        running = c.transactions.delete(self.running_key(session_id))
        await c.transaction(
            compare=[c.transactions.value(self.owner_key(session_id)) == owner.encode()],
            success=[running, c.transactions.delete(self.owner_key(session_id))],
            failure=[running],
        )

    async def claim_orphan(self, session_id: str, owner: str, owner_lease: int) -> str | None:
        """Take the owner key of a session still marked running whose owner key is gone.

        One transaction, so that one replica at most wins; the key is put on
        ``owner_lease`` (a claimant that dies leaves it to the next). Returns
        the replica the running key names (the one that ran it); None when the
        session is not marked running any more or another replica holds it.
        """
        c = self.client
        running, owned = self.running_key(session_id), self.owner_key(session_id)
        ok, replies = await c.transaction(
            compare=[c.transactions.create(running) > 0, c.transactions.create(owned) == 0],
            success=[
                c.transactions.put(owned, owner.encode(), lease=owner_lease),
                c.transactions.get(running),
            ],
            failure=[],
        )
        if not ok:
            return None
        got = replies[1] if len(replies) > 1 else []
        return bytes(got[0][0]).decode() if got else ""

    async def round_count(self, session_id: str) -> int:
        """How many round manifests the session has (one keys-only range read)."""
        prefix = self.rounds_prefix(session_id)
        reply = await self._range(prefix, aetcd.utils.prefix_range_end(prefix), keys_only=True)
        return sum(1 for kv in reply.kvs if not kv.key.endswith(END_MARKER))

    async def page_running(self, after: str | None, size: int) -> tuple[list[str], str | None]:
        """Up to ``size`` ids of sessions marked running, after the id ``after``, and the id the
        next page starts after (None: the last page). One bounded range read."""
        kvs, following = await scan(self.client, self.sessions_running, after, size)
        return [bytes(kv.key[len(self.sessions_running) :]).decode() for kv in kvs], following

    async def current_revision(self) -> int:
        """etcd's revision now (a watch from the next one misses nothing written later)."""
        end = aetcd.utils.prefix_range_end(self.sessions_running)
        return int((await self._range(self.sessions_running, end, 1, keys_only=True)).header.revision)

    async def owner_deletes(self, start_revision: int) -> AsyncIterator[str]:
        """Ids of sessions whose owner key is deleted from ``start_revision`` on, as it happens
        (a session finished, or its replica's lease ran out). Raises WatchCompacted when that
        revision was compacted away (read ``session-running/`` again)."""
        prefix = self.session_owners
        async with ResumingWatch(self.client, prefix, start_revision=start_revision) as watch:
            async for event in watch:
                if event.kind == "DELETE":
                    yield event.key[len(prefix) :].decode()


def _summary(session: coordination_pb2.Session) -> coordination_pb2.Session:
    """The session without its rounds (they have keys of their own)."""
    if not session.rounds:
        return session  # the engine keeps rounds beside the proto until the end: no copy
    summary = coordination_pb2.Session()
    summary.CopyFrom(session)
    del summary.rounds[:]
    return summary


def index_position(session: coordination_pb2.Session) -> str:
    """The session's place in ``session-index/``: newest first, then by id."""
    return f"{_INVERT - session.started_at.ToNanoseconds():020d}/{session.session_id}"


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


def _manifest(suffix: bytes, value: bytes) -> tuple[int, int, bytes]:
    """A round manifest's number (from its key), chunk count and header.

    A round stored before chunking is the whole ``Round`` under this key: its
    first byte is the tag of ``number`` (0x08), never the 0 a count starts
    with; it reads as chunk count -1 and the value as the round itself.
    """
    if value[:1] != b"\0":
        return int(suffix), -1, value
    return int(suffix), _COUNT.unpack_from(value)[0], value[_COUNT.size :]


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.exception()


def decode_protocol(key: bytes, value: bytes) -> coordination_pb2.ProtocolInfo | None:
    try:
        return coordination_pb2.ProtocolInfo.FromString(value)
    except Exception:
        return None
