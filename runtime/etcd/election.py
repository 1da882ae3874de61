"""Leadership and exclusive ownership of keys, bound to leases.

Some loops must run on one replica only (the registry's health prober, the
orchestrator's adaptation loop), and some objects must have one owner (an
agent's supervisor). Both hang on a lease, so a dead holder lets go within
its TTL:

* :class:`Election` and :func:`while_leading`: leadership by lease + lowest
  create revision (etcd's concurrency/election recipe), with a transaction
  guard so a deposed leader that does not know it yet cannot write.
* :func:`try_acquire` and :func:`release`: exclusive ownership of a key bound
  to a lease, one transaction each.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import aetcd.rpc
import aetcd.transactions

from mabeam.runtime.etcd.client import ClientClosedError, EtcdClient, log
from mabeam.runtime.etcd.leases import LeaseKeeper
from mabeam.runtime.etcd.watch import ResumingWatch, WatchCompacted, snapshot


class _LeaseCompare(aetcd.transactions.BaseCompare):
    # aetcd lacks the LEASE compare target (etcd >= 3.3).
    def build_compare(self, compare: Any) -> None:
        compare.target = aetcd.rpc.Compare.LEASE
        compare.lease = int(self.value)


async def try_acquire(client: EtcdClient, key: bytes, owner: str, lease_id: int) -> bool:
    """Take ``key`` for ``owner`` if nobody holds it; True when ``owner`` holds it now.

    The key is created with ``owner`` as value, bound to ``lease_id``, so it
    is released when the holder's lease goes. Asking again with the same
    owner and lease is True (idempotent). One transaction.

    Example::

        if await try_acquire(client, b"/mabeam/owners/agent-7", replica_id, keeper.lease_id):
            ...  # supervise agent-7
    """
    t = client.transactions
    ok, replies = await client.transaction(
        compare=[t.create(key) == 0],
        success=[t.put(key, owner.encode(), lease=lease_id)],
        failure=[t.get(key)],
    )
    if ok:
        return True
    current = replies[0] if replies else []
    if not current:
        return False  # deleted between the compare and the read: someone else's turn anyway
    _, kv = current[0]
    return bool(kv.value == owner.encode() and int(kv.lease) == lease_id)


async def release(client: EtcdClient, key: bytes, owner: str, lease_id: int | None = None) -> bool:
    """Delete ``key`` if ``owner`` holds it (and, given ``lease_id``, on that lease); True when deleted."""
    t = client.transactions
    compare: list[Any] = [t.value(key) == owner.encode()]
    if lease_id is not None:
        compare.append(_LeaseCompare(key) == lease_id)
    ok, _ = await client.transaction(compare=compare, success=[t.delete(key)], failure=[])
    return bool(ok)


class ElectionLost(RuntimeError):
    """The candidacy ended before or while leading: the lease or the candidate key is gone."""


class Election:
    """Leader election by lease + create revision (etcd's concurrency/election recipe).

    Each candidate puts ``<name>/<lease id hex>`` -> ``candidate_id`` bound to
    its own lease; the key with the lowest create revision leads; the others
    each wait for the deletion of the key just before theirs, so a departure
    wakes one candidate, not all. Leadership ends with :meth:`resign`, or is
    lost when the lease is lost or the key deleted: then :attr:`is_leader`
    turns False and :attr:`lost` is set. Writes made on behalf of the leader
    carry :meth:`leader_txn_guard` in their transaction, so a deposed leader
    that does not know it yet cannot write.

    After a resignation or a loss, :meth:`campaign` may be called again: it
    stands with a new lease.

    Example::

        election = Election(client, b"/mabeam/orchestrator/leader", "replica-1", ttl=5)
        await election.campaign()                     # returns once leading
        ok, _ = await client.transaction(
            compare=[election.leader_txn_guard()], success=[client.transactions.put(k, v)], failure=[]
        )
        await election.resign()
    """

    def __init__(self, client: EtcdClient, name: bytes, candidate_id: str, ttl: int) -> None:
        self._client = client
        self.name = name.rstrip(b"/") + b"/"
        self.candidate_id = candidate_id
        self.ttl = ttl
        self.key = b""
        self.create_revision = 0
        self.is_leader = False
        self.lost = asyncio.Event()
        self._keeper: LeaseKeeper | None = None
        self._monitor: asyncio.Task[None] | None = None

    @property
    def lease_id(self) -> int:
        """The candidacy's lease (0 when not standing)."""
        return self._keeper.lease_id if self._keeper is not None else 0

    async def campaign(self) -> None:
        """Stand for election and return once this candidate leads.

        Raises :class:`ElectionLost` if the lease or the candidate key goes
        while waiting. Cancelling it withdraws the candidacy.
        """
        if self.is_leader:
            return
        try:
            if self._keeper is None or self._keeper.lost.is_set():
                await self._withdraw()
                await self._stand()
            keeper = self._keeper
            assert keeper is not None
            while True:
                if keeper.lost.is_set():
                    raise ElectionLost(f"election {self.name!r}: lease lost while campaigning")
                kvs, revision = await snapshot(self._client, self.name)
                if not any(kv.key == self.key for kv in kvs):
                    raise ElectionLost(f"election {self.name!r}: candidate key {self.key!r} vanished")
                earlier = [kv for kv in kvs if kv.create_revision < self.create_revision]
                if not earlier:
                    break
                predecessor = max(earlier, key=lambda kv: kv.create_revision).key
                with contextlib.suppress(WatchCompacted):  # then look again
                    await self._first_of(self._deleted(predecessor, revision + 1), keeper.lost.wait())
        except ElectionLost:
            await self.resign()
            raise
        except BaseException:
            # Cancelled or etcd unreachable: do not leave a candidacy nobody follows.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(self.resign())
            raise
        self.is_leader = True
        self.lost.clear()
        self._monitor = asyncio.create_task(
            self._watch_leadership(revision + 1), name=f"election-{self.candidate_id}"
        )

    async def _stand(self) -> None:
        self.lost.clear()
        keeper = LeaseKeeper(self._client, self.ttl)
        self._keeper = keeper
        lease_id = await keeper.start()
        self.key = self.name + f"{lease_id:x}".encode()
        t = self._client.transactions
        ok, replies = await self._client.transaction(
            compare=[t.create(self.key) == 0],
            success=[t.put(self.key, self.candidate_id.encode(), lease=lease_id)],
            failure=[t.get(self.key)],
        )
        if ok:
            self.create_revision = int(replies[0].response_put.header.revision)
        else:  # a key on our own fresh lease: only a retried request can have made it
            self.create_revision = int(replies[0][0][1].create_revision)

    async def _deleted(self, key: bytes, start_revision: int) -> None:
        async with ResumingWatch(self._client, key, start_revision, single_key=True) as watch:
            async for event in watch:
                if event.kind == "DELETE":
                    return

    @staticmethod
    async def _first_of(*waits: Any) -> None:
        tasks = [asyncio.ensure_future(w) for w in waits]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _watch_leadership(self, start_revision: int) -> None:
        keeper = self._keeper
        assert keeper is not None
        try:
            await self._first_of(self._deleted(self.key, start_revision), keeper.lost.wait())
        except (WatchCompacted, ClientClosedError):
            pass  # cannot follow the key any more: count leadership as lost, the safe side
        log.warning("election %r: %s lost leadership", self.name, self.candidate_id)
        self.is_leader = False
        self._monitor = None
        self.lost.set()
        if not keeper.lost.is_set():
            # The key went but the lease lives: the candidacy is over, free the lease.
            # (A lost lease is left to its keeper, which revokes it once etcd answers.)
            await keeper.revoke()

    def leader_txn_guard(self) -> Any:
        """The transaction compare that holds only while this candidate still leads.

        ``create_revision(own key) == the revision it was created at``: it
        fails once the key is gone (lease lost, resigned), even if the same
        lease id were somehow reused.
        """
        if not self.key:
            raise RuntimeError("not a candidate: campaign() first")
        return self._client.transactions.create(self.key) == self.create_revision

    def guard(self) -> Any:
        """Same as :meth:`leader_txn_guard`."""
        return self.leader_txn_guard()

    async def leader(self) -> str | None:
        """The candidate id of the current leader, read from etcd (None when nobody stands)."""
        kvs, _ = await snapshot(self._client, self.name)
        if not kvs:
            return None
        return bytes(min(kvs, key=lambda kv: kv.create_revision).value).decode()

    async def resign(self) -> None:
        """Give up leadership or candidacy at once (the key is deleted); safe to call twice.

        Sets :attr:`lost`. Does not fail when etcd is unreachable: the lease
        then expires within its TTL and the next candidate takes over.
        """
        self.is_leader = False
        monitor, self._monitor = self._monitor, None
        if monitor is not None and monitor is not asyncio.current_task():
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await monitor
        await self._withdraw()
        self.lost.set()

    async def _withdraw(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            await keeper.revoke()

    async def __aenter__(self) -> Election:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.resign()


async def while_leading(
    client: EtcdClient,
    name: bytes,
    candidate_id: str,
    ttl: int,
    work: Callable[[], Awaitable[object]],
    interval: float,
    what: str = "",
) -> None:
    """Forever: win the election ``name``, then run ``work`` every ``interval`` s while leading.

    When the lead is lost (the lease lapsed, etcd was unreachable too long)
    the loop stops working at once and campaigns again; a failing ``work`` is
    logged and retried on the next tick. Cancelling it resigns. This is how a
    service runs the loops only one replica may run (the registry's health
    prober, the orchestrator's adaptation loop).
    """
    # Not a stamina retry: a lost lead campaigns again at once; only a failure waits, one tick.
    while True:
        election = Election(client, name, candidate_id, ttl)
        try:
            await election.campaign()
            log.info("%s: %s leads", what or name.decode(), candidate_id)
            while not election.lost.is_set():
                try:
                    await work()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("%s: %s", what or name.decode(), exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(election.lost.wait(), interval)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(election.resign())
            raise
        except Exception as exc:
            log.info("%s: %s; campaigning again", what or name.decode(), exc)
            with contextlib.suppress(Exception):
                await election.resign()
            await asyncio.sleep(interval)
