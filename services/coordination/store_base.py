"""The coordination store's shared part: the session keys' builders and one range read.

The key table is :mod:`.store`'s docstring. :class:`SessionKeys` is the base
of :class:`.store.SessionStore` and of its parts in modules of their own
(:mod:`.store_pruning`: the count cap; :mod:`.store_in_flight`: the
sessions in flight, what :mod:`.orphans` follows); the store sets the
attributes it declares.
"""

from __future__ import annotations

import struct
from typing import Any

from mabeam.runtime.etcd import EtcdClient
from mabeam.runtime.paging import range_reply

END_MARKER = b"~end"  # P/session-rounds/<id>/~end: the session is finished
CHUNK_COUNT = struct.Struct(">I")  # a round manifest's first bytes: how many chunks it has


class SessionKeys:
    """Key builders of the session keyspace, and the range read its stores share."""

    client: EtcdClient
    sessions: bytes
    index: bytes
    rounds: bytes
    chunks: bytes
    session_owners: bytes
    sessions_running: bytes
    pruner_election: bytes
    txn_max_ops: int
    txn_max_bytes: int
    chunk_bytes: int

    def session_key(self, session_id: str) -> bytes:
        return self.sessions + session_id.encode()

    def rounds_prefix(self, session_id: str) -> bytes:
        return self.rounds + session_id.encode() + b"/"

    def round_key(self, session_id: str, number: int) -> bytes:
        return self.rounds_prefix(session_id) + f"{number:06d}".encode()

    def owner_key(self, session_id: str) -> bytes:
        return self.session_owners + session_id.encode()

    def chunks_prefix(self, session_id: str, number: int | None = None) -> bytes:
        prefix = self.chunks + session_id.encode() + b"/"
        return prefix if number is None else prefix + f"{number:06d}/".encode()

    async def _range(
        self, start: bytes, end: bytes, limit: int = 0, *, keys_only: bool = False, revision: int = 0
    ) -> Any:
        """One etcd range read (``limit`` 0: no limit): the reply, with ``kvs``, ``more`` and the header."""
        return await range_reply(self.client, start, end, limit, keys_only=keys_only, revision=revision)
