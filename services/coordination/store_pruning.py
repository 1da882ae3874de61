"""The coordination store's count cap (``MABEAM_SESSION_RETENTION_COUNT``): the oldest finished
sessions beyond it are deleted, every key of each, by one elected replica.

Part of :class:`.store.SessionStore` (keys in :mod:`.store`'s table:
``session-index/``, ``session-retention/``). The oldest are found at the end
of the newest-first index by :func:`mabeam.runtime.paging.last_keys`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aetcd.utils

from mabeam.runtime.etcd import while_leading
from mabeam.runtime.paging import count_range, last_keys
from mabeam.services.coordination.store_base import SessionKeys
from mabeam.v1 import coordination_pb2

# Index keys examined per tick (oldest first), sessions per transaction (4 operations and a
# compare each: 64 operations).
PRUNE_EXAMINED = 100
PRUNE_PER_TXN = 16
_RUNNING_STATES = (coordination_pb2.SESSION_STATE_UNSPECIFIED, coordination_pb2.SESSION_STATE_RUNNING)


class SessionPruning(SessionKeys):
    """The count cap's reads and deletions (a part of :class:`.store.SessionStore`)."""

    async def count_indexed(self, start: bytes | None = None, end: bytes | None = None) -> int:
        """How many keys ``session-index/`` holds (finished and running sessions), or its keys in
        ``[start, end)``: one count-only range (etcd counts in its in-memory index; no key is sent)."""
        return await count_range(
            self.client, start or self.index, end or aetcd.utils.prefix_range_end(self.index)
        )

    async def _read_keys(self, start: bytes, end: bytes, limit: int) -> list[Any]:
        return list((await self._range(start, end, limit, keys_only=True)).kvs)

    async def prune_oldest(self, keep: int, examine: int = PRUNE_EXAMINED) -> int:
        """Delete the oldest finished sessions beyond ``keep``; returns how many it deleted.

        One count-only range of ``session-index/`` (finished and running
        sessions), then its oldest keys, at most ``examine`` of them, from the
        end of the index (:func:`mabeam.runtime.paging.last_keys`: count-only
        ranges and one bounded read, no sorted range). Each one's record is
        read: a finished session (a terminal state) is deleted whole (record, index key, the
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
