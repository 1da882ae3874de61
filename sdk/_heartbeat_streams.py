"""The pieces of an AgentHost's heartbeat streams that are not the host: which stream an agent beats
on, how many beats it may have in flight, how a stream paces and waits.

:mod:`mabeam._agent_host` opens a Heartbeat stream per :data:`AGENTS_PER_STREAM` agents
(gRPC reads and writes one message of a stream at a time), sends each agent's beat every
TTL/3, about :data:`HEARTBEAT_CHUNK` at a time host-wide, and holds an agent's next beat back
while :data:`IN_FLIGHT` of its beats are unanswered. :class:`DueBeats` are the beats sent
before their agent's turn: after a held beat's answer.
"""

from __future__ import annotations

import asyncio
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


def stream_of(agent_id: str, parts: int) -> int:
    """The heartbeat stream (0 .. parts - 1) an agent always beats on."""
    return zlib.crc32(agent_id.encode()) % parts


class DueBeats:
    """The beats of one heartbeat stream that go out before their agent's turn in the next round.

    An agent whose turn passed while its last beat was unanswered (:meth:`held`) is due once
    that beat is answered (:meth:`answered`): waiting for its next turn added up to a round to
    a slow answer, and the gap between two refreshes outgrew the TTL. The stream sends them
    between its chunks and after its round (:meth:`take`, :meth:`wait`). One per stream, as the
    beats in flight are; bounded by the stream's agents. (A first beat at once after a
    registration answered later than a round was tried and dropped: with 10,000 agents
    registering, the early beats competed with the registrations, which took 50-135 s instead
    of 23 s; see docs/decisions.md.)
    """

    def __init__(self) -> None:
        self._due: set[str] = set()
        self._held: set[str] = set()
        self._wake = asyncio.Event()

    def held(self, agent_id: str) -> None:
        """The agent's turn came while its last beat was unanswered: beat it once answered."""
        self._held.add(agent_id)

    def answered(self, agent_id: str) -> None:
        """The agent's beat was answered: due now if its turn passed meanwhile."""
        if agent_id in self._held:
            self._held.discard(agent_id)
            self._due.add(agent_id)
            self._wake.set()

    def sent(self, agent_id: str) -> None:
        """The agent's beat went out."""
        self._due.discard(agent_id)
        self._held.discard(agent_id)

    def take(self) -> list[str]:
        """The agents due now (no longer due after)."""
        self._wake.clear()
        due, self._due = sorted(self._due), set()
        return due

    async def wait(self, ended: asyncio.Event, seconds: float) -> bool:
        """Wait ``seconds``, less if ``ended`` is set or an agent is due; whether ``ended`` is."""
        if seconds > 0 and not ended.is_set() and not self._wake.is_set():
            waits = {asyncio.ensure_future(ended.wait()), asyncio.ensure_future(self._wake.wait())}
            try:
                await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()
        return ended.is_set()
