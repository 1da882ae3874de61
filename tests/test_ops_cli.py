"""`mabeam status|agents|vars|sessions|auction`, as an operator runs them (tables and --json)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from harness.cli import mabeam
from harness.wait import eventually
from mabeam.client import MeshClient
from mabeam.server import MeshServer
from mabeam.v1 import common_pb2, orchestrator_pb2, registry_pb2

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def flags(service: Callable[..., Awaitable[MeshServer]]) -> AsyncIterator[list[str]]:
    servers = {kind: await service(kind) for kind in ("registry", "orchestrator", "coordination", "planner")}
    bidders = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "examples" / "bidder.py"),
            "--id",
            f"b{value}",
            "--value",
            str(value),
            "--registry",
            servers["registry"].address,
            stdout=asyncio.subprocess.DEVNULL,
        )
        for value in (10, 30)
    ]
    client = await MeshClient.connect(registry=servers["registry"].address)

    async def ready() -> bool:
        page = await client.registry.ListAgents(registry_pb2.ListAgentsRequest(capability="bid"))
        return len(page.agents) == 2

    await eventually(ready, timeout=20, what="bidders registered")
    await client.close()
    yield [arg for kind, s in servers.items() for arg in (f"--{kind}", s.address)]
    for b in bidders:
        b.terminate()
        await b.wait()


async def test_status_agents_vars_auction_sessions(flags: list[str]) -> None:
    code, out, _ = await mabeam("status", *flags)
    assert code == 0 and out.count("SERVING") == 4 and "agents=2" in out
    code, out, _ = await mabeam("status", *flags, "--json")
    doc = json.loads(out)
    assert doc["counts"]["agents"] == 2 and all(s["serving"] for s in doc["services"].values())

    code, out, _ = await mabeam("agents", *flags, "--capability", "bid")
    assert code == 0 and "b10" in out and "b30" in out and "SERVING" in out
    code, out, _ = await mabeam("agents", *flags, "--json")
    assert {a["agent_id"] for a in json.loads(out)} == {"b10", "b30"}

    code, out, _ = await mabeam("vars", *flags, "set", "room/temp", "21.5")
    assert code == 0 and "room/temp = 21.5 (version 1)" in out
    code, out, err = await mabeam("vars", *flags, "set", "room/temp", "22", "--expected-version", "7")
    assert code == 1 and "ABORTED" in err and "version 1" in err
    code, out, _ = await mabeam("vars", *flags, "get", "room/temp", "--json")
    assert json.loads(out)["value"]["number_value"] == 21.5
    # The connection flags also after the nested subcommand, as people type them.
    code, out, err = await mabeam("vars", "get", "room/temp", *flags)
    assert code == 0 and "room/temp = 21.5" in out, err
    watch = asyncio.create_task(mabeam("vars", *flags, "watch", "room/", "--count", "1"))
    await mabeam("vars", *flags, "set", "room/light", "on", "--string")
    # The set may come before the watch is in place: set it again until the watch saw one.
    setter = await MeshClient.connect(
        registry=flags[flags.index("--registry") + 1], orchestrator=flags[flags.index("--orchestrator") + 1]
    )

    async def seen() -> bool:
        if watch.done():
            return True
        await setter.orchestrator.SetVariable(
            orchestrator_pb2.SetVariableRequest(name="room/light", value=common_pb2.Value(string_value="on"))
        )
        return False

    try:
        await eventually(seen, timeout=30, interval=0.2, what="vars watch saw a set")
    finally:
        await setter.close()
    code, out, _ = await watch
    assert code == 0 and 'room/light = "on"' in out

    code, out, _ = await mabeam("auction", *flags, "gpu", "--capability", "bid")
    assert code == 0 and "winner b30 at 10" in out
    code, out, _ = await mabeam("sessions", *flags)
    assert code == 0 and "vickrey" in out and "DECIDED" in out
    code, out, _ = await mabeam("sessions", *flags, "--json")
    assert json.loads(out)[0]["outcome"]["winners"] == ["b30"]


async def test_status_says_when_a_service_is_down(flags: list[str]) -> None:
    down = list(flags)
    down[down.index("--planner") + 1] = "127.0.0.1:9"
    code, out, _ = await mabeam("status", *down)
    assert code == 1 and "DOWN" in out and "goals=?" in out
