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
========================  ==============================================  =================

Compare-and-set is on the etcd version of the key (1 after the first write),
so a read, a decision and a write race safely: the write is a transaction
that checks the version the decision was based on.
"""

from __future__ import annotations

from typing import Any

from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient
from mabeam.v1 import orchestrator_pb2


def variable_from_kv(kv: Any) -> orchestrator_pb2.Variable:
    """A stored variable with the facts etcd keeps about its key filled in."""
    var = orchestrator_pb2.Variable.FromString(kv.value)
    var.version = int(kv.version)
    var.mod_revision = int(kv.mod_revision)
    var.lease_id = int(kv.lease)
    return var


class VariableStore:
    """Reads and transactions on variables and bindings."""

    def __init__(self, client: EtcdClient, config: MeshConfig) -> None:
        self.client = client
        self.vars = config.key("vars") + b"/"
        self.bindings = config.key("bindings") + b"/"
        self.types = config.key("var-types") + b"/"
        self.leader = config.key("orchestrator-leader")

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

    async def put_if(
        self, name: str, var: orchestrator_pb2.Variable, compare: list[Any], lease: int = 0
    ) -> tuple[bool, orchestrator_pb2.Variable | None]:
        """Put ``var`` (and its type) if every compare holds; returns (applied, the variable as stored now)."""
        c = self.client
        key = self.key(name)
        stored = orchestrator_pb2.Variable()
        stored.CopyFrom(var)
        stored.version = stored.mod_revision = stored.lease_id = 0
        kind = (var.value.WhichOneof("kind") or "").encode()
        ok, responses = await c.transaction(
            compare=compare,
            success=[
                c.transactions.put(key, stored.SerializeToString(), lease=lease or None),
                c.transactions.put(self.type_key(name), kind, lease=lease or None),
                c.transactions.get(key),
            ],
            failure=[c.transactions.get(key)],
        )
        ranged = responses[-1] if responses else []
        current = variable_from_kv(ranged[0][1]) if ranged else None
        return bool(ok), current

    async def delete_if(self, name: str, compare: list[Any]) -> bool:
        """Delete the variable and its type if every compare holds."""
        c = self.client
        ok, _ = await c.transaction(
            compare=compare,
            success=[c.transactions.delete(self.key(name)), c.transactions.delete(self.type_key(name))],
            failure=[],
        )
        return bool(ok)
