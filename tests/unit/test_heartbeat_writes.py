"""Heartbeat bookkeeping: when a load is stored at once, how loads share writes, which token checks are kept."""

from __future__ import annotations

import asyncio

import pytest

from mabeam.services.registry.heartbeats import LoadWriter, VerifiedTokens, _memory_moved
from mabeam.v1 import common_pb2

MIB = 1 << 20


def test_an_agents_own_memory_counts_when_it_moves_by_a_mebibyte_and_a_tenth() -> None:
    stored = common_pb2.AgentLoad(memory_bytes=100 * MIB)
    assert not _memory_moved(stored, common_pb2.AgentLoad(memory_bytes=105 * MIB))
    assert _memory_moved(stored, common_pb2.AgentLoad(memory_bytes=111 * MIB))
    assert _memory_moved(
        common_pb2.AgentLoad(memory_bytes=2 * MIB), common_pb2.AgentLoad(memory_bytes=4 * MIB)
    )


def test_a_process_shared_by_many_agents_never_triggers_a_write() -> None:
    """An AgentHost's RSS is on each of its agents' beats: its moving must not rewrite 1,000 loads at once
    (the 1,000-agent load test lost 426 leases to that burst)."""
    stored = common_pb2.AgentLoad(memory_bytes=100 * MIB, shared_process=True)
    assert not _memory_moved(stored, common_pb2.AgentLoad(memory_bytes=300 * MIB, shared_process=True))


def test_a_replica_keeps_two_token_checks_per_agent_and_drops_the_oldest_agents_first() -> None:
    """A migrating agent's two instances beat with two tokens: both checks are kept (one kept check
    made them re-check every beat, in turn); a token change forgets both; past the cap, the agents
    checked longest ago go, not every check at once."""
    tokens = VerifiedTokens()
    tokens.put("a", "old", (1, 5.0, 1), agents=1, epoch=tokens.epoch)
    tokens.put("a", "new", (1, 5.0, 1), agents=1, epoch=tokens.epoch)
    assert tokens.get("a", "old") == tokens.get("a", "new") == (1, 5.0, 1)
    tokens.put("a", "third", (2, 5.0, 2), agents=1, epoch=tokens.epoch)
    assert tokens.get("a", "old") is None and tokens.get("a", "new") == (1, 5.0, 1)
    assert tokens.get("a", "nope") is None
    stale = tokens.epoch
    tokens.forget("a")
    assert tokens.get("a", "new") is None and tokens.get("a", "third") is None
    tokens.put("a", "new", (1, 5.0, 1), agents=1, epoch=stale)  # read before the change: not kept
    assert tokens.get("a", "new") is None
    for i in range(1030):
        tokens.put(f"x{i}", "t", (i, 5.0, 1), agents=1, epoch=tokens.epoch)
    # The cap is 2 x agents + 1,024 = 1,026: the four oldest went, the rest stay.
    assert [tokens.get(f"x{i}", "t") is None for i in range(6)] == [True] * 4 + [False] * 2
    assert tokens.get("x1029", "t") == (1029, 5.0, 1)


class HeldStore:
    """Stands in for RegistryStore.put_loads: records each batch and holds it until released."""

    def __init__(self) -> None:
        self.batches: list[dict[str, float]] = []
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def put_loads(self, loads: dict[str, tuple[common_pb2.AgentLoad, int]]) -> dict[str, bool]:
        self.batches.append({a: load.load for a, (load, _) in loads.items()})
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return {a: a != "gone" for a in loads}


async def settle() -> None:
    """Let the tasks just created run up to their next wait (no time passes)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_loads_written_while_one_write_is_in_flight_go_together_and_the_newest_wins() -> None:
    store = HeldStore()
    writer = LoadWriter(store)  # type: ignore[arg-type]

    def write(agent_id: str, load: float) -> asyncio.Task[bool]:
        return asyncio.create_task(writer.write(agent_id, common_pb2.AgentLoad(load=load), 7))

    first = write("a", 0.1)
    await settle()
    assert store.batches == [{"a": 0.1}]  # alone, at once
    rest = [write("b", 0.2), write("gone", 0.3), write("b", 0.4)]
    await settle()
    store.release.set()
    assert await first is True
    assert [await t for t in rest] == [True, False, True]
    assert store.batches == [{"a": 0.1}, {"b": 0.4, "gone": 0.3}]  # together; b's newer load
    # A failed transaction fails every beat of its batch; a cancelled beat does not cancel the write.
    store.release.clear()
    store.fail = RuntimeError("etcd unreachable")
    failing = [write("c", 0.5), write("d", 0.6)]
    await settle()
    failing[0].cancel()
    store.release.set()
    with pytest.raises(RuntimeError, match="unreachable"):
        await failing[1]
    assert store.batches[-1] == {"c": 0.5, "d": 0.6}  # both came before the flush began
    # Closed: writes waiting are not answered (their stream is gone).
    store.release.clear()
    store.fail = None
    held = write("e", 0.7)
    await settle()
    await writer.close()
    with pytest.raises(asyncio.CancelledError):
        await held
