"""The leak detector (harness/leak_fixtures.py) fails a test that leaves a task or a child process behind."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent

LEAKY = """
import asyncio
import subprocess
import sys

import pytest

kept = []


async def test_leaves_a_task() -> None:
    kept.append(asyncio.create_task(asyncio.sleep(3600)))


def test_leaves_a_child_process() -> None:
    kept.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"]))


@pytest.fixture(scope="module")
async def long_lived() -> asyncio.Task[None]:
    task = asyncio.create_task(asyncio.sleep(3600))
    yield task
    task.cancel()


async def test_a_module_fixtures_task_is_allowed(long_lived: asyncio.Task[None]) -> None:
    assert not long_lived.done()


async def test_a_task_awaited_is_fine() -> None:
    task = asyncio.create_task(asyncio.sleep(3600))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
"""


@pytest.mark.timeout(90)
def test_a_leaked_task_or_process_fails_its_test(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["harness.leak_fixtures"]\n')
    pytester.makepyfile(test_leaky=LEAKY)
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-o",
        f"pythonpath={TESTS}",
        "-o",
        "asyncio_mode=auto",
        "-o",
        "asyncio_default_fixture_loop_scope=session",
        "-o",
        "asyncio_default_test_loop_scope=session",
        "-rE",
    )
    result.assert_outcomes(passed=4, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_a_task*",
            "*the test left behind*",
            "*task *sleep*",
            "*ERROR at teardown of test_leaves_a_child_process*",
            "*child process *time.sleep(3600)*",
        ]
    )
