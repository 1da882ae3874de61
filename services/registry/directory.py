"""The registry's directory of agents: a watch-fed view of registrations and loads.

Lookups (GetAgent, ListAgents, WatchAgents snapshots), the supervisor and the
health prober read agents here, with no etcd read per call: three
:class:`~mabeam.runtime.cache.PrefixCache` follow ``P/agents/``,
``P/agent-load/`` and ``P/agent-measured/`` (what supervisors measured of
their agents' processes) (:mod:`.store`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mabeam.runtime import validate
from mabeam.runtime.cache import PrefixCache
from mabeam.runtime.etcd import EtcdClient
from mabeam.services.registry.store import RegistryStore, decode_agent, decode_load
from mabeam.v1 import common_pb2, registry_pb2

# The lease TTL of an agent that did not ask for one (seconds).
DEFAULT_TTL = 5.0
MIN_TTL, MAX_TTL = 1.0, 300.0
# UNKNOWN after this many TTLs without a stored beat: about two missed beats
# (beats come every TTL/3, and a beat is stored at most every TTL/2 unless the
# load moved, so a live agent's stored beat is up to 2/3 TTL old), and still
# short of the lease, so an agent that stops beating shows UNKNOWN for the last
# sixth to half of its TTL before it is gone.
UNKNOWN_AFTER_TTLS = 5 / 6


def _ttl(agent: registry_pb2.Agent) -> float:
    """The agent's lease TTL in seconds (:data:`DEFAULT_TTL` when it asked for none)."""
    return agent.lease_ttl.seconds + agent.lease_ttl.nanos / 1e9 or DEFAULT_TTL


def matches(agent: registry_pb2.Agent, capability: str, labels: Any) -> bool:
    """True when the agent offers ``capability`` ("" = any) and carries every label."""
    if capability and capability not in agent.capabilities:
        return False
    return all(agent.labels.get(k) == v for k, v in labels.items())


