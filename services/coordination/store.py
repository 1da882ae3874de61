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
round's transcript is cut into chunks of at most :data:`.store_chunks.CHUNK_BYTES` (one
entry larger than that is a chunk of its own). Chunks are written first, in as
many transactions as needed, then the manifest that counts them (with the
summary and the end marker, for a one-shot session) in one last transaction:
a reader that finds a manifest finds its chunks, and checks their number. A
write that fails after its chunks deletes them unless their manifest exists
(one transaction); a replica that dies in between leaves them under
``session-chunks/<id>/``, deleted with the session (see docs/decisions.md,
"Paging that pages"). When everything fits one transaction (a round of up to
~800 entries: 64 chunks) it is one transaction, as before.

A one-shot session is written once, at its end (the outcome is durable when
the RPC answers). Iterative sessions write each round as it finishes, so
WatchSession can stream them. Lists read bounded ranges: ListSessions reads
one page of ``session-index/`` (and, with a filter the key cannot express,
successive ranges up to :data:`LIST_MAX_EXAMINED` keys per call).

:class:`SessionStore` is one class in parts, each a module of its own:
:mod:`.store_base` (key builders, the range read), :mod:`.store_chunks`
(chunked writes of rounds), :mod:`.store_pruning` (the count cap),
:mod:`.store_in_flight` (owner and running keys) and this one (creating,
finishing, reading and listing sessions; protocols).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.utils

from mabeam import errors
from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient, ResumingWatch
from mabeam.runtime.etcd.leases import lease_unknown
from mabeam.runtime.idempotency import RequestLog
from mabeam.runtime.retention import ExpiryLeases, Retention
from mabeam.services.coordination.store_base import CHUNK_COUNT, END_MARKER, SessionKeys
from mabeam.services.coordination.store_chunks import CHUNK_BYTES, SessionChunks, split_round
from mabeam.services.coordination.store_in_flight import SessionsInFlight
from mabeam.services.coordination.store_pruning import PRUNE_EXAMINED, SessionPruning
from mabeam.v1 import coordination_pb2

__all__ = [
    "CHUNK_BYTES",
    "END_MARKER",
    "PRUNE_EXAMINED",
    "SessionKeys",
    "SessionStore",
    "decode_protocol",
    "split_round",
]

# Half of etcd's default --max-txn-ops (128) and two thirds of its
# --max-request-bytes (1.5 MiB), leaving room for framing and for an etcd run tighter.
TXN_MAX_OPS = 64
TXN_MAX_BYTES = 1024 * 1024
# ListSessions: the most index keys one call reads when a filter is not in the key (a short page then).
LIST_MAX_EXAMINED = 2000
# Summaries a participant filter reads per ListSessions call (a summary names every
# participant: a 10,000-agent auction's is ~100 KB).
PARTICIPANT_MAX_EXAMINED = 200
# GetSession / ListSessions FULL: the most transcript bytes one answer carries (gRPC's limit
# in the mesh is 64 MiB); a larger transcript is read round by round with WatchSession.
MAX_TRANSCRIPT_BYTES = 48 * 1024 * 1024
_CHUNK_READ = 512  # chunks per range read (at most 768 KiB)
_INVERT = 1 << 63
# The running lease outlives the expiry lease by this much: a session's deadline is at most
# 600 s (server.py) plus the least time its finish gets; a minute of slack beyond.
RUNNING_EXTRA_S = 660


def _too_large() -> errors.FailedPrecondition:
    return errors.FailedPrecondition(
        f"the transcript asked for is over {MAX_TRANSCRIPT_BYTES >> 20} MiB, more than one answer "
        "carries: read it round by round with WatchSession (ListSessions: a smaller page_size), "
        "or ask for the BASIC view"
    )


