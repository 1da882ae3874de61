"""The coordination store's sessions in flight: owner and running keys (what :mod:`.orphans` follows).

Part of :class:`.store.SessionStore` (keys in :mod:`.store`'s table:
``session-owner/``, ``session-running/``). A session being run has an owner
key on its replica's lease and a running key without one; a running key whose
owner key is gone is an orphan, which one replica claims and ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aetcd.utils

from mabeam.runtime.etcd import LeaseKeeper, ResumingWatch
from mabeam.runtime.paging import scan
from mabeam.services.coordination.store_base import END_MARKER, SessionKeys


class SessionsInFlight(SessionKeys):
    """Owner and running keys of the sessions being run (a part of :class:`.store.SessionStore`)."""

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
