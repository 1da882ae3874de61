"""The orchestrator's etcd keyspace (under the mesh prefix P).

========================  ==============================================  =================
key                       value                                           lease
========================  ==============================================  =================
P/vars/<name>             ``mabeam.v1.Variable`` (value, timestamps,      the variable's
                          writer, deciding session; version and           (ephemeral ones)
                          revision come from etcd itself)
P/var-types/<name>        the value's type name (for compare-and-set)     the variable's
P/bindings/<name>         ``mabeam.v1.OrchestrationBinding``              none
P/orchestrator-leader/    election of the replica running adaptation      each candidate's
P/requests/orchestrator/  outcomes of calls by ``request_id``             the window's
                          (:class:`mabeam.runtime.idempotency.RequestLog`)
========================  ==============================================  =================

Compare-and-set is on the etcd version of the key (1 after the first write),
so a read, a decision and a write race safely: the write is a transaction
that checks the version the decision was based on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aetcd.exceptions

from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient, ResumingWatch, snapshot, while_leading
from mabeam.runtime.etcd.leases import LeaseNotFound as LeaseNotFound  # re-exported: writers catch it
from mabeam.runtime.etcd.leases import raise_if_lease_unknown
from mabeam.runtime.idempotency import RequestLog, TxnOps
from mabeam.runtime.paging import ScanStats, scan
from mabeam.v1 import orchestrator_pb2


def variable_from_kv(kv: Any) -> orchestrator_pb2.Variable:
    """A stored variable with the facts etcd keeps about its key filled in."""
    var = orchestrator_pb2.Variable.FromString(kv.value)
    var.version = int(kv.version)
    var.mod_revision = int(kv.mod_revision)
    var.lease_id = int(kv.lease)
    return var


class VariableStore:
    """Reads, transactions and watches on variables and bindings, and the adaptation election."""

    def __init__(self, client: EtcdClient, config: MeshConfig) -> None:
        self.client = client
        self.vars = config.key("vars") + b"/"
        self.bindings = config.key("bindings") + b"/"
        self.types = config.key("var-types") + b"/"
        self.leader = config.key("orchestrator-leader")
        # Calls' outcomes by request_id; compare-and-set and delete record theirs in their own transaction.
        self.requests = RequestLog(client, config, "orchestrator")
        self.scans = ScanStats()  # what the list calls' range reads cost (tests read it)

    def key(self, name: str) -> bytes:
        return self.vars + name.encode()

    def binding_key(self, name: str) -> bytes:
        return self.bindings + name.encode()

    async def get(self, name: str, *, relaxed: bool = False) -> orchestrator_pb2.Variable | None:
        got = await self.client.get(self.key(name), serializable=relaxed)
        return variable_from_kv(got) if got is not None else None

    def type_key(self, name: str) -> bytes:
        """Beside each variable, its value's type, so compare-and-set checks it in the same transaction."""
        return self.types + name.encode()

    async def _put_if(
        self,
        name: str,
        var: orchestrator_pb2.Variable,
        compare: list[Any],
        lease: int = 0,
        record: TxnOps | None = None,
    ) -> tuple[bool, orchestrator_pb2.Variable | None]:
        """Put ``var`` (and its type) if every compare holds; returns (applied, the variable as stored now).

        ``record``: the call's outcome, written in the same transaction (and compared: not yet recorded).
        """
        record = record or TxnOps()
        c = self.client
        key = self.key(name)
        stored = orchestrator_pb2.Variable()
        stored.CopyFrom(var)
        stored.version = stored.mod_revision = stored.lease_id = 0
        kind = (var.value.WhichOneof("kind") or "").encode()
        try:
            ok, responses = await c.transaction(
                compare=[*compare, *record.compare],
                success=[
                    c.transactions.put(key, stored.SerializeToString(), lease=lease or None),
                    c.transactions.put(self.type_key(name), kind, lease=lease or None),
                    *record.success,
                    c.transactions.get(key),
                ],
                failure=[c.transactions.get(key)],
            )
        except aetcd.exceptions.ClientError as exc:
            raise_if_lease_unknown(exc, lease)
            raise
        ranged = responses[-1] if responses else []
        current = variable_from_kv(ranged[0][1]) if ranged else None
        return bool(ok), current

    async def _delete_if(self, name: str, compare: list[Any], record: TxnOps | None = None) -> bool:
        """Delete the variable and its type if every compare holds (and record the call's outcome)."""
        c = self.client
        record = record or TxnOps()
        ok, _ = await c.transaction(
            compare=[*compare, *record.compare],
            success=[
                c.transactions.delete(self.key(name)),
                c.transactions.delete(self.type_key(name)),
                *record.success,
            ],
            failure=[],
        )
        return bool(ok)

    async def put(
        self, name: str, var: orchestrator_pb2.Variable, lease: int = 0
    ) -> tuple[bool, orchestrator_pb2.Variable | None]:
        """Put ``var`` whatever is stored; returns (applied, the variable as stored now)."""
        return await self._put_if(name, var, [], lease)

    async def put_if_version(
        self,
        name: str,
        var: orchestrator_pb2.Variable,
        expected: int,
        lease: int = 0,
        *,
        same_type: bool = True,
        record: TxnOps | None = None,
    ) -> tuple[bool, orchestrator_pb2.Variable | None]:
        """Put ``var`` if the variable is at version ``expected`` (0 = absent) and, with
        ``same_type``, when it exists, holds a value of ``var``'s type: in one transaction."""
        c = self.client
        compare = [c.transactions.version(self.key(name)) == expected]
        if same_type and expected > 0:
            kind = (var.value.WhichOneof("kind") or "").encode()
            compare.append(c.transactions.value(self.type_key(name)) == kind)
        return await self._put_if(name, var, compare, lease, record)

    async def put_if_unchanged(
        self,
        name: str,
        var: orchestrator_pb2.Variable,
        current: orchestrator_pb2.Variable | None,
        lease: int = 0,
    ) -> tuple[bool, orchestrator_pb2.Variable | None]:
        """Put ``var`` if the variable is still ``current`` as read (None = still absent)."""
        c = self.client
        key = self.key(name)
        compare = (
            [c.transactions.create(key) == 0]
            if current is None
            else [c.transactions.mod(key) == current.mod_revision]
        )
        return await self._put_if(name, var, compare, lease)

    async def delete(
        self, name: str, expected_version: int | None = None, record: TxnOps | None = None
    ) -> bool:
        """Delete the variable if it exists (and is at ``expected_version``, when given);
        ``record``: the call's outcome, in the same transaction."""
        c = self.client
        key = self.key(name)
        compare = [c.transactions.create(key) > 0]
        if expected_version is not None:
            compare = [c.transactions.version(key) == expected_version, *compare]
        return await self._delete_if(name, compare, record)

    async def page_variables(
        self, prefix: str, after: str | None, size: int, *, relaxed: bool = False
    ) -> tuple[list[orchestrator_pb2.Variable], str | None]:
        """Up to ``size`` variables whose name starts with ``prefix``, by name, after the name
        ``after``; and the name the next page continues after (None: last page). One range read
        of ``size + 1`` keys (the prefix is the key range), not the whole prefix."""
        kvs, next_after = await scan(
            self.client, self.vars, after, size, narrow=prefix, serializable=relaxed, stats=self.scans
        )
        return [variable_from_kv(kv) for kv in kvs], next_after

    async def watch(
        self, prefix: str, after_revision: int = 0
    ) -> AsyncIterator[tuple[str, orchestrator_pb2.Variable, int]]:
        """(``"PUT"`` or ``"DELETE"``, variable, revision) for each change of the variables
        under ``prefix`` after ``after_revision`` (0 = from now on).

        A variable deleted has only its name. Raises WatchCompacted when
        ``after_revision`` was compacted.
        """
        key = self.key(prefix)
        start = after_revision + 1 if after_revision else None
        if start is None:
            _, revision = await snapshot(self.client, key + b"\x00")  # the current revision, cheaply
            start = revision + 1
        async for event in ResumingWatch(self.client, key, start_revision=start):
            name = event.key[len(self.vars) :].decode()
            if event.kind == "PUT":
                var = orchestrator_pb2.Variable.FromString(event.value)
                var.version, var.mod_revision, var.lease_id = event.version, event.mod_revision, event.lease
                yield "PUT", var, event.mod_revision
            else:
                yield "DELETE", orchestrator_pb2.Variable(name=name), event.mod_revision

    async def put_binding(self, binding: orchestrator_pb2.OrchestrationBinding) -> None:
        await self.client.put(self.binding_key(binding.variable), binding.SerializeToString())

    async def delete_binding(self, name: str) -> bool:
        """Remove the variable's binding (False when it had none)."""
        return bool(await self.client.delete(self.binding_key(name)))

    async def get_binding(self, name: str) -> orchestrator_pb2.OrchestrationBinding | None:
        got = await self.client.get(self.binding_key(name))
        return orchestrator_pb2.OrchestrationBinding.FromString(got.value) if got is not None else None

    async def get_binding_entry(self, name: str) -> tuple[orchestrator_pb2.OrchestrationBinding, int] | None:
        """The variable's binding and its key's mod revision (what :meth:`put_decided` compares)."""
        got = await self.client.get(self.binding_key(name))
        if got is None:
            return None
        return orchestrator_pb2.OrchestrationBinding.FromString(got.value), int(got.mod_revision)

    async def put_decided(
        self,
        var: orchestrator_pb2.Variable,
        expected: int,
        binding: orchestrator_pb2.OrchestrationBinding,
        binding_revision: int,
    ) -> tuple[bool, orchestrator_pb2.Variable | None, int]:
        """Write a decided value and its binding (``last_coordinated_at``) in one transaction.

        Applied only if the variable is at version ``expected`` (0 = absent) and
        the binding's key is still at ``binding_revision`` (not removed, not
        rebound meanwhile): a binding deleted while its protocol ran stays deleted.
        Returns (applied, the variable as stored now, the binding's mod
        revision now: 0 when it is gone).
        """
        c = self.client
        key, bkey = self.key(var.name), self.binding_key(binding.variable)
        stored = orchestrator_pb2.Variable()
        stored.CopyFrom(var)
        stored.version = stored.mod_revision = stored.lease_id = 0
        kind = (var.value.WhichOneof("kind") or "").encode()
        ok, responses = await c.transaction(
            compare=[c.transactions.version(key) == expected, c.transactions.mod(bkey) == binding_revision],
            success=[
                c.transactions.put(key, stored.SerializeToString()),
                c.transactions.put(self.type_key(var.name), kind),
                c.transactions.put(bkey, binding.SerializeToString()),
                c.transactions.get(key),
                c.transactions.get(bkey),
            ],
            failure=[c.transactions.get(key), c.transactions.get(bkey)],
        )
        ranged_var, ranged_binding = (responses[-2], responses[-1]) if len(responses) >= 2 else ([], [])
        current = variable_from_kv(ranged_var[0][1]) if ranged_var else None
        revision = int(ranged_binding[0][1].mod_revision) if ranged_binding else 0
        return bool(ok), current, revision

    async def page_bindings(
        self, after: str | None, size: int
    ) -> tuple[list[orchestrator_pb2.OrchestrationBinding], str | None]:
        """Up to ``size`` bindings by variable after the variable ``after``, and where the next
        page continues (None: last page). One range read of ``size + 1`` keys."""
        kvs, next_after = await scan(self.client, self.bindings, after, size, stats=self.scans)
        return [orchestrator_pb2.OrchestrationBinding.FromString(kv.value) for kv in kvs], next_after

    async def list_bindings(self) -> list[orchestrator_pb2.OrchestrationBinding]:
        """Every binding, in key order (strong read)."""
        kvs, _ = await snapshot(self.client, self.bindings)
        return [orchestrator_pb2.OrchestrationBinding.FromString(kv.value) for kv in kvs]

    async def while_leading_adaptation(
        self, candidate_id: str, ttl: int, work: Callable[[], Awaitable[None]], interval: float
    ) -> None:
        """Run ``work`` every ``interval`` while this replica leads the adaptation election."""
        await while_leading(
            self.client, self.leader, candidate_id, ttl, work, interval, what="orchestrator adaptation loop"
        )
