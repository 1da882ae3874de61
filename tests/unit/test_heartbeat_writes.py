"""When a beat's load is stored at once (before the TTL/2 refresh): not on every wobble of memory."""

from __future__ import annotations

from mabeam.services.registry.heartbeats import _memory_moved
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
