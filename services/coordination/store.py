"""The coordination service's etcd keyspace (under the mesh prefix P).

=================================  ==============================================
key                                value
=================================  ==============================================
P/sessions/<id>                    ``mabeam.v1.Session`` without rounds (summary)
P/session-rounds/<id>/<n:06d>      ``mabeam.v1.Round`` n of the session
P/session-rounds/<id>/~end         empty: the session is finished (for watchers)
P/protocols/<name>                 ``mabeam.v1.ProtocolInfo`` of a registered protocol
P/requests/coordination/<m>/<id>   outcome of a call by ``request_id``, on the window's
                                   lease (:mod:`mabeam.runtime.idempotency`)
=================================  ==============================================

A one-shot session is written once, at its end, in one transaction (summary,
its round and the end marker): the outcome is durable when the RPC answers.
Iterative sessions write each round as it finishes, so WatchSession can
stream them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient, ResumingWatch, snapshot
from mabeam.runtime.idempotency import RequestLog
from mabeam.v1 import coordination_pb2

END_MARKER = b"~end"


class SessionStore:
    """Reads and writes sessions and registered protocols."""

    def __init__(self, client: EtcdClient, config: MeshConfig) -> None:
        self.client = client
        self.sessions = config.key("sessions") + b"/"
        self.rounds = config.key("session-rounds") + b"/"
        self.protocols = config.key("protocols") + b"/"
        self.requests = RequestLog(client, config, "coordination")  # outcomes by request_id

    def session_key(self, session_id: str) -> bytes:
        return self.sessions + session_id.encode()

    def rounds_prefix(self, session_id: str) -> bytes:
        return self.rounds + session_id.encode() + b"/"

    def round_key(self, session_id: str, number: int) -> bytes:
        return self.rounds_prefix(session_id) + f"{number:06d}".encode()

    async def create(self, session: coordination_pb2.Session) -> bool:
        """Claim the session id (False when it exists already)."""
        c = self.client
        key = self.session_key(session.session_id)
        ok, _ = await c.transaction(
            compare=[c.transactions.create(key) == 0],
            success=[c.transactions.put(key, _summary(session).SerializeToString())],
            failure=[],
        )
        return bool(ok)

    async def put_round(self, session_id: str, record: coordination_pb2.Round) -> None:
        await self.client.put(self.round_key(session_id, record.number), record.SerializeToString())

    async def finish(
        self, session: coordination_pb2.Session, rounds: Sequence[coordination_pb2.Round]
    ) -> None:
        c = self.client
        ops = [
            c.transactions.put(self.session_key(session.session_id), _summary(session).SerializeToString())
        ]
        ops += [
            c.transactions.put(self.round_key(session.session_id, r.number), r.SerializeToString())
            for r in rounds
        ]
        ops.append(c.transactions.put(self.rounds_prefix(session.session_id) + END_MARKER, b""))
        await c.transaction(compare=[], success=ops, failure=[])

    async def get(self, session_id: str, full: bool) -> coordination_pb2.Session | None:
        got = await self.client.get(self.session_key(session_id))
        if got is None:
            return None
        session = coordination_pb2.Session.FromString(got.value)
        if full:
            session.rounds.extend(await self.get_rounds(session_id))
        return session

    async def get_rounds(self, session_id: str) -> list[coordination_pb2.Round]:
        kvs, _ = await snapshot(self.client, self.rounds_prefix(session_id))
        return [coordination_pb2.Round.FromString(kv.value) for kv in kvs if not kv.key.endswith(END_MARKER)]

    async def rounds_so_far(self, session_id: str) -> tuple[list[coordination_pb2.Round], bool, int]:
        """The session's rounds written so far, whether it finished, and the revision read at."""
        kvs, revision = await snapshot(self.client, self.rounds_prefix(session_id))
        rounds = [
            coordination_pb2.Round.FromString(kv.value) for kv in kvs if not kv.key.endswith(END_MARKER)
        ]
        return rounds, any(kv.key.endswith(END_MARKER) for kv in kvs), revision

    async def follow_rounds(
        self, session_id: str, start_revision: int
    ) -> AsyncIterator[coordination_pb2.Round]:
        """The session's rounds written from ``start_revision`` on, as they come, until it finishes."""
        async for event in ResumingWatch(
            self.client, self.rounds_prefix(session_id), start_revision=start_revision
        ):
            if event.kind != "PUT":
                continue
            if event.key.endswith(END_MARKER):
                break
            yield coordination_pb2.Round.FromString(event.value)

    async def list_summaries(self) -> list[coordination_pb2.Session]:
        kvs, _ = await snapshot(self.client, self.sessions)
        return [coordination_pb2.Session.FromString(kv.value) for kv in kvs]

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


def decode_protocol(key: bytes, value: bytes) -> coordination_pb2.ProtocolInfo | None:
    try:
        return coordination_pb2.ProtocolInfo.FromString(value)
    except Exception:
        return None