class AgentDirectory:
    """The watch-fed view of registered agents and their loads."""

    def __init__(self, etcd: EtcdClient, store: RegistryStore) -> None:
        self.agents: PrefixCache[registry_pb2.Agent] = PrefixCache(etcd, store.keys.agents, decode_agent)
        self.loads: PrefixCache[common_pb2.AgentLoad] = PrefixCache(etcd, store.keys.loads, decode_load)
        self.measured: PrefixCache[common_pb2.AgentLoad] = PrefixCache(etcd, store.keys.measured, decode_load)
        # The keys whose hashes let a token act for an agent: watched only to say that one changed.
        self.tokens: list[PrefixCache[bytes]] = [
            PrefixCache(etcd, prefix, lambda key, value: b"") for prefix in store.keys.token_prefixes
        ]
        self._store = store
        # capability ("" = every agent) -> agent_id -> agent, kept by the cache
        # listener, and the sorted lists derived from it (dropped on change).
        self._index: dict[str, dict[str, registry_pb2.Agent]] = {"": {}}
        self._sorted: dict[str, list[registry_pb2.Agent]] = {}
        self._views: dict[str, tuple[Any, Any, Any, registry_pb2.Agent, float]] = {}
        # agent_id -> time.monotonic() when this replica last saw a beat stored: the
        # stored reported_at is another replica's clock, never compared with ours.
        self._beat_seen: dict[str, float] = {}
        self._loads_prefix = store.keys.loads
        self._measured_prefix = store.keys.measured
        self.agents.add_listener(self._reindex)
        self.loads.add_listener(self._on_load)

    def _on_load(self, kind: str, key: bytes, old: Any, new: Any, rev: int) -> None:
        agent_id = key[len(self._loads_prefix) :].decode(errors="replace")
        if new is None:
            self._beat_seen.pop(agent_id, None)
        else:
            self._beat_seen[agent_id] = time.monotonic()

    def _reindex(
        self, kind: str, key: bytes, old: registry_pb2.Agent | None, new: registry_pb2.Agent | None, rev: int
    ) -> None:
        for agent in (old,):
            if agent is not None:
                for cap in ("", *agent.capabilities):
                    self._index.get(cap, {}).pop(agent.agent_id, None)
                    self._sorted.pop(cap, None)
        if new is not None:
            for cap in ("", *new.capabilities):
                self._index.setdefault(cap, {})[new.agent_id] = new
                self._sorted.pop(cap, None)

    def with_capability(self, capability: str) -> list[registry_pb2.Agent]:
        """Registered agents offering ``capability`` ("" = all), by id, as stored."""
        found = self._sorted.get(capability)
        if found is None:
            found = [a for _, a in sorted(self._index.get(capability, {}).items())]
            self._sorted[capability] = found
        return found

    async def start(self) -> None:
        await self.agents.start()
        await self.loads.start()
        await self.measured.start()
        for cache in self.tokens:
            await cache.start()

    async def stop(self) -> None:
        await self.agents.stop()
        await self.loads.stop()
        await self.measured.stop()
        for cache in self.tokens:
            await cache.stop()

    def on_token_change(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(agent_id)`` whenever a key holding a hash of one of the agent's tokens
        is written or deleted (a rotation, a migration's switch or end, a stop), on any replica."""
        for cache in self.tokens:

            def changed(
                kind: str, key: bytes, old: Any, new: Any, rev: int, prefix: bytes = cache.prefix
            ) -> None:
                callback(key[len(prefix) :].decode(errors="replace"))

            cache.add_listener(changed)

    def measured_of(self, agent_id: str) -> common_pb2.AgentLoad | None:
        """What the supervisor last measured of the agent's process (None: not supervised, or not yet)."""
        return self.measured.get(self._store.keys.measured_of(agent_id))

    def view(self, agent: registry_pb2.Agent) -> registry_pb2.Agent:
        """The agent as callers see it: with its latest load and a status.

        Views are cached per (record, load, measure) triple, all immutable cache
        entries; only the time-dependent status is set again. A ListAgents page
        of 1,000 agents is 1,000 views: this is the registry's hottest path.
        """
        agent_id = agent.agent_id
        name = agent_id.encode()
        load = self.loads.get(self._loads_prefix + name)
        measured = self.measured.get(self._measured_prefix + name)
        cached = self._views.get(agent_id)
        if cached is not None and cached[0] is agent and cached[1] is load and cached[2] is measured:
            out, quiet_after = cached[3], cached[4]
        else:
            out = registry_pb2.Agent()
            out.CopyFrom(agent)
            if load is not None:
                out.load.CopyFrom(load)
                out.last_heartbeat_at.CopyFrom(load.reported_at)
            if measured is not None:
                out.measured.CopyFrom(measured)
            quiet_after = UNKNOWN_AFTER_TTLS * _ttl(agent)
            if len(self._views) > 4 * len(self.agents) + 1024:
                self._views.clear()
            self._views[agent_id] = (agent, load, measured, out, quiet_after)
        status = self._status(agent.status, agent_id, quiet_after)
        if out.status != status:
            out.status = status  # type: ignore[assignment]
        return out

    def _status(self, stored: int, agent_id: str, quiet_after: float) -> int:
        """The probe's verdict; else SERVING while beats are recent, UNKNOWN after 5/6 TTL without.

        "Recent" is measured on this replica's monotonic clock from when it saw
        the agent's last stored beat (see :data:`UNKNOWN_AFTER_TTLS`).
        """
        if stored in (registry_pb2.AGENT_STATUS_NOT_SERVING, registry_pb2.AGENT_STATUS_UNKNOWN):
            return stored
        seen = self._beat_seen.get(agent_id)
        if seen is not None and time.monotonic() - seen > quiet_after:
            return registry_pb2.AGENT_STATUS_UNKNOWN
        return registry_pb2.AGENT_STATUS_SERVING

    def get(self, agent_id: str) -> registry_pb2.Agent | None:
        agent = self.agents.get(self._store.keys.agent(agent_id))
        return self.view(agent) if agent is not None else None


def checked_registration(request: registry_pb2.RegisterAgentRequest) -> tuple[str, str, list[str], float]:
    """A RegisterAgent request's fields checked (INVALID_ARGUMENT naming the bad one):
    (agent_id, endpoint, capabilities, lease TTL in seconds)."""
    agent_id = validate.identifier(request.agent_id, "agent_id")
    endpoint = validate.endpoint(request.endpoint, "endpoint")
    capabilities = validate.strings(request.capabilities, "capabilities")
    for k in request.labels:
        validate.strings([k], "labels")
    ttl = validate.seconds(
        request.lease_ttl, "lease_ttl", default=DEFAULT_TTL, minimum=MIN_TTL, maximum=MAX_TTL
    )
    for name, value in request.resources.custom.items():
        validate.finite(value, f"resources.custom[{name}]", minimum=0)
    validate.finite(request.resources.cpu, "resources.cpu", minimum=0)
    if request.node:
        validate.identifier(request.node, "node")
    return agent_id, endpoint, capabilities, ttl
