"""Which beats of a heartbeat stream go out before their agent's turn in the next round (DueBeats)."""

from __future__ import annotations

import asyncio

from mabeam._heartbeat_streams import DueBeats


async def test_a_held_agent_is_due_once_its_beat_is_answered_unless_it_beat_meanwhile() -> None:
    due = DueBeats()
    due.answered("x")  # never held: its turn did not pass
    assert due.take() == []
    due.held("x")
    due.held("y")
    due.sent("y")  # beat with its round after all: no longer held
    due.answered("y")
    due.answered("x")
    assert due.take() == ["x"]
    due.answered("x")  # answered again: held once, due once
    assert due.take() == []


async def test_waiting_ends_with_the_stream_or_the_round() -> None:
    due = DueBeats()
    ended = asyncio.Event()
    assert await due.wait(ended, 0.0) is False  # the round is over: no wait
    waiting = asyncio.create_task(due.wait(ended, 30.0))
    await asyncio.sleep(0)  # one loop pass: the task is now waiting (no time passes)
    ended.set()
    assert await asyncio.wait_for(waiting, 5) is True
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]


async def test_a_held_agent_is_due_at_once_and_wakes_its_stream() -> None:
    due = DueBeats()
    due.held("a")
    waiting = asyncio.create_task(due.wait(asyncio.Event(), 30.0))
    await asyncio.sleep(0)  # one loop pass: the task is now waiting (no time passes)
    due.answered("a")
    assert await asyncio.wait_for(waiting, 5) is False  # woken, long before the 30 s round
    assert due.take() == ["a"] and due.take() == []
