"""No orphaned sessions: a session whose coordination replica died is ended by another one.

A session whose record is written before its end (every iterative one —
English, Dutch, tatonnement, a plugin — and one given an explicit id) is
marked in flight when its record is claimed, in the same transaction
(:meth:`.store.SessionStore.create`):

==========================  ==================================================  =====================
key                         value                                               lease
==========================  ==================================================  =====================
P/session-owner/<id>        id of the replica running it                        that replica's
                                                                                (:attr:`Orphans.keeper`)
P/session-running/<id>      id of the replica that started it                   none
==========================  ==================================================  =====================

The session deletes both after its outcome is written (:meth:`.engine.Session.finish`).
When its replica dies, etcd deletes the owner key with the replica's lease
(``MABEAM_SERVICE_TTL``, default 5 s), and the running key
stays: that pair is an orphan.

Every replica watches ``session-owner/`` for deletions (no election: each
deletion costs each replica one transaction, and the first to answer ends
the session, with no leader to wait for after a kill). On a deletion whose
session is still marked running, the replica takes the owner key on its own
lease with a create-only transaction that also checks the running key
(:meth:`.store.SessionStore.claim_orphan`): one replica wins; if it dies
while ending it, its lease frees the key and the next one tries. The winner
reads the record: a session that finished meanwhile (its replica died after
the outcome, before deleting its keys) is left as it is; otherwise the
session is written ``SESSION_STATE_ABANDONED`` — the proto's state for "the
coordinator running it died; the transcript ends where it stopped" — with
the reason naming the replica, through the store's ``finish`` (so the end
marker is written, WatchSession streams end, and retention applies). Then
its in-flight keys are deleted. A deadline that passed meanwhile changes
nothing: the session is ended the same way. A deletion is told once, so an
attempt that fails (etcd out of reach) is tried again, 0.2 s doubling to 5 s,
until it is done or another replica holds the session.

At start, and when the watch's revision was compacted away (events lost),
the replica pages through ``session-running/`` (:data:`PAGE` ids a range
read) and claims every session there: the claim fails where an owner key
exists, so only orphans are ended (the whole-cluster restart path).

A replica that loses its lease while alive (etcd unreachable for a TTL)
stops writing its sessions: their next round or their outcome answers
ABORTED (:meth:`.engine.Session.check_owned`); another replica ends them.
A window remains between the lease running out in etcd and the replica
noticing it (at most a third of the TTL, the keeper's refresh period): an
outcome written then overwrites the ABANDONED record (the watchers saw the
end already). See docs/decisions.md, "No orphaned sessions".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mabeam import telemetry
from mabeam.runtime.etcd import LeaseKeeper, WatchCompacted
from mabeam.services.coordination.store import SessionStore
from mabeam.v1 import coordination_pb2

log = logging.getLogger("mabeam.coordination.orphans")

PAGE = 200  # session-running/ ids per range read when sweeping
CONCURRENCY = 16  # orphans ended at once (a replica with many sessions dies: many at once)
RUNNING = coordination_pb2.SESSION_STATE_RUNNING


def reason_for(replica: str) -> str:
    """What an ended orphan's outcome says."""
    who = repr(replica) if replica else "(unknown)"
    return (
        f"coordination replica {who} stopped while the session ran (its etcd lease ran out); "
        "the session was ended by another replica; the transcript ends where it stopped"
    )


