"""The registry store's supervision records: desired state, stopped-record index, count cap, tokens.

Part of :class:`.store.RegistryStore` (keys in :mod:`.store`'s table:
``supervised/``, ``supervised-stopped/``, ``supervised-stopped-at/``,
``supervised-tokens/``, ``process-tokens/``, ``registry-retention/``; the
retention of stopped records is in its docstring). The owner keys of the
records (which replica runs one) stay in :mod:`.store`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aetcd
import grpc
from aetcd import utils as aetcd_utils

from mabeam.runtime.etcd import EtcdClient, while_leading
from mabeam.runtime.etcd.leases import lease_unknown
from mabeam.runtime.paging import ScanStats, last_keys, scan
from mabeam.runtime.retention import ExpiryLeases
from mabeam.v1 import registry_pb2

if TYPE_CHECKING:
    from mabeam.services.registry.store import Keys

# Supervision records in these states are what a supervisor acts on (the rest are history).
SUPERVISION_ACTIVE = (
    registry_pb2.SUPERVISION_STATE_STARTING,
    registry_pb2.SUPERVISION_STATE_RUNNING,
    registry_pb2.SUPERVISION_STATE_RESTARTING,
)


# The index of stopped records sorts newest first: t = STOP_ORDER - stop time in ns.
STOP_ORDER = 2**63
# The count cap: index keys examined per pass, oldest first (one small transaction per record).
PRUNE_EXAMINED = 100


def token_hash(token: str) -> bytes:
    """What is stored for a token (the token itself never is)."""
    return hashlib.sha256(token.encode()).hexdigest().encode()


def decode_supervised(key: bytes, value: bytes) -> registry_pb2.SupervisedAgent | None:
    try:
        return registry_pb2.SupervisedAgent.FromString(value)
    except Exception:
        return None


def decode_active_supervised(key: bytes, value: bytes) -> registry_pb2.SupervisedAgent | None:
    """A record the supervisor acts on (starting, running, restarting); None (not cached) for the
    stopped and failed: a supervisor's memory and passes are bounded by the active records."""
    record = decode_supervised(key, value)
    return record if record is not None and record.state in SUPERVISION_ACTIVE else None


