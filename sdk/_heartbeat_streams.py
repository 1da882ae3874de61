"""The pieces of an AgentHost's heartbeat streams that are not the host: which stream an agent beats
on, how many beats it may have in flight, how a stream paces and waits.

:mod:`mabeam._agent_host` opens a Heartbeat stream per :data:`AGENTS_PER_STREAM` agents
(gRPC reads and writes one message of a stream at a time), sends each agent's beat every
TTL/3, about :data:`HEARTBEAT_CHUNK` at a time host-wide, and holds an agent's next beat back
while :data:`IN_FLIGHT` of its beats are unanswered.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections import deque

# Beats an AgentHost sends together before it paces the rest of the interval's beats.
HEARTBEAT_CHUNK = 50

# Beats of one agent an AgentHost has unanswered at most before it holds the next back: one
# (measured against two and three under load: docs/decisions.md, "Registry").
IN_FLIGHT = 1

# Agents per Heartbeat stream: a host of more opens several (at most MAX_STREAMS), each agent
# always on the same one. A host of 10,000 agents on 157 streams spent its time pacing them.
AGENTS_PER_STREAM = 64
MAX_STREAMS = 16


def oldest(unanswered: dict[str, deque[float]], agent_id: str) -> float | None:
    """Take the send time of the agent's oldest beat in flight (what an answer answers)."""
    sent = unanswered.get(agent_id)
    if not sent:
        return None
    sent_at = sent.popleft()
    if not sent:
        del unanswered[agent_id]
    return sent_at


def streams_for(agents: int) -> int:
    """How many Heartbeat streams a host of ``agents`` agents opens."""
    return max(1, min(MAX_STREAMS, -(-agents // AGENTS_PER_STREAM)))


async def pause(ended: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` (none when <= 0), less if ``ended`` is set meanwhile; whether it is."""
    if seconds > 0 and not ended.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended.wait(), seconds)
    return ended.is_set()


def stream_of(agent_id: str, parts: int) -> int:
    """The heartbeat stream (0 .. parts - 1) an agent always beats on."""
    return zlib.crc32(agent_id.encode()) % parts