class Orphans:
    """This replica's lease for its sessions' owner keys, and the watch that ends other replicas' orphans."""

    def __init__(self, store: SessionStore, replica_id: str, ttl: int) -> None:
        self.store = store
        self.replica_id = replica_id
        self.ttl = ttl
        self.keeper: LeaseKeeper | None = None
        self.ended = 0  # sessions this replica ended (tests read it)
        self._task: asyncio.Task[None] | None = None
        self._ending: dict[str, asyncio.Task[None]] = {}
        self._gate = asyncio.Semaphore(CONCURRENCY)
        self._renewing = asyncio.Lock()

    async def start(self) -> None:
        self.keeper = self.store.owner_lease_keeper(self.ttl)
        await self.keeper.start()
        self._task = asyncio.create_task(self._follow(), name="coordination:orphans")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._ending.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.keeper is not None:
            with contextlib.suppress(Exception):
                await self.keeper.revoke()

    async def current_keeper(self) -> LeaseKeeper:
        """The lease new sessions' owner keys go on (a new one when the last was lost)."""
        assert self.keeper is not None, "Orphans.start() first"
        if not self.keeper.lost.is_set():
            return self.keeper
        async with self._renewing:  # sessions starting at once take one new lease, not one each
            if self.keeper.lost.is_set():
                log.warning("coordination replica %s lost its etcd lease; taking a new one", self.replica_id)
                old = self.keeper
                keeper = self.store.owner_lease_keeper(self.ttl)
                await keeper.start()
                self.keeper = keeper
                with contextlib.suppress(Exception):
                    await old.stop()
            return self.keeper

    # -- following deletions -------------------------------------------------------

    async def _follow(self) -> None:
        """Sweep ``session-running/``, then follow owner-key deletions; again after a compaction."""
        while True:
            try:
                revision = await self.store.current_revision()
                await self.sweep()
                async for session_id in self.store.owner_deletes(revision + 1):
                    self._end_soon(session_id)
            except asyncio.CancelledError:
                raise
            except WatchCompacted:
                log.info("session-owner/ watch compacted: reading session-running/ again")
            except Exception as exc:
                log.warning("following orphaned sessions failed (%s); again in 1 s", exc)
                await asyncio.sleep(1.0)

    async def sweep(self) -> int:
        """Claim every session marked running without an owner; returns how many ids were read."""
        after: str | None = None
        seen = 0
        while True:
            ids, after = await self.store.page_running(after, PAGE)
            seen += len(ids)
            for session_id in ids:
                self._end_soon(session_id)
            if after is None:
                return seen

    def _end_soon(self, session_id: str) -> None:
        if session_id in self._ending:
            return
        task = asyncio.create_task(self._end(session_id), name=f"coordination:orphan:{session_id}")
        self._ending[session_id] = task
        task.add_done_callback(lambda _: self._ending.pop(session_id, None))

    async def _end(self, session_id: str) -> None:
        """Claim ``session_id`` and end it, tried again (0.2 s doubling to 5 s) until done: an
        owner key's deletion is told once, so an etcd error must not leave the orphan running."""
        wait = 0.2
        claim: tuple[LeaseKeeper, str] | None = None  # the lease our claim is on, the replica it ran on
        while True:
            async with self._gate:
                try:
                    if claim is None or claim[0].lost.is_set():
                        keeper = await self.current_keeper()
                        ran_on = await self.store.claim_orphan(session_id, self.replica_id, keeper.lease_id)
                        if ran_on is None:
                            return  # finished (its keys are gone), or another replica holds it
                        claim = (keeper, ran_on)
                    await self.abandon(session_id, claim[1])
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning(
                        "ending orphaned session %s failed (%s); again in %.1f s", session_id, exc, wait
                    )
            await asyncio.sleep(wait)
            wait = min(wait * 2, 5.0)

    async def abandon(self, session_id: str, ran_on: str) -> bool:
        """End a session this replica claimed (its owner key is ours): ABANDONED unless it finished
        meanwhile; then its in-flight keys go. True when it was ended here."""
        session = await self.store.get(session_id, full=False)
        if session is None or session.state != RUNNING:
            # Finished before its keys were deleted (or its record expired): only the keys are left.
            await self.store.drop_in_flight(session_id, self.replica_id)
            return False
        replica = session.coordinator_id or ran_on
        session.state = coordination_pb2.SESSION_STATE_ABANDONED
        session.outcome.CopyFrom(coordination_pb2.Outcome(decided=False, reason=reason_for(replica)))
        session.round_count = await self.store.round_count(session_id)
        session.finished_at.GetCurrentTime()
        await self.store.finish(session, [], owner=self.replica_id)  # the owner key is ours now
        await self.store.drop_in_flight(session_id, self.replica_id)
        self.ended += 1
        telemetry.instruments().sessions.add(
            1, {"protocol": session.protocol, "state": coordination_pb2.SessionState.Name(session.state)}
        )
        log.warning(
            "session %s (%s) ended ABANDONED: replica %s stopped while it ran",
            session_id,
            session.protocol,
            replica,
        )
        return True