class SupervisedRecords:
    """Supervision records' reads and writes (a part of :class:`.store.RegistryStore`, which sets
    the attributes declared here)."""

    client: EtcdClient
    keys: Keys
    expiry: ExpiryLeases
    scans: ScanStats
    prunes: ScanStats

    async def page_supervised(
        self, after: str | None, size: int, state: int = 0
    ) -> tuple[list[registry_pb2.SupervisedAgent], str | None]:
        """Up to ``size`` supervision records by agent id after ``after`` (with ``state``: in that
        state only), and the id the next page continues after (None: last page).

        Bounded range reads (:func:`mabeam.runtime.paging.scan`), not the whole prefix.
        """

        def keep(kv: Any) -> bool:
            record = decode_supervised(kv.key, kv.value)
            return record is not None and record.state == state

        kvs, next_after = await scan(
            self.client, self.keys.supervised, after, size, keep=keep if state else None, stats=self.scans
        )
        records = [decode_supervised(kv.key, kv.value) for kv in kvs]
        return [r for r in records if r is not None], next_after

    async def get_supervised(self, agent_id: str) -> tuple[registry_pb2.SupervisedAgent | None, int]:
        """The agent's supervision record and its mod revision (None, 0 when it is not supervised)."""
        got = await self.client.get(self.keys.supervised_agent(agent_id))
        if got is None:
            return None, 0
        return registry_pb2.SupervisedAgent.FromString(got.value), int(got.mod_revision)

    async def create_supervised(
        self, record: registry_pb2.SupervisedAgent, token: str, expect_mod_revision: int
    ) -> bool:
        """Put a new supervision record and the hash of the token StartAgent returns, in one transaction.

        Applies only if the record's mod revision is still ``expect_mod_revision``
        (0 = absent), so two StartAgent calls for one id cannot both win.
        """
        c = self.client
        key = self.keys.supervised_agent(record.agent_id)
        compare = (
            c.transactions.mod(key) == expect_mod_revision
            if expect_mod_revision
            else c.transactions.create(key) == 0
        )
        unindex = []
        if expect_mod_revision:
            # A stopped record started again: off its expiry lease (a put without one) and out of the
            # index. The pointer is current: it changes only with the record, whose revision is compared.
            at = await c.get(self.keys.stopped_at(record.agent_id))
            if at is not None:
                unindex = [
                    c.transactions.delete(self.keys.stopped_entry(int(bytes(at.value)), record.agent_id)),
                    c.transactions.delete(self.keys.stopped_at(record.agent_id)),
                ]
        ok, _ = await c.transaction(
            compare=[compare],
            success=[
                c.transactions.put(key, record.SerializeToString()),
                c.transactions.put(self.keys.supervised_token(record.agent_id), token_hash(token)),
                *unindex,
            ],
            failure=[],
        )
        return bool(ok)

    async def put_supervised_if(
        self, record: registry_pb2.SupervisedAgent, mod_revision: int, *, owner: str | None = None
    ) -> bool:
        """Replace the record if it is still at ``mod_revision`` (and, with ``owner``, while that replica owns it).

        A record that is STOPPED or FAILED goes on the expiry lease (see the module's docstring).
        """
        c = self.client
        key = self.keys.supervised_agent(record.agent_id)
        compare = [c.transactions.mod(key) == mod_revision]
        if owner is not None:
            compare.append(c.transactions.value(self.keys.owner(record.agent_id)) == owner.encode())
        if record.state not in SUPERVISION_ACTIVE:
            return await self._put_stopped(record, mod_revision, compare)
        ok, _ = await c.transaction(
            compare=compare, success=[c.transactions.put(key, record.SerializeToString())], failure=[]
        )
        return bool(ok)

    async def _put_stopped(
        self, record: registry_pb2.SupervisedAgent, mod_revision: int, compare: list[Any]
    ) -> bool:
        """Write a stopped or failed record on its expiry lease, drop its token digests; one transaction.

        The transition from an active record also writes its index entry (newest first) on the same
        lease; a record already stopped keeps its lease and its entry.
        """
        c = self.client
        agent_id = record.agent_id
        key = self.keys.supervised_agent(agent_id)
        got = await c.get(key)
        if got is None or int(got.mod_revision) != mod_revision:
            return False
        before = decode_supervised(key, bytes(got.value))
        keeps = before is not None and before.state not in SUPERVISION_ACTIVE
        keeps = keeps and (bool(got.lease) or self.expiry.retention.keeps_forever)
        for attempt in range(2):
            ops = []
            if keeps:
                lease = int(got.lease) or None
            else:
                lease = await self.expiry.lease()
                order = STOP_ORDER - time.time_ns()
                ops = [
                    c.transactions.put(self.keys.stopped_entry(order, agent_id), b"", lease=lease),
                    c.transactions.put(self.keys.stopped_at(agent_id), b"%020d" % order, lease=lease),
                ]
            ops += [
                c.transactions.put(key, record.SerializeToString(), lease=lease),
                c.transactions.delete(self.keys.supervised_token(agent_id)),
                c.transactions.delete(self.keys.process_token(agent_id)),
            ]
            try:
                ok, _ = await c.transaction(compare=compare, success=ops, failure=[])
                return bool(ok)
            except Exception as exc:
                if keeps and lease_unknown(exc):
                    return False  # the record expired meanwhile: the caller reads again
                if attempt or not lease_unknown(exc):
                    raise
                self.expiry.forget()  # the bucket's lease is gone (e.g. etcd restored): take another
        return False

    async def count_stopped(self) -> int:
        """How many stopped and failed records the index holds (a count-only range: no key is sent)."""
        prefix = self.keys.stopped
        request = aetcd.rpc.RangeRequest(
            key=prefix, range_end=aetcd_utils.prefix_range_end(prefix), count_only=True
        )
        return int((await self._range(request)).count)

    async def oldest_stopped(self, limit: int) -> list[tuple[str, int]]:
        """Up to ``limit`` index entries from the oldest: (agent id, order). The oldest are at the end
        of the newest-first index: :func:`mabeam.runtime.paging.last_keys` (count-only ranges and
        one bounded ascending read; a descending range would read the whole index in etcd)."""
        prefix = self.keys.stopped
        entries = []
        for kv in reversed(
            await last_keys(self.client, prefix, None, limit, keys_only=True, stats=self.prunes)
        ):
            order, _, agent_id = bytes(kv.key)[len(prefix) :].decode().partition("/")
            if order.isdigit() and agent_id:
                entries.append((agent_id, int(order)))
        return entries

    async def _range(self, request: Any) -> Any:
        c = self.client
        await c.connect()
        assert c.kvstub is not None
        try:
            return await c.kvstub.Range(request, timeout=c.timeout, metadata=c.metadata)
        except grpc.aio.AioRpcError as exc:
            aetcd.exceptions._handle_exception(exc)
            raise

    async def delete_stopped(self, agent_id: str, order: int) -> bool:
        """Delete a stopped record and every key of it, if ``order`` is still its index entry and it is
        still stopped or failed; a stale entry alone otherwise. True when a record was deleted."""
        c = self.client
        entry = self.keys.stopped_entry(order, agent_id)
        at = await c.get(self.keys.stopped_at(agent_id))
        got = await c.get(self.keys.supervised_agent(agent_id))
        record = decode_supervised(b"", bytes(got.value)) if got is not None else None
        if (
            at is None
            or bytes(at.value) != b"%020d" % order
            or record is None
            or record.state in SUPERVISION_ACTIVE
        ):
            # Not the record's current entry (it was started again, or is gone): the entry alone goes.
            await c.delete(entry)
            return False
        assert got is not None
        ok, _ = await c.transaction(
            compare=[
                c.transactions.mod(self.keys.supervised_agent(agent_id)) == int(got.mod_revision),
                c.transactions.mod(self.keys.stopped_at(agent_id)) == int(at.mod_revision),
            ],
            success=[
                c.transactions.delete(self.keys.supervised_agent(agent_id)),
                c.transactions.delete(self.keys.stopped_at(agent_id)),
                c.transactions.delete(entry),
                c.transactions.delete(self.keys.supervised_token(agent_id)),
                c.transactions.delete(self.keys.process_token(agent_id)),
            ],
            failure=[],
        )
        return bool(ok)

    async def prune_stopped(self, max_count: int, examined: int = PRUNE_EXAMINED) -> int:
        """Delete the oldest stopped records beyond ``max_count`` (at most ``examined`` entries a call);
        how many records were deleted."""
        excess = await self.count_stopped() - max_count
        if max_count <= 0 or excess <= 0:
            return 0
        deleted = 0
        for agent_id, order in await self.oldest_stopped(min(excess, examined)):
            deleted += await self.delete_stopped(agent_id, order)
        return deleted

    async def while_leading_retention(
        self, candidate_id: str, ttl: int, work: Callable[[], Awaitable[None]], interval: float
    ) -> None:
        """Run ``work`` every ``interval`` while this replica leads the supervised count cap's election."""
        await while_leading(
            self.client,
            self.keys.retention_election,
            candidate_id,
            ttl,
            work,
            interval,
            what="supervised retention cap",
        )

    async def set_supervised_token(self, agent_id: str, token: str) -> bool:
        """Replace the hash of the StartAgent caller's token (a replayed StartAgent); False when not supervised."""
        c = self.client
        ok, _ = await c.transaction(
            compare=[c.transactions.create(self.keys.supervised_agent(agent_id)) > 0],
            success=[c.transactions.put(self.keys.supervised_token(agent_id), token_hash(token))],
            failure=[],
        )
        return bool(ok)

    async def set_process_token(self, agent_id: str, token: str) -> None:
        """Record the hash of the token a process of the agent is started with (the last one wins)."""
        await self.client.put(self.keys.process_token(agent_id), token_hash(token))
