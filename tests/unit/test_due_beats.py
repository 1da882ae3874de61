"""Which beats an AgentHost sends before their agent's turn in the next round (DueBeats)."""

from __future__ import annotations

import asyncio

from mabeam._heartbeat_streams import DueBeats


async def test_a_held_agent_is_due_once_its_beat_is_answered_unless_it_beat_meanwhile() -> None:
    due = DueBeats()
    due.answered("x", 0)  # never held: its turn did not pass
    assert due.take(0) == []
    due.held("x", 0)
    due.held("y", 0)
    due.sent("y", 0)  # beat with its round after all: no longer held
    due.answered("y", 0)
    due.answered("x", 0)
    assert due.take(0) == ["x"]
    due.answered("x", 0)  # answered again: held once, due once
    assert due.take(0) == []


async def test_waiting_ends_with_the_stream_or_the_round() -> None:
    due = DueBeats()
    ended = asyncio.Event()
    assert await due.wait(0, ended, 0.0) is False  # the round is over: no wait
    waiting = asyncio.create_task(due.wait(0, ended, 30.0))
    await asyncio.sleep(0)
    ended.set()
    assert await asyncio.wait_for(waiting, 5) is True
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]


async def test_a_held_agent_is_due_at_once_and_wakes_its_stream() -> None:
    due = DueBeats()
    due.held("a", 2)
    waiting = asyncio.create_task(due.wait(2, asyncio.Event(), 30.0))
    await asyncio.sleep(0)
    due.answered("a", 2)
    assert await asyncio.wait_for(waiting, 5) is False  # woken, long before the 30 s round
    assert due.take(2) == ["a"] and due.take(2) == []
