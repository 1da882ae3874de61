"""A mesh across three "hosts" (Linux network namespaces on one bridge), and a host cut off and healed.

The lab (``harness.netns``) and the mesh on it (``harness.multihost``): each
host runs an etcd member, one replica of every service and an AgentHost, all
bound to the host's own address, with TLS and auth on; the test's clients run
in a fourth namespace (``client``) or on the hosts, never in the test process,
which is not on the lab's bridge. Needs root (CI has it); skipped elsewhere
with the reason.

* ``test_a_mesh_across_three_hosts``: every replica is in discovery with its
  own host's address, every registry lists every host's agents at their
  hosts' addresses, ``mabeam status`` from the client namespace sees the three
  etcd members, an auction among every host's agents decides, and a goal runs
  its steps on agents of three hosts.
* ``test_one_host_cut_off_and_healed``: under compare-and-set increments from
  a client on every host, one host (not etcd's leader) is cut off, held,
  healed. Checked: every acknowledged increment is in the final value and
  none twice (the acknowledged values are exactly 1..final); the cut host's
  orchestrator refuses writes with a status naming the cause while its
  relaxed reads answer (stale, and saying so); the cut host's agents are gone
  from the majority's listings within TTL + 1 s; after healing, every replica
  is in discovery again, every registry lists every agent and the cut host's
  writes are acknowledged again, within CONVERGE_WITHIN_S; a goal in flight
  on the cut host's agents succeeds on the majority's. The figures are
  printed in pytest's summary ("reports"). ``[leader]`` cuts etcd's leader's
  host instead: an expected failure for now (the cut host's agents stayed
  listed about 30 s; docs/multihost.md).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from harness.multihost import AGENT_TTL, MultiHostMesh
from harness.netns import NetworkLab, require_netns
from harness.wait import eventually
from mabeam.config import SERVICES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

GONE_WITHIN_S = AGENT_TTL + 1.0  # the cut host's agents leave the majority's listings
CONVERGE_WITHIN_S = 30.0  # after healing: every replica, every agent, the cut host's writes back
COUNTER = "multihost/counter"
STEP_TIMEOUT = "8s"  # one attempt of a step of the goal in flight at the cut


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[MultiHostMesh]:
    require_netns()
    async with NetworkLab(tmp_path, hosts=3) as lab:
        mesh = MultiHostMesh(lab, tmp_path)
        try:
            await mesh.start()
            yield mesh
        finally:
            await lab.stop_all()


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:  # a line being written
            continue
    return lines


async def test_a_mesh_across_three_hosts(mesh: MultiHostMesh, tmp_path: Path) -> None:
    every_agent = {a for h in mesh.hosts for a in mesh.agent_ids(h)}

    async def all_listed() -> dict[str, Any] | None:
        found = await mesh.client("discover", "--etcd", mesh.etcd_urls)
        listed = [set(v) for v in found["agents"].values() if "code" not in v]
        return found if len(listed) == len(mesh.hosts) and all(s == every_agent for s in listed) else None

    found = await eventually(all_listed, timeout=60, interval=1, what="every registry lists every agent")
    # Every replica in discovery, at its own host's address.
    for kind in SERVICES:
        assert found["services"][kind] == sorted(mesh.address(h, kind) for h in mesh.hosts), kind
    # Each agent at its own host's address, as every registry replica says.
    for listing in found["agents"].values():
        for host in mesh.hosts:
            for agent_id in mesh.agent_ids(host):
                assert listing[agent_id].startswith(f"{mesh.lab.address(host)}:"), (
                    agent_id,
                    listing[agent_id],
                )

    # `mabeam status` from the client namespace: the three etcd members, one leader, no alarm.
    status = await mesh.etcd_status()
    members = status["etcd"]["members"]
    assert sorted(m["endpoint"] for m in members) == sorted(mesh.etcd_url(h) for h in mesh.hosts), members
    assert all("error" not in m for m in members), members
    assert sum(bool(m["leader"]) for m in members) == 1 and status["etcd"]["alarms"] == [], status["etcd"]
    # ... and every replica of every service, each at its own host's address, SERVING (over TLS).
    for kind in SERVICES:
        rows = status["replicas"][kind]
        assert sorted(r["address"] for r in rows) == sorted(mesh.address(h, kind) for h in mesh.hosts), rows
        assert all(r["serving"] for r in rows), rows

    # An auction among every host's agents decides, none left out.
    auction = await mesh.client("auction", "--etcd", mesh.etcd_urls, "--capability", "bid")
    assert auction["decided"] and auction["state"] == "SESSION_STATE_DECIDED", auction
    assert set(auction["participants"]) == every_agent and not auction["excluded"], auction
    assert len(auction["winners"]) == 1 and auction["winners"][0] in every_agent, auction

    # A goal whose steps must run on three hosts (a step per host's capability), fed forward.
    goal_file = tmp_path / "goal.yaml"
    goal_file.write_text(
        "name: across-hosts\n"
        "strategy: least_loaded\n"
        "steps:\n"
        "  - {id: left, capability: on-h0, input: {values: [1, 2, 3]}}\n"
        "  - {id: right, capability: on-h1, input: {values: [10, 20]}}\n"
        "  - {id: total, capability: on-h2, input: {values: [100]}, depends_on: [left, right]}\n"
    )
    goal = await mesh.client(
        "goal", "--etcd", mesh.etcd_urls, "--file", str(goal_file), "--id", "across-hosts"
    )
    assert goal["state"] == "GOAL_STATE_SUCCEEDED", goal
    steps = goal["steps"]
    assert {s: steps[s]["output"]["host"] for s in steps} == {"left": "h0", "right": "h1", "total": "h2"}, (
        steps
    )
    assert steps["total"]["output"]["sum"] == 136, steps


@pytest.mark.parametrize(
    "which",
    [
        "follower",
        pytest.param(
            "leader",
            marks=pytest.mark.xfail(
                reason="with etcd's leader's host cut, that host's agents left the majority's listings "
                "after 7.4-8.05 s (TTL + 1 = 6 s): a new leader extends every lease by an election "
                "timeout (docs/multihost.md)",
                strict=False,
            ),
        ),
    ],
)
async def test_one_host_cut_off_and_healed(
    mesh: MultiHostMesh, tmp_path: Path, record_property: Any, which: str
) -> None:
    every_agent = {a for h in mesh.hosts for a in mesh.agent_ids(h)}
    leader = await mesh.leader()
    victim = leader if which == "leader" else [h for h in mesh.hosts if h != leader][-1]
    majority = [h for h in mesh.hosts if h != victim]
    stop = tmp_path / "stop"
    out = tmp_path / "observations"
    out.mkdir()

    # Every registry's listing, watched on its own host (the cut host's too); CAS increments from every host.
    for host in mesh.hosts:
        await mesh.spawn_client(
            f"listing-{host}",
            "listing", "--registry", mesh.address(host, "registry"),
            "--out", str(out / f"listing-{host}.jsonl"), "--stop", str(stop),
            host=host,
        )  # fmt: skip
    cas_clients = {}
    for host in mesh.hosts:
        cas_clients[host] = await mesh.spawn_client(
            f"cas-{host}",
            "cas", "--orchestrator", mesh.address(host, "orchestrator"), "--name", COUNTER,
            "--client", f"cas-{host}", "--out", str(out / f"cas-{host}.jsonl"), "--stop", str(stop),
            host=host,
        )  # fmt: skip

    def acks(host: str, after: float = 0.0) -> list[dict[str, Any]]:
        return [o for o in read_lines(out / f"cas-{host}.jsonl") if o["op"] == "ack" and o["t"] > after]

    def listings(host: str, after: float = 0.0) -> list[dict[str, Any]]:
        return [o for o in read_lines(out / f"listing-{host}.jsonl") if o["t"] > after]

    await eventually(
        lambda: all(acks(h) for h in mesh.hosts),
        timeout=60,
        interval=0.5,
        what="every host's client increments",
    )
    await eventually(
        lambda: all(listings(h) and set(listings(h)[-1].get("ids", ())) == every_agent for h in mesh.hosts),
        timeout=30,
        interval=0.5,
        what="every registry lists every agent before the cut",
    )

    # A goal in flight on every host's agents when the cut comes (through a planner of the majority).
    goal_file = tmp_path / "during-cut.yaml"
    goal_file.write_text(
        "name: during-cut\nstrategy: auction\nmax_parallelism: 6\nmax_attempts: 3\nsteps:\n"
        + "".join(
            f"  - {{id: s{n}, capability: prefer-{victim}, input: {{values: [{n}], sleep: 3}},"
            f" timeout: {STEP_TIMEOUT}}}\n"
            for n in range(6)
        )
    )
    victim_log = mesh.log_of(f"{victim}/agents")
    started_before = victim_log.read_text().count("started on")
    planner = mesh.address(majority[0], "planner")
    goal_args = ["goal", "--planner", planner, "--file", str(goal_file), "--id", "during-cut"]
    goal_task = asyncio.create_task(mesh.client(*goal_args, timeout=180))
    try:
        await eventually(
            lambda: victim_log.read_text().count("started on") > started_before,
            timeout=60,
            interval=0.1,
            what=f"a step of the goal running on {victim}",
        )
    except BaseException:
        goal_task.cancel()
        await asyncio.gather(goal_task, return_exceptions=True)
        raise

    # -- the cut --------------------------------------------------------------------------
    cut_at = time.time()
    await mesh.lab.cut(victim)
    victims_agents = set(mesh.agent_ids(victim))

    def gone_from(host: str) -> float | None:
        """When ``host``'s registry first listed none of the victim's agents (and still does not)."""
        seen = listings(host, cut_at)
        for i, obs in enumerate(seen):
            if "ids" in obs and not victims_agents & set(obs["ids"]):
                if all("ids" in later and not victims_agents & set(later["ids"]) for later in seen[i:]):
                    return float(obs["t"]) - cut_at
        return None

    await eventually(
        lambda: all(gone_from(h) is not None for h in majority),
        timeout=GONE_WITHIN_S + 20,
        interval=0.5,
        what=f"{victim}'s agents gone from the majority's listings",
    )
    gone_after = {h: gone_from(h) for h in majority}
    # Asserted where it is measured: the leader's case fails here (xfail) instead of after the
    # goal and the heal (two more minutes), which the follower's case runs through.
    assert all(v is not None and v <= GONE_WITHIN_S for v in gone_after.values()), gone_after
    # The majority keeps acknowledging writes meanwhile.
    await eventually(
        lambda: all(acks(h, cut_at + GONE_WITHIN_S) for h in majority),
        timeout=30,
        interval=0.5,
        what="the majority's clients still increment during the cut",
    )
    # The minority: writes refused with a status saying why; relaxed reads answer (stale, and say so).
    await eventually(
        lambda: [
            o
            for o in read_lines(out / f"cas-{victim}.jsonl")
            if o["op"] == "refused" and o["t"] > cut_at + 2 and o["call"] == "SetVariable"
        ],
        timeout=30,
        interval=0.5,
        what=f"{victim}'s writes refused during the cut",
    )
    acked_on_victim_during_cut = acks(victim, cut_at + 2)  # a write sent before the cut may land at once
    relaxed = await mesh.client(
        "read", "--orchestrator", mesh.address(victim, "orchestrator"), "--name", COUNTER,
        "--consistency", "relaxed", host=victim,
    )  # fmt: skip
    strong = await mesh.client(
        "read", "--orchestrator", mesh.address(victim, "orchestrator"), "--name", COUNTER,
        "--consistency", "strong", host=victim,
    )  # fmt: skip
    victim_listing_during_cut = listings(victim, cut_at + GONE_WITHIN_S)
    # The goal: the steps cut off on the victim ran again elsewhere, and it succeeded.
    goal = await asyncio.wait_for(goal_task, 200)

    # -- the heal -------------------------------------------------------------------------
    healed_at = time.time()
    await mesh.lab.heal(victim)

    async def converged() -> bool:
        if not all(
            listings(h, healed_at) and set(listings(h)[-1].get("ids", ())) == every_agent for h in mesh.hosts
        ):
            return False
        if not acks(victim, healed_at):
            return False
        found = await mesh.client("discover", "--etcd", mesh.etcd_urls)
        return all(found["services"][k] == sorted(mesh.address(h, k) for h in mesh.hosts) for k in SERVICES)

    await eventually(
        converged, timeout=CONVERGE_WITHIN_S + 60, interval=0.5, what="the mesh converged after the heal"
    )
    converged_after = time.time() - healed_at

    # -- the end: every acknowledged increment once ------------------------------------------
    stop.write_text("stop")
    for host, proc in cas_clients.items():
        code = await asyncio.wait_for(proc.wait(), 60)
        assert code == 0, (host, (tmp_path / "logs" / "clients" / f"cas-{host}.log").read_text()[-3000:])
    final = await mesh.client(
        "read", "--orchestrator", mesh.address(majority[0], "orchestrator"), "--name", COUNTER
    )
    done = {h: [o for o in read_lines(out / f"cas-{h}.jsonl") if o["op"] == "done"][-1] for h in mesh.hosts}
    acked_values = sorted(o["value"] for h in mesh.hosts for o in acks(h))
    refusals: dict[str, int] = {}
    for o in read_lines(out / f"cas-{victim}.jsonl"):
        if o["op"] == "refused" and o["t"] > cut_at and o["t"] < healed_at:
            key = f"{o['call']} {o['code']}: {o['message'][:120]}"
            refusals[key] = refusals.get(key, 0) + 1
    duplicates = [
        o
        for h in mesh.hosts
        for o in read_lines(out / f"listing-{h}.jsonl")
        if "ids" in o and len(o["ids"]) != len(set(o["ids"]))
    ]
    report: dict[str, Any] = {
        "victim": victim,
        "etcd_leader": leader,
        "gone_from_majority_s": {h: round(v or -1, 2) for h, v in gone_after.items()},
        "converged_after_heal_s": round(converged_after, 2),
        "acked": {h: done[h]["acked"] for h in mesh.hosts},
        "lost_races": {h: done[h]["lost_races"] for h in mesh.hosts},
        "indeterminate": {h: done[h]["indeterminate"] for h in mesh.hosts},
        "final_value": final.get("value"),
        "victim_refusals_during_cut": refusals,
        "victim_acks_during_cut": len(acked_on_victim_during_cut),
        "goal_during_cut": {
            "state": goal["state"],
            "retried_steps": sorted(k for k, v in goal["steps"].items() if v["attempts"] > 1),
            "ran_on": sorted({(v["output"] or {}).get("host", "?") for v in goal["steps"].values()}),
        },
        "victim_relaxed_read": relaxed,
        "victim_strong_read": strong,
        # What the cut host's own registry answered, at the end of the cut.
        "victim_registry_during_cut": (
            {k: v for k, v in victim_listing_during_cut[-1].items() if k != "t"}
            if victim_listing_during_cut
            else None
        ),
    }
    record_property(
        "report",
        f"multihost partition (the {which}'s host cut, healed): {json.dumps(report, sort_keys=True)}",
    )

    assert not duplicates, duplicates[:3]
    assert sum(report["indeterminate"].values()) == 0, report
    assert final.get("value") == len(acked_values), (final, len(acked_values))
    assert acked_values == list(range(1, len(acked_values) + 1)), "an increment acknowledged twice or lost"
    assert not acked_on_victim_during_cut, f"{victim} acknowledged writes while cut off"
    assert refusals and all(" UNAVAILABLE" in k or " DEADLINE_EXCEEDED" in k for k in refusals), refusals
    assert "error" not in relaxed and relaxed["possibly_stale"] and relaxed["value"] > 0, relaxed
    assert "error" in strong, strong
    assert converged_after <= CONVERGE_WITHIN_S, report
    assert goal["state"] == "GOAL_STATE_SUCCEEDED", goal
    assert victim not in report["goal_during_cut"]["ran_on"] and report["goal_during_cut"]["retried_steps"], (
        report
    )
