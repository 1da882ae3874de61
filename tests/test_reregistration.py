"""An AgentHost registers its lost agents again all at once, and beats for the others meanwhile.

A thousand agents' leases are revoked behind the host's back (what an etcd
outage longer than a TTL does). The host must have every one of them listed
again, registering them concurrently (bounded); the agents
that did not lapse must keep their leases throughout (their beats go on), and
a standby agent (a migration target, served but not registered) must never be
registered by that path.

How fast: the goal is TTL + 1 s. On this project's 2-core machine one registry
replica registers about 150 agents a second, and 1,000 came back in 6.5-9.5 s:
the test holds the bound measured with margin here (BACK_WITHIN_S), prints the
figure in pytest's summary, and the gap to the goal is written in
docs/decisions.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aetcd.exceptions
import pytest

from harness.wait import eventually
from mabeam.agent import Agent, AgentHost
from mabeam.client import MeshClient, list_all
from mabeam.config import MeshConfig
from mabeam.runtime import etcd as mabeam_etcd
from mabeam.runtime.mesh import LocalMesh
from mabeam.v1 import registry_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TTL = 5.0
BACK_WITHIN_S = 3 * TTL
LAPSING = 1000
KEPT = 50


async def _listed(client: MeshClient) -> set[str]:
    agents = await list_all(client.registry.ListAgents, registry_pb2.ListAgentsRequest(), "agents")
    return {a.agent_id for a in agents}


async def test_a_thousand_lost_agents_are_back_at_once_and_the_others_keep_beating(
    local_mesh: Callable[..., Awaitable[LocalMesh]], mesh_config: MeshConfig, record_property: Any
) -> None:
    mesh = await local_mesh(services=("registry",))
    registry = mesh.address("registry")
    lapsing = [f"lapse-{i}" for i in range(LAPSING)]
    kept = [f"keep-{i}" for i in range(KEPT)]
    host = AgentHost([Agent(a) for a in [*lapsing, *kept]], registry=registry, lease_ttl=TTL)
    for i in range(3):
        host.add(Agent(f"standby-{i}"), register=False)
    client = await MeshClient.connect(registry=registry)
    etcd = await mabeam_etcd.connect(mesh_config.etcd_endpoints)
    removed: list[str] = []
    present: set[str] = set()
    snapshot_done = asyncio.Event()
    added_standby: list[str] = []
    watcher: asyncio.Task[None] | None = None
    await host.start()
    try:
        await eventually(
            lambda: _all_listed(client, {*lapsing, *kept}), timeout=30, what="every agent registered"
        )

        async def watch() -> None:
            async for event in client.registry.WatchAgents(registry_pb2.WatchAgentsRequest()):
                agent_id = event.agent.agent_id
                if event.type == registry_pb2.AGENT_EVENT_TYPE_SNAPSHOT_DONE:
                    snapshot_done.set()
                elif event.type == registry_pb2.AGENT_EVENT_TYPE_REMOVED:
                    removed.append(agent_id)
                    present.discard(agent_id)
                else:
                    present.add(agent_id)
                    if agent_id.startswith("standby-"):
                        added_standby.append(agent_id)

        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(snapshot_done.wait(), 10)

        # Revoke the leases of the 1,000: their registrations vanish at once.
        leases: set[int] = set()

        async def all_leases() -> bool:
            # Every one registered now (a loaded machine may have let one lapse and come back).
            leases.clear()
            for agent_id in lapsing:
                got = await etcd.get(mesh_config.key("agents", agent_id))
                if got is None:
                    return False
                leases.add(registry_pb2.Agent.FromString(got.value).lease_id)
            return True

        await eventually(all_leases, timeout=30, interval=0.5, what="the leases of the 1,000")
        removed.clear()
        sem = asyncio.Semaphore(32)

        async def revoke(lease_id: int) -> None:
            async with sem:
                # The host may have registered it again already (which drops the old lease).
                with contextlib.suppress(aetcd.exceptions.ClientError):
                    await etcd.revoke_lease(lease_id)

        revoked = time.monotonic()  # counted from the first revocation
        await asyncio.gather(*(revoke(lease) for lease in leases))

        # Watched, not listed in a loop: polling a 1,000-agent listing would load the registry.
        await eventually(lambda: not set(lapsing) <= present, timeout=5, what="the revocations seen")
        back_after: float | None = None
        while time.monotonic() - revoked < BACK_WITHIN_S + 5:
            if set(lapsing) <= present:
                back_after = time.monotonic() - revoked
                break
            await asyncio.sleep(0.02)
        assert back_after is not None, (
            f"{len(set(lapsing) - present)} agents still missing after {BACK_WITHIN_S + 5} s"
        )
        record_property(
            "report",
            f"re-registration: {LAPSING} lapsed agents listed again {back_after:.2f} s after their leases "
            f"were revoked (goal TTL + 1 s = {TTL + 1:.0f} s; bound held here {BACK_WITHIN_S:.0f} s)",
        )
        assert back_after <= BACK_WITHIN_S, f"{LAPSING} agents took {back_after:.2f} s to come back"

        await asyncio.sleep(TTL)  # long enough for a kept agent left without beats to lapse
        lost_kept = sorted({a for a in removed if a.startswith("keep-")})
        assert not lost_kept, f"agents that did not lapse lost their registration: {lost_kept[:10]}"
        assert not added_standby, f"standby agents were registered: {added_standby}"
        assert not {f"standby-{i}" for i in range(3)} & await _listed(client)
        assert set(lapsing) <= await _listed(client)  # and they stay, beating again
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await host.stop()
        await client.close()
        await etcd.close()


async def _all_listed(client: MeshClient, wanted: set[str]) -> bool:
    return wanted <= await _listed(client)
