"""The registry's directory of agents: a watch-fed view of registrations and loads.

Lookups (GetAgent, ListAgents, WatchAgents snapshots), the supervisor and the
health prober read agents here, with no etcd read per call: two
:class:`~mabeam.runtime.cache.PrefixCache` follow ``P/agents/`` and
``P/agent-load/`` (:mod:`.store`).
"""

from __future__ import annotations

import time
from typing import Any

from mabeam.runtime.cache import PrefixCache
from mabeam.runtime.etcd import EtcdClient
from mabeam.services.registry.store import RegistryStore, decode_agent, decode_load
from mabeam.v1 import common_pb2, registry_pb2

# The lease TTL of an agent that did not ask for one (seconds).
DEFAULT_TTL = 5.0


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
        self._store = store
        # capability ("" = every agent) -> agent_id -> agent, kept by the cache
        # listener, and the sorted lists derived from it (dropped on change).
        self._index: dict[str, dict[str, registry_pb2.Agent]] = {"": {}}
        self._sorted: dict[str, list[registry_pb2.Agent]] = {}
        self._views: dict[str, tuple[Any, Any, registry_pb2.Agent]] = {}
        self.agents.add_listener(self._reindex)

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

    async def stop(self) -> None:
        await self.agents.stop()
        await self.loads.stop()

    def view(self, agent: registry_pb2.Agent) -> registry_pb2.Agent:
        """The agent as callers see it: with its latest load and a status.

        Views are cached per (record, load) pair, both immutable cache entries;
        only the time-dependent status is set again.
        """
        load = self.loads.get(self._store.keys.load(agent.agent_id))
        cached = self._views.get(agent.agent_id)
        if cached is not None and cached[0] is agent and cached[1] is load:
            out = cached[2]
        else:
            out = registry_pb2.Agent()
            out.CopyFrom(agent)
            if load is not None:
                out.load.CopyFrom(load)
                out.last_heartbeat_at.CopyFrom(load.reported_at)
            if len(self._views) > 4 * len(self.agents) + 1024:
                self._views.clear()
            self._views[agent.agent_id] = (agent, load, out)
        out.status = self.status(out)  # type: ignore[assignment]
        return out

    def status(self, agent: registry_pb2.Agent) -> int:
        """The probe's verdict; else SERVING while beats are recent, UNKNOWN after two TTLs without."""
        if agent.status in (registry_pb2.AGENT_STATUS_NOT_SERVING, registry_pb2.AGENT_STATUS_UNKNOWN):
            return agent.status
        ttl = agent.lease_ttl.seconds + agent.lease_ttl.nanos / 1e9 or DEFAULT_TTL
        last = agent.last_heartbeat_at.seconds + agent.last_heartbeat_at.nanos / 1e9
        if last and time.time() - last > 2 * ttl:
            return registry_pb2.AGENT_STATUS_UNKNOWN
        return registry_pb2.AGENT_STATUS_SERVING

    def get(self, agent_id: str) -> registry_pb2.Agent | None:
        agent = self.agents.get(self._store.keys.agent(agent_id))
        return self.view(agent) if agent is not None else None
