"""An agent's inbox: messages delivered by ``AgentService.Deliver``, handed to ``Agent.on_message`` in order.

==================  ==============================================================
bound               value
==================  ==============================================================
inbox               ``Agent.inbox_size`` messages (default :data:`INBOX_SIZE`);
                    a full inbox refuses a message with RESOURCE_EXHAUSTED
dedupe window       the last :data:`DEDUPE_WINDOW` (sender_id, message_id) pairs
                    the agent took; one seen again is acknowledged as a
                    duplicate and not handed over twice
message size        :data:`MAX_MESSAGE_BYTES` serialized, else INVALID_ARGUMENT
==================  ==============================================================

One task per agent (started at its first message, cancelled with its host)
takes the messages one at a time in arrival order, so messages accepted one
after another are handled in that order. A handler that raises is logged and
the next message is taken: the message counts as delivered (it reached the
inbox); a message refused for a full inbox is not remembered, so the
sender's resend is taken once there is room.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING

from mabeam import errors
from mabeam.v1 import agent_pb2, common_pb2

if TYPE_CHECKING:
    from mabeam.agent import Agent

log = logging.getLogger("mabeam.agent.inbox")
INBOX_SIZE = 1000
DEDUPE_WINDOW = 4096
MAX_MESSAGE_BYTES = 64 * 1024


class Inbox:
    """The bounded inbox of one agent, with its dedupe window and its consumer task."""

    def __init__(self, agent: Agent, size: int = INBOX_SIZE, window: int = DEDUPE_WINDOW) -> None:
        self._agent = agent
        self._queue: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue(max(1, size))
        self._seen: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._window = window
        self._consuming = False
        self.handled = 0
        self.failed = 0

    def __len__(self) -> int:
        return self._queue.qsize()

    def offer(self, message: agent_pb2.AgentMessage) -> bool:
        """Queue ``message``; True when it was a duplicate (not queued). RESOURCE_EXHAUSTED when full."""
        agent = self._agent
        if not agent.takes_messages:
            raise errors.Unimplemented(f"agent {agent.agent_id!r} takes no messages (no on_message)")
        size = message.ByteSize()
        if size > MAX_MESSAGE_BYTES:
            raise errors.InvalidArgument("message", f"is {size} bytes, over the limit of {MAX_MESSAGE_BYTES}")
        key = (message.sender_id, message.message_id)
        if key in self._seen:
            return True
        if self._queue.full():
            raise errors.ResourceExhausted(
                f"agent {agent.agent_id!r}'s inbox is full ({self._queue.maxsize} messages)",
                reason=common_pb2.ERROR_REASON_CONSTRAINT_VIOLATED,
            )
        self._queue.put_nowait(message)
        self._seen[key] = None
        while len(self._seen) > self._window:
            self._seen.popitem(last=False)
        if not self._consuming and agent.host is not None:
            self._consuming = True
            agent.host.spawn(self._consume(), name=f"inbox:{agent.agent_id}")
        return False

    async def _consume(self) -> None:
        agent = self._agent
        try:
            while True:
                message = await self._queue.get()
                agent.in_flight += 1
                try:
                    await agent.on_message(message)
                    self.handled += 1
                except Exception:
                    self.failed += 1
                    log.exception("agent %s: on_message failed on %s", agent.agent_id, message.message_id)
                finally:
                    agent.in_flight -= 1
        finally:
            self._consuming = False
