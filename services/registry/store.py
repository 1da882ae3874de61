"""The registry's etcd keyspace (under the mesh prefix P).

==============================  =======================================  =========
key                             value                                    lease
==============================  =======================================  =========
P/agents/<id>                   ``mabeam.v1.Agent`` (no load, no status)  the agent's
P/agent-tokens/<id>             sha256 of the agent's token (hex)        the agent's
P/agent-tokens-moving/<id>      sha256 (hex) of the other token valid    the agent's
                                during a migration (the new instance's
                                before the switch, the old one's until
                                it was told that it moved)
P/agent-load/<id>               ``mabeam.v1.AgentLoad`` + probe status   the agent's
P/supervised/<id>               ``mabeam.v1.SupervisedAgent``            none while
                                                                         active; once
                                                                         STOPPED or
                                                                         FAILED, the
                                                                         "supervised"
                                                                         expiry lease
P/supervised-stopped/<t>/<id>   empty: newest-first index of the         the record's
                                stopped and failed records, t =          expiry lease
                                2^63 - stop time in ns (this replica's
                                clock, %020d), for the count cap only
P/supervised-stopped-at/<id>    t of the record's index key (so a        the record's
                                StartAgent of a stopped record removes   expiry lease
                                it, and the cap deletes only current
                                entries)
P/supervisor-owner/<id>         id of the registry replica supervising   the replica's
P/supervised-tokens/<id>        sha256 (hex) of the token StartAgent     none (deleted
                                returned to its caller (a new one on a   when the
                                replayed StartAgent)                     record stops)
P/process-tokens/<id>           sha256 (hex) of the token the agent's    none (deleted
                                current process was given (a new one     when the
                                at each start, restart or migration)     record stops)
P/registry-prober/<lease>       candidates for the health prober         each candidate's
P/registry-nodes/<replica>      ``mabeam.v1.Node``: the node a live      the replica's
                                replica runs on (name, labels, capacity)
P/agent-measured/<id>           ``mabeam.v1.AgentLoad``: RSS and CPU the the agent's
                                supervisor measured of its process
P/registry-retention/<lease>    candidates for the supervised count cap  each candidate's
P/requests/registry/<m>/<id>    outcome of a call by ``request_id``      the window's
                                (:mod:`mabeam.runtime.idempotency`),
                                its token cleared
==============================  =======================================  =========

No token is stored in the clear: only SHA-256 digests. A token acts for the
agent (take a live registration over, heartbeat, deregister, migrate) when
its digest is under ``agent-tokens/``, ``agent-tokens-moving/``,
``supervised-tokens/`` or ``process-tokens/`` (:meth:`RegistryStore.token_matches`).

Everything an agent registers is bound to its lease, so one lapse removes it
whole. Writes that must not interleave (registration, take-over by token) are
single transactions.

Retention (:mod:`mabeam.runtime.retention`, kind ``supervised``): the write
that makes a record STOPPED or FAILED (:meth:`RegistryStore.put_supervised_if`)
puts it, its index key and its ``supervised-stopped-at`` on the current
expiry lease and deletes its token digests (a stopped agent needs no
credential), in one transaction; etcd deletes the rest when the lease runs
out. Later writes of a stopped record keep its lease. StartAgent of a stopped
record puts it again without a lease, removes its index entry and stores a
new token digest. The count cap (``MABEAM_SUPERVISED_RETENTION_COUNT``) is
enforced by one elected replica (:meth:`RegistryStore.prune_stopped`): it
counts the index (count-only range) and deletes the oldest beyond the cap,
every key of each, never an active record.

:class:`RegistryStore` is one class in two modules: the supervision records
(their reads and writes, the stopped-record index, the count cap, their
tokens) are :mod:`.store_supervised`; registrations, tokens, migration, owner
keys, loads, nodes and the elections are here.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mabeam.config import MeshConfig
from mabeam.runtime.etcd import (
    EtcdClient,
    KeepAliveStream,
    LeaseKeeper,
    ResumingWatch,
    release,
    snapshot,
    try_acquire,
    while_leading,
)
from mabeam.runtime.etcd.leases import lease_unknown
from mabeam.runtime.idempotency import RequestLog, TxnOps
from mabeam.runtime.paging import ScanStats
from mabeam.runtime.retention import ExpiryLeases, Retention
from mabeam.services.registry.store_supervised import (
    PRUNE_EXAMINED,
    STOP_ORDER,
    SUPERVISION_ACTIVE,
    SupervisedRecords,
    decode_active_supervised,
    decode_supervised,
    token_hash,
)
from mabeam.v1 import common_pb2, registry_pb2

# LeaseKeepAlive streams the registry refreshes agents' leases over (see keepalive_stream).
KEEPALIVE_STREAMS = 16

# Loads one transaction of put_loads writes: the project's 64 operations per branch
# (docs/decisions.md; etcd's own limit is 128).
MAX_LOADS_PER_TXN = 64

__all__ = [
    "MAX_LOADS_PER_TXN",
    "PRUNE_EXAMINED",
    "STOP_ORDER",
    "SUPERVISION_ACTIVE",
    "Keys",
    "RegistryStore",
    "decode_active_supervised",
    "decode_agent",
    "decode_load",
    "decode_supervised",
    "new_token",
    "token_hash",
]


def new_token() -> str:
    """A fresh secret token."""
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Keys:
    """Key builders for one mesh prefix."""

    config: MeshConfig

    @functools.cached_property  # the prefix never changes: built once
    def agents(self) -> bytes:
        return self.config.key("agents") + b"/"

    @functools.cached_property
    def loads(self) -> bytes:
        return self.config.key("agent-load") + b"/"

    @functools.cached_property
    def supervised(self) -> bytes:
        return self.config.key("supervised") + b"/"

    @functools.cached_property
    def owners(self) -> bytes:
        return self.config.key("supervisor-owner") + b"/"

    def agent(self, agent_id: str) -> bytes:
        return self.agents + agent_id.encode()

    def token_hash(self, agent_id: str) -> bytes:
        """The hash of the token the agent registered with (:func:`token_hash`)."""
        return self.config.key("agent-tokens", agent_id)

    def load(self, agent_id: str) -> bytes:
        return self.loads + agent_id.encode()

    def supervised_agent(self, agent_id: str) -> bytes:
        return self.supervised + agent_id.encode()

    def moving_token_hash(self, agent_id: str) -> bytes:
        """The hash of the other token valid while the agent moves (see the module's table)."""
        return self.config.key("agent-tokens-moving", agent_id)

    def supervised_token(self, agent_id: str) -> bytes:
        """The hash of the token StartAgent returned to its caller."""
        return self.config.key("supervised-tokens", agent_id)

    def process_token(self, agent_id: str) -> bytes:
        """The hash of the token the supervised agent's current process was given."""
        return self.config.key("process-tokens", agent_id)

    @functools.cached_property
    def token_prefixes(self) -> tuple[bytes, ...]:
        """The prefixes of :meth:`token_keys` (each followed by the agent id)."""
        return tuple(k[: -len(b"x")] for k in self.token_keys("x"))

    def token_keys(self, agent_id: str) -> tuple[bytes, ...]:
        """Every key whose hash lets a token act for the agent."""
        return (
            self.token_hash(agent_id),
            self.moving_token_hash(agent_id),
            self.supervised_token(agent_id),
            self.process_token(agent_id),
        )

    def owner(self, agent_id: str) -> bytes:
        return self.owners + agent_id.encode()

    @functools.cached_property
    def stopped(self) -> bytes:
        """The newest-first index of stopped and failed records."""
        return self.config.key("supervised-stopped") + b"/"

    def stopped_entry(self, order: int, agent_id: str) -> bytes:
        return self.stopped + f"{order:020d}/{agent_id}".encode()

    def stopped_at(self, agent_id: str) -> bytes:
        """The order (t) of the record's current index key."""
        return self.config.key("supervised-stopped-at", agent_id)

    @functools.cached_property
    def prober_election(self) -> bytes:
        return self.config.key("registry-prober")

    @functools.cached_property
    def retention_election(self) -> bytes:
        return self.config.key("registry-retention")

    @functools.cached_property
    def nodes(self) -> bytes:
        """The node each live registry replica runs on (:mod:`.nodes`), one key per replica."""
        return self.config.key("registry-nodes") + b"/"

    def node(self, replica_id: str) -> bytes:
        return self.nodes + replica_id.encode()

    @functools.cached_property
    def measured(self) -> bytes:
        """What the supervisor measured of each supervised agent's process."""
        return self.config.key("agent-measured") + b"/"

    def measured_of(self, agent_id: str) -> bytes:
        return self.measured + agent_id.encode()


def decode_agent(key: bytes, value: bytes) -> registry_pb2.Agent | None:
    """Parse a stored agent (None for anything unreadable: it is ignored, not fatal)."""
    try:
        return registry_pb2.Agent.FromString(value)
    except Exception:
        return None


def decode_load(key: bytes, value: bytes) -> common_pb2.AgentLoad | None:
    try:
        return common_pb2.AgentLoad.FromString(value)
    except Exception:
        return None


class RegistryStore(SupervisedRecords):
    """Transactions on the registry's keys."""

    def __init__(self, client: EtcdClient, config: MeshConfig, retention: Retention | None = None) -> None:
        self.client = client
        self.keys = Keys(config)
        # Stopped and failed records go on these leases (default: 7 days, no cap).
        self.expiry = ExpiryLeases(client, retention or Retention.load("supervised", {}))
        self.requests = RequestLog(client, config, "registry")  # outcomes by request_id
        self.scans = ScanStats()  # what ListSupervisedAgents' range reads cost (tests read it)
        self.prunes = ScanStats()  # what the count cap's reads of the index cost

    async def register(
        self,
        agent: registry_pb2.Agent,
        token: str,
        lease_id: int,
        expect_create_revision: int,
        record: TxnOps | None = None,
    ) -> tuple[bool, int]:
        """Put the agent, its token and an empty load on ``lease_id``.

        Applies only if the agent key's create revision is still
        ``expect_create_revision`` (0 = absent), so two registrations of one id
        cannot both win. Returns (applied, revision). ``record``: the call's
        outcome (by request_id), in the same transaction.
        """
        c = self.client
        key = self.keys.agent(agent.agent_id)
        load = common_pb2.AgentLoad(reported_at=agent.registered_at)
        record = record or TxnOps()
        ok, responses = await c.transaction(
            compare=[c.transactions.create(key) == expect_create_revision, *record.compare],
            success=[
                c.transactions.put(key, agent.SerializeToString(), lease=lease_id),
                c.transactions.put(self.keys.token_hash(agent.agent_id), token_hash(token), lease=lease_id),
                c.transactions.put(self.keys.load(agent.agent_id), load.SerializeToString(), lease=lease_id),
                *record.success,
            ],
            failure=[],
        )
        revision = responses[0].response_put.header.revision if ok and responses else 0
        return bool(ok), int(revision)

    # -- supervision: which replica runs a record (the records: :mod:`.store_supervised`) --

    async def rotate_token(self, agent_id: str, lease_id: int, token: str) -> bool:
        """Make ``token`` the registration's token, if the registration on ``lease_id`` is still there.

        For a replayed RegisterAgent: the first answer's token is not kept, so
        the one who resends gets a new one and the old one stops working.
        """
        c = self.client
        key = self.keys.agent(agent_id)
        got = await c.get(key)
        if got is None or int(got.lease) != lease_id:
            return False
        ok, _ = await c.transaction(
            compare=[c.transactions.mod(key) == got.mod_revision],
            success=[c.transactions.put(self.keys.token_hash(agent_id), token_hash(token), lease=lease_id)],
            failure=[],
        )
        return bool(ok)

    async def begin_move(self, agent_id: str, lease_id: int, create_revision: int, token: str) -> bool:
        """Let ``token`` (the new instance's) act for the agent too while it moves, on its registration's lease."""
        c = self.client
        ok, _ = await c.transaction(
            compare=[c.transactions.create(self.keys.agent(agent_id)) == create_revision],
            success=[
                c.transactions.put(self.keys.moving_token_hash(agent_id), token_hash(token), lease=lease_id)
            ],
            failure=[],
        )
        return bool(ok)

    async def switch_agent(self, agent: registry_pb2.Agent, create_revision: int, token: str) -> bool:
        """The migration's switch, one transaction: the registration names the new instance, whose
        token becomes the registration's; the old token stays valid (``agent-tokens-moving``) until
        :meth:`end_move`, so the old instance's beats pass until it is told that it moved."""
        c = self.client
        key = self.keys.agent(agent.agent_id)
        old = await c.get(self.keys.token_hash(agent.agent_id))
        if old is None:
            return False
        ok, _ = await c.transaction(
            compare=[
                c.transactions.create(key) == create_revision,
                c.transactions.mod(self.keys.token_hash(agent.agent_id)) == old.mod_revision,
            ],
            success=[
                c.transactions.put(key, agent.SerializeToString(), lease=agent.lease_id),
                c.transactions.put(
                    self.keys.token_hash(agent.agent_id), token_hash(token), lease=agent.lease_id
                ),
                c.transactions.put(
                    self.keys.moving_token_hash(agent.agent_id), bytes(old.value), lease=agent.lease_id
                ),
            ],
            failure=[],
        )
        return bool(ok)

    async def end_move(self, agent_id: str) -> None:
        """The move is over (done or rolled back): only the registration's own token acts for it."""
        await self.client.delete(self.keys.moving_token_hash(agent_id))

    async def owner_of(self, agent_id: str) -> str | None:
        """The registry replica that runs the supervised agent now (read from etcd, not a cache)."""
        got = await self.client.get(self.keys.owner(agent_id))
        return bytes(got.value).decode() if got is not None else None

    async def acquire_owner(self, agent_id: str, owner: str, lease_id: int) -> bool:
        """Take the agent's owner key for ``owner`` on its lease (True when it is ours, also already)."""
        return await try_acquire(self.client, self.keys.owner(agent_id), owner, lease_id)

    async def move_owner(self, agent_id: str, old_owner: str, new_owner: str, lease_id: int) -> bool:
        """Hand the agent's owner key from ``old_owner`` to ``new_owner`` on its lease, only while
        ``old_owner`` still holds it (a migration to another node); one transaction."""
        c = self.client
        key = self.keys.owner(agent_id)
        ok, _ = await c.transaction(
            compare=[c.transactions.value(key) == old_owner.encode()],
            success=[c.transactions.put(key, new_owner.encode(), lease=lease_id)],
            failure=[],
        )
        return bool(ok)

    async def release_owner(self, agent_id: str, owner: str) -> None:
        """Drop the agent's owner key if ``owner`` still holds it."""
        await release(self.client, self.keys.owner(agent_id), owner)

    def lease_keeper(self, ttl: int) -> LeaseKeeper:
        """A lease for this replica's owner keys (started by the supervisor)."""
        return LeaseKeeper(self.client, ttl)

    async def token_matches(self, agent_id: str, token: str) -> bool:
        """True when ``token`` acts for the agent: its digest is under one of :meth:`Keys.token_keys`."""
        if not token:
            return False
        digest = token_hash(token)
        c = self.client
        _, responses = await c.transaction(
            compare=[], success=[c.transactions.get(k) for k in self.keys.token_keys(agent_id)], failure=[]
        )
        found = False
        for ranged in responses:
            for value, _meta in ranged:
                # Every digest is compared (constant time each), whatever matched before.
                found = secrets.compare_digest(bytes(value), digest) or found
        return found

    async def get_agent(self, agent_id: str) -> tuple[registry_pb2.Agent | None, int]:
        """The stored agent (strong read) and its key's create revision."""
        got = await self.client.get(self.keys.agent(agent_id))
        if got is None:
            return None, 0
        return registry_pb2.Agent.FromString(got.value), int(got.create_revision)

    async def registration_mark(self, agent_id: str) -> tuple[int, int]:
        """etcd's current revision and the lease of the agent's registration at it (0: none).

        A registration written later has a higher revision: what "registered
        after this moment" means across hosts, without comparing their clocks.
        """
        key = self.keys.agent(agent_id)
        kvs, revision = await snapshot(self.client, key)
        return revision, next((int(kv.lease) for kv in kvs if kv.key == key), 0)

    async def put_loads(self, loads: dict[str, tuple[common_pb2.AgentLoad, int]]) -> dict[str, bool]:
        """Store agents' latest loads (id -> (load, lease)) in one transaction, each only while its
        agent is registered (its key exists); per agent, whether it was stored.

        One etcd request for all (at most :data:`MAX_LOADS_PER_TXN`): 1,000 agents write ~300 loads
        a second. When one is gone (deregistered, its lease revoked since its beat) the transaction
        does not apply and each is written alone (False for those gone or on a lease etcd no
        longer knows). After a take-over a load may go with the old lease: the next beat rewrites it.
        """
        if len(loads) > MAX_LOADS_PER_TXN:
            raise ValueError(f"{len(loads)} loads in one transaction: at most {MAX_LOADS_PER_TXN}")
        c = self.client
        try:
            ok, _ = await c.transaction(
                compare=[c.transactions.create(self.keys.agent(a)) > 0 for a in loads],
                success=[
                    c.transactions.put(self.keys.load(a), load.SerializeToString(), lease=lease)
                    for a, (load, lease) in loads.items()
                ],
                failure=[],
            )
        except Exception as exc:
            if not lease_unknown(exc):
                raise
            ok = False
        if ok or len(loads) == 1:
            return dict.fromkeys(loads, bool(ok))
        # Every write ends before an error is raised: none is left running on its own.
        alone = await asyncio.gather(
            *(self.put_loads({a: one}) for a, one in loads.items()), return_exceptions=True
        )
        for outcome in alone:
            if isinstance(outcome, BaseException):
                raise outcome
        return {a: outcome[a] for a, outcome in zip(loads, alone, strict=True) if isinstance(outcome, dict)}

    async def put_measured(self, agent_id: str, measured: common_pb2.AgentLoad, lease_id: int) -> bool:
        """Store what the supervisor measured of the agent's process, only while it is registered on that lease."""
        c = self.client
        key = self.keys.agent(agent_id)
        ok, _ = await c.transaction(
            compare=[c.transactions.create(key) > 0],
            success=[
                c.transactions.put(
                    self.keys.measured_of(agent_id), measured.SerializeToString(), lease=lease_id
                )
            ],
            failure=[],
        )
        return bool(ok)

    async def put_node(self, replica_id: str, node: registry_pb2.Node, lease_id: int) -> None:
        """Publish the node this replica runs on, on the replica's lease (it goes with the replica)."""
        await self.client.put(self.keys.node(replica_id), node.SerializeToString(), lease=lease_id)

    async def put_agent(self, agent: registry_pb2.Agent, lease_id: int, create_revision: int) -> bool:
        """Replace the agent record in place (same registration)."""
        c = self.client
        key = self.keys.agent(agent.agent_id)
        ok, _ = await c.transaction(
            compare=[c.transactions.create(key) == create_revision],
            success=[c.transactions.put(key, agent.SerializeToString(), lease=lease_id)],
            failure=[],
        )
        return bool(ok)

    async def grant_lease(self, ttl: int) -> Any:
        """A new lease of ``ttl`` seconds for a registration (etcd may grant more: see ``.ttl``)."""
        return await self.client.lease(ttl)

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke a lease: every key of the registration bound to it goes."""
        await self.client.revoke_lease(lease_id)

    def keepalive_stream(self) -> KeepAliveStream:
        """KEEPALIVE_STREAMS shared keep-alive streams that refresh the agents' leases (closed by its
        owner): etcd answers a stream's refreshes one after another, each once its apply loop caught
        up, so under writes one stream refreshes a few hundred a second; 1,000 agents need 600."""
        return KeepAliveStream(self.client, streams=KEEPALIVE_STREAMS)

    def watch_agents(self, start_revision: int) -> ResumingWatch:
        """The changes of ``P/agents/`` from ``start_revision``, from etcd's history."""
        return ResumingWatch(self.client, self.keys.agents, start_revision=start_revision)

    async def set_status(self, agent_id: str, status: int) -> bool:
        """Set the agent's probed status, as a compare-and-set on its record (False when it moved or went)."""
        c = self.client
        key = self.keys.agent(agent_id)
        got = await c.get(key)
        if got is None:
            return False
        agent = registry_pb2.Agent.FromString(got.value)
        agent.status = status  # type: ignore[assignment]
        ok, _ = await c.transaction(
            compare=[c.transactions.mod(key) == got.mod_revision],
            success=[c.transactions.put(key, agent.SerializeToString(), lease=int(got.lease))],
            failure=[],
        )
        return bool(ok)

    async def while_leading_prober(
        self, candidate_id: str, ttl: int, work: Callable[[], Awaitable[None]], interval: float
    ) -> None:
        """Run ``work`` every ``interval`` while this replica leads the prober election; campaign again after losing it."""
        await while_leading(
            self.client,
            self.keys.prober_election,
            candidate_id,
            ttl,
            work,
            interval,
            what="registry health prober",
        )