class SessionStore(SessionChunks, SessionPruning, SessionsInFlight):
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
        participant_max_examined: int = PARTICIPANT_MAX_EXAMINED,
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
        self.participant_max_examined = participant_max_examined

    def index_key(self, session: coordination_pb2.Session) -> bytes:
        return self.index + index_position(session).encode()

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
                if attempt or lease is None or not lease_unknown(exc):
                    raise
                self.running.forget()  # etcd lost the lease (e.g. restored from a backup): a new one
                continue
            return bool(ok)
        raise AssertionError("unreachable")

    async def put_round(self, session_id: str, record: coordination_pb2.Round) -> None:
        manifest, chunks = self._round_puts(session_id, record)
        await self._write_chunked(session_id, [record.number], chunks, [manifest], self.running)

    async def finish(
        self,
        session: coordination_pb2.Session,
        rounds: Sequence[coordination_pb2.Round],
        *,
        owner: str | None = None,
    ) -> None:
        """Write the finished session: ``rounds`` not written yet, its summary, index key and end
        marker, all bound to the expiry lease (the summary and index key put again if claimed).

        ``owner``: a session marked in flight is written only while its owner key names this
        replica; else ABORTED (another replica ended it when this one's lease lapsed)."""
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
        await self._write_chunked(sid, [r.number for r in rounds], chunks, final, self.expiry, owner)

    # -- reading -----------------------------------------------------------------------

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
        participant: str = "",
    ) -> tuple[list[coordination_pb2.Session], str | None]:
        """One page of summaries, newest first, and where the next page starts (None: the last page).

        The time filters are the key range of ``session-index/``; the protocol
        filter is checked on each key's value. Reads ``size + 1`` keys (no
        protocol filter: one range read), or successive ranges until the page
        is full or :attr:`list_max_examined` keys were read: the page may then
        be short, and the next starts after the last key examined. The
        participant filter (an agent invited or excluded) is checked on the
        summaries themselves: at most :attr:`participant_max_examined` of them
        are read per call, with the same short-page rule.
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
        read: dict[str, coordination_pb2.Session] = {}  # summaries read for the participant filter
        last: bytes | None = None
        exhausted = False
        while len(found) <= size and start < end:
            want = size + 1 - len(found)
            if protocol or participant:
                budget = self.list_max_examined - examined
                if participant:
                    budget = min(budget, self.participant_max_examined - len(read))
                want = min(max(want, 100), budget)
                if want <= 0:
                    break
            reply = await self._range(start, end, want)
            examined += len(reply.kvs)
            if participant:
                ids = [
                    _session_of(kv.key) for kv in reply.kvs if not protocol or kv.value == protocol.encode()
                ]
                read.update((s.session_id, s) for s in await self._summaries(ids))
            for kv in reply.kvs:
                last = kv.key
                if protocol and kv.value != protocol.encode():
                    continue
                if participant and not _took_part(read.get(_session_of(kv.key)), participant):
                    continue
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
        ids = [_session_of(key) for key in page]
        if participant:
            return [read[i] for i in ids], following
        return await self._summaries(ids), following

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


def _manifest(suffix: bytes, value: bytes) -> tuple[int, int, bytes]:
    """A round manifest's number (from its key), chunk count and header.

    A round stored before chunking is the whole ``Round`` under this key: its
    first byte is the tag of ``number`` (0x08), never the 0 a count starts
    with; it reads as chunk count -1 and the value as the round itself.
    """
    if value[:1] != b"\0":
        return int(suffix), -1, value
    return int(suffix), CHUNK_COUNT.unpack_from(value)[0], value[CHUNK_COUNT.size :]


def decode_protocol(key: bytes, value: bytes) -> coordination_pb2.ProtocolInfo | None:
    try:
        return coordination_pb2.ProtocolInfo.FromString(value)
    except Exception:
        return None


def _session_of(index_key: bytes) -> str:
    """The session id an index key ends with."""
    return bytes(index_key).rsplit(b"/", 1)[1].decode()


def _took_part(session: coordination_pb2.Session | None, agent_id: str) -> bool:
    """Whether ``agent_id`` was invited to ``session`` (a participant, or excluded from it)."""
    if session is None:  # expired between the index read and the summary's
        return False
    return agent_id in session.participants or any(e.agent_id == agent_id for e in session.excluded)
