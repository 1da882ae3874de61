"""Supervised agents: which registry replica runs each one, and the writes only that replica may make.

The desired state of each supervised agent is its record under
``P/supervised/<id>`` (etcd); which registry replica runs it is the owner key
``P/supervisor-owner/<id>``, bound to that replica's lease. Every replica
reconciles: an agent that should run and has no owner is taken (a create-only
transaction, so exactly one replica wins) and its process is run by a task of
:func:`.processes.supervise`. When a replica dies its lease lapses, its owner
keys vanish and another replica takes its agents over; its children die with
it (PR_SET_PDEATHSIG). Every state write is a transaction that checks
ownership (:meth:`Supervisor.write`), so a replica that lost its lease cannot
overwrite the new owner's record, and it kills its children as soon as it
learns that it lost the lease: an agent is not left running twice.

Each replica runs on a node (:mod:`.nodes`) and publishes it on its lease;
it takes only the agents whose placement allows its node and that were placed
on it (or whose node has no live replica left).

The rest lives in modules of its own: :mod:`.catalog` says what may be launched,
:mod:`.launch` checks launch specs and builds a process's command, :mod:`.processes` runs one agent's process,
:mod:`.requests` serves StartAgent / StopAgent / RestartAgent, and
:mod:`.migration` moves a live agent. :class:`Supervisor` is what the
registry's servicer holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING

import stamina

from mabeam import auth, errors
from mabeam.client import ChannelPool
from mabeam.discovery import EndpointResolver
from mabeam.runtime.auth import PrincipalStore
from mabeam.runtime.cache import PrefixCache
from mabeam.runtime.etcd import EtcdClient, LeaseKeeper
from mabeam.runtime.retention import Retention
from mabeam.server import MeshServer
from mabeam.services.registry import migration, nodes, processes, requests
from mabeam.services.registry.catalog import LaunchPolicy
from mabeam.services.registry.launch import Launch, launch_command, policy_of
from mabeam.services.registry.migration import migrate
from mabeam.services.registry.processes import ACTIVE
from mabeam.services.registry.store import RegistryStore, decode_active_supervised, new_token
from mabeam.v1 import registry_pb2

if TYPE_CHECKING:
    from mabeam.services.registry.directory import AgentDirectory

log = logging.getLogger("mabeam.registry.supervisor")

# How often the elected replica enforces the count cap on stopped records (when there is one).
PRUNE_INTERVAL_S = 30.0


class _Conflict(Exception):
    """An ownership-checked write met a concurrent change: read again and retry."""


class Supervisor:
    """One registry replica's share of the supervision work."""

    def __init__(
        self,
        server: MeshServer,
        etcd: EtcdClient,
        store: RegistryStore,
        directory: AgentDirectory,
        policy: LaunchPolicy | None = None,
        node: nodes.NodeSpec | None = None,
    ) -> None:
        self.server = server
        # The node this replica runs on (published on its lease under P/registry-nodes/).
        self.node = node if node is not None else nodes.NodeSpec()
        # What this replica may launch (its agent catalog, --allow-argv); see .catalog.
        self.policy = policy if policy is not None else LaunchPolicy()
        self.etcd = etcd
        self.store = store
        self.directory = directory
        self.replica_id = server.instance_id
        # The active records only (starting, running, restarting): stopped and failed ones are
        # history, read from etcd when asked for (ListSupervisedAgents pages through etcd), never
        # held here nor rescanned by each pass.
        self.records: PrefixCache[registry_pb2.SupervisedAgent] = PrefixCache(
            etcd, store.keys.supervised, decode_active_supervised
        )
        self.owners: PrefixCache[str] = PrefixCache(etcd, store.keys.owners, lambda k, v: bytes(v).decode())
        self.nodes: PrefixCache[registry_pb2.Node] = PrefixCache(etcd, store.keys.nodes, _decode_node)
        self._published_on = 0  # the lease this replica's node was last published on
        self._keeper: LeaseKeeper | None = None
        self._children: dict[str, asyncio.Task[None]] = {}
        # The process each agent run here has now (a migration replaces it) ...
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # ... and the agents being migrated, each done when its migration ends.
        self.moving: dict[str, asyncio.Future[None]] = {}
        # Old processes of migrated agents, stopped a little later (migration.retire).
        self.retiring: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()
        # With auth on, each agent run here holds a credential of its own (role
        # agent, for its id only) for as long as this replica runs it: the
        # MABEAM_TOKEN of its processes, never a token of the registry's.
        self.principals = PrincipalStore(etcd, server.config)
        self.credentials: dict[str, tuple[str, str]] = {}  # agent id -> (principal id, token)
        self.peers: EndpointResolver | None = None
        # Agents get the agent-call credential; peer replicas (a migration handed over) the service token.
        self.pool = ChannelPool(server.config.client_tls(), server.config.agent_credential())
        self.peer_pool = ChannelPool(server.config.client_tls(), server.config.token)

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        await self.records.start()
        await self.owners.start()
        await self.nodes.start()
        self.records.add_listener(lambda *a: self.wake.set())
        self.owners.add_listener(lambda *a: self.wake.set())
        self.nodes.add_listener(lambda *a: self.wake.set())
        self._keeper = self.store.lease_keeper(self.server.config.service_ttl)
        await self._keeper.start()
        await self._publish_node()
        config = self.server.config
        self.peers = EndpointResolver(config.etcd_endpoints, config.prefix, "registry", tls=config.etcd_tls)
        await self.peers.start()
        self.server.spawn(self._reconcile_loop(), "supervisor")
        if self.retention.max_count:
            self.server.spawn(self._prune_loop(), "supervised-retention")
        self.server.on_stop(self.stop)

    async def stop(self) -> None:
        """Stop this replica's children; release their ownership so another replica takes them."""
        children, self._children = self._children, {}
        for task in children.values():
            task.cancel()
        await asyncio.gather(*children.values(), return_exceptions=True)
        for task in list(self.retiring):
            task.cancel()
        for agent_id in list(self.credentials):
            await self.revoke_credential(agent_id)
        if self._keeper is not None:
            await self._keeper.revoke()
        if self.peers is not None:
            await self.peers.stop()
        await self.pool.close()
        await self.peer_pool.close()
        await self.records.stop()
        await self.owners.stop()
        await self.nodes.stop()

    @property
    def retention(self) -> Retention:
        """How long stopped and failed records are kept, and how many (MABEAM_SUPERVISED_RETENTION*)."""
        return self.store.expiry.retention

    async def _prune_loop(self) -> None:
        """While elected (one replica of the mesh): delete the oldest stopped records beyond the cap."""
        cap = self.retention.max_count

        async def prune() -> None:
            deleted = await self.store.prune_stopped(cap)
            if deleted:
                log.info("retention: deleted %d stopped supervised records beyond the %d kept", deleted, cap)

        await self.store.while_leading_retention(
            self.replica_id, self.server.config.service_ttl, prune, PRUNE_INTERVAL_S
        )

    # -- what the servicer reads --------------------------------------------

    async def is_supervised(self, agent_id: str) -> bool:
        record = self.record(agent_id)
        return record is not None and record.state in ACTIVE

    def record(self, agent_id: str) -> registry_pb2.SupervisedAgent | None:
        """The agent's record as last seen (cache), while it is active (None when stopped or failed)."""
        return self.records.get(self.store.keys.supervised_agent(agent_id))

    def owner(self, agent_id: str) -> str | None:
        """The replica that runs the agent's process, as last seen (cache)."""
        return self.owners.get(self.store.keys.owner(agent_id))

    def runs_here(self, agent_id: str) -> bool:
        """This replica runs the agent's process now."""
        task = self._children.get(agent_id)
        return task is not None and not task.done()

    # -- nodes ----------------------------------------------------------------

    async def _publish_node(self) -> None:
        """Publish this replica's node on its lease (again after the lease was renewed)."""
        assert self._keeper is not None
        lease = self._keeper.lease_id
        if lease and lease != self._published_on:
            await self.store.put_node(self.replica_id, nodes.published(self.node, self.replica_id), lease)
            self._published_on = lease

    def live_node_names(self) -> set[str]:
        return {n.name for n in self._replica_nodes()}

    def _replica_nodes(self) -> list[registry_pb2.Node]:
        """Each live replica's node, this replica's own included before its key is seen."""
        found = [n for _, n in self.nodes.items()]
        if not any(self.replica_id in n.replica_ids for n in found):
            found.append(nodes.published(self.node, self.replica_id))
        return found

    def node_of_replica(self, replica_id: str) -> str | None:
        return next((n.name for n in self._replica_nodes() if replica_id in n.replica_ids), None)

    def replica_on(self, node: str) -> str:
        """A live replica of ``node`` (the first by id; UNAVAILABLE when none is left)."""
        ids = sorted(r for n in self._replica_nodes() if n.name == node for r in n.replica_ids)
        if not ids:
            raise errors.service_unavailable("registry", f"no live registry replica on node {node!r}")
        return ids[0]

    def list_nodes(self) -> list[registry_pb2.Node]:
        """The live nodes, by name, with the active supervised agents placed on each."""
        records = [r for _, r in self.records.items()]
        memory = {}
        for r in records:
            measured = self.directory.measured_of(r.agent_id)
            if measured is not None:
                memory[r.agent_id] = int(measured.memory_bytes)
        return nodes.aggregate(self._replica_nodes(), records, memory)

    def place(self, placement: registry_pb2.Placement) -> str:
        """The least-loaded live node the placement allows (FAILED_PRECONDITION naming it if none)."""
        chosen = nodes.choose(self.list_nodes(), placement)
        if chosen is None:
            raise errors.FailedPrecondition(
                f"no live registry node fits the placement ({nodes.describe(placement)}); "
                f"nodes: {', '.join(sorted(self.live_node_names())) or 'none'}"
            )
        return chosen.name

    # -- the RPCs (their code is in requests.py and migration.py) -----------

    async def start_agent(
        self, request: registry_pb2.StartAgentRequest
    ) -> tuple[registry_pb2.SupervisedAgent, str]:
        return await requests.start_agent(self, request)

    async def stop_agent(self, request: registry_pb2.StopAgentRequest) -> registry_pb2.SupervisedAgent:
        return await requests.stop_agent(self, request)

    async def restart_agent(self, request: registry_pb2.RestartAgentRequest) -> registry_pb2.SupervisedAgent:
        return await requests.restart_agent(self, request)

    async def migrate_agent(
        self, request: registry_pb2.MigrateAgentRequest, placed_node: str | None = None
    ) -> registry_pb2.MigrateAgentResponse:
        return await migration.migrate_agent(self, request, placed_node)

    # -- reconciliation -----------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 1.0)
            self.wake.clear()
            try:
                await self._reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("supervision pass failed: %s", exc)

    async def _reconcile(self) -> None:
        assert self._keeper is not None
        if self._keeper.lost.is_set():
            # Our ownerships lapsed with the lease: another replica may run our
            # agents now, so ours must stop before anything else.
            log.warning("supervisor lease lost: stopping %d children", len(self._children))
            children, self._children = self._children, {}
            for task in children.values():
                task.cancel()
            await asyncio.gather(*children.values(), return_exceptions=True)
            self._keeper = self.store.lease_keeper(self.server.config.service_ttl)
            await self._keeper.start()
        await self._publish_node()
        live_nodes = self.live_node_names()
        for _key, record in list(self.records.items()):
            agent_id = record.agent_id
            if agent_id in self.moving:
                continue  # a migration here decides (it may be taking the agent over from another node)
            owner = self.owner(agent_id)
            running_here = self.runs_here(agent_id)
            if record.state in ACTIVE and not running_here:
                if owner == self.replica_id or (
                    owner is None and nodes.may_run(record, self.node, live_nodes)
                ):
                    if await self.store.acquire_owner(agent_id, self.replica_id, self._keeper.lease_id):
                        self._children[agent_id] = asyncio.create_task(
                            processes.supervise(self, agent_id), name=f"supervise:{agent_id}"
                        )
            elif record.state not in ACTIVE and running_here:
                self._children.pop(agent_id).cancel()
            elif owner is not None and owner != self.replica_id and running_here:
                log.warning("lost ownership of %s to %s: stopping it here", agent_id, owner)
                self._children.pop(agent_id).cancel()
        known = {r.agent_id for _, r in self.records.items()}
        for agent_id in list(self._children):
            if agent_id not in known:
                self._children.pop(agent_id).cancel()

    # -- ownership-checked writes -------------------------------------------

    async def write(self, agent_id: str, change: Callable[[registry_pb2.SupervisedAgent], None]) -> bool:
        """Apply ``change`` to the record, only while this replica owns the agent."""
        record, mod_revision = await self.store.get_supervised(agent_id)
        if record is None:
            return False
        change(record)
        record.supervisor_id = self.replica_id
        return await self.store.put_supervised_if(record, mod_revision, owner=self.replica_id)

    async def write_retrying(
        self, agent_id: str, change: Callable[[registry_pb2.SupervisedAgent], None]
    ) -> bool:
        """:meth:`write`, again after a concurrent change, for as long as this replica owns the agent."""
        with contextlib.suppress(_Conflict):
            async for attempt in stamina.retry_context(
                on=_Conflict, attempts=20, timeout=None, wait_initial=0.02, wait_max=0.2, wait_jitter=0.02
            ):
                with attempt:
                    if await self.write(agent_id, change):
                        return True
                    if await self.store.owner_of(agent_id) != self.replica_id:
                        return False
                    raise _Conflict
        return False

    async def adopt(
        self,
        agent_id: str,
        old_owner: str,
        proc: subprocess.Popen[bytes],
        change: Callable[[registry_pb2.SupervisedAgent], None],
    ) -> bool:
        """Take the supervision of ``agent_id`` over from ``old_owner`` (a migration to this node):
        its owner key, then ``proc`` as its process, then ``change`` on its record. False (nothing
        taken) when ``old_owner`` no longer holds it."""
        assert self._keeper is not None
        if not await self.store.move_owner(agent_id, old_owner, self.replica_id, self._keeper.lease_id):
            return False
        self.procs[agent_id] = proc
        self._children[agent_id] = asyncio.create_task(
            processes.supervise(self, agent_id, adopted=proc), name=f"supervise:{agent_id}"
        )
        await self.write_retrying(agent_id, change)
        return True

    async def release(self, agent_id: str) -> None:
        """Give the ownership of ``agent_id`` up (another replica may take it)."""
        await self.store.release_owner(agent_id, self.replica_id)

    async def secret(self, agent_id: str) -> str:
        """A fresh token for a process this replica starts for the agent (MABEAM_AGENT_TOKEN).

        Each start, restart, failover or migration target gets its own; only its
        hash is stored (``process-tokens/<id>``), which lets the new process take
        a live registration over. The previous process's token stops working then.
        """
        token = new_token()
        await self.store.set_process_token(agent_id, token)
        return token

    async def issue_credential(self, agent_id: str) -> None:
        """With auth on: mint the credential the processes of ``agent_id`` run here present (role agent,
        that id only, bound to this replica's lease); :meth:`revoke_credential` when this replica
        no longer runs the agent."""
        if not self.server.config.auth or agent_id in self.credentials:
            return
        # Bound to this replica's lease: a replica killed outright leaves no credential behind.
        lease = self._keeper.lease_id if self._keeper is not None and self._keeper.lease_id else None
        record, token = await self.principals.mint(
            f"supervised:{agent_id}", auth.AGENT, agent_id, lease=lease
        )
        self.credentials[agent_id] = (record.identity.principal_id, token)

    async def revoke_credential(self, agent_id: str) -> None:
        """Revoke the credential of ``agent_id`` minted here (best effort: it names one agent only)."""
        held = self.credentials.pop(agent_id, None)
        if held is not None:
            try:
                await self.principals.delete(held[0])
            except Exception as exc:
                log.warning("revoking the credential of %s failed: %s", agent_id, exc)

    def launch_of(
        self, launch: registry_pb2.LaunchSpec, agent_id: str, token: str, *, standby: bool = False
    ) -> Launch:
        """The process to start for ``agent_id`` from ``launch``, tied to this mesh."""
        held = self.credentials.get(agent_id)
        return launch_command(
            launch,
            agent_id,
            token,
            self.server.address,
            self.server.config,
            self.policy,
            credential=held[1] if held is not None else None,
            standby=standby,
        )


def _decode_node(key: bytes, value: bytes) -> registry_pb2.Node | None:
    try:
        return registry_pb2.Node.FromString(value)
    except Exception:
        return None


__all__ = ["Supervisor", "migrate", "policy_of"]
