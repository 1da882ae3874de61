"""``python -m mabeam.run_agent package.module:callable [ARG ...]``: serve agents from an entry point.

The callable gets the arguments as strings and returns an :class:`~mabeam.agent.Agent`,
a list of agents, or an :class:`~mabeam.agent.AgentHost`. With ``MABEAM_STANDBY=1``
(set by the supervisor for a migration target) the agents are served but not
registered until their state is imported. The mesh's address
comes from ``MABEAM_REGISTRY`` / ``MABEAM_ETCD``; a supervisor sets them, and
``MABEAM_AGENT_ID``. With ``MABEAM_READY_FILE`` set (by whoever started the
process and waits for it) the host writes ``{"address", "pid"}`` there once
it serves (``AgentHost.serve``, which every agent program goes through,
commands as well as entry points).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import sys
from typing import Any

from mabeam.agent import Agent, AgentHost


async def _main(target: str, args: list[str]) -> None:
    module_name, _, attr = target.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    made: Any = factory(*args)
    if inspect.isawaitable(made):
        made = await made
    agents: list[Agent] = (
        [] if isinstance(made, AgentHost) else [made] if isinstance(made, Agent) else list(made)
    )
    host = made if isinstance(made, AgentHost) else AgentHost([])
    # A migration target (MABEAM_STANDBY=1) serves its agents without registering
    # them: each takes its registration over when its state is imported.
    standby = os.environ.get("MABEAM_STANDBY") == "1"
    for agent in agents:
        host.add(agent, register=not standby)
    await host.serve()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or ":" not in argv[0]:
        print("usage: python -m mabeam.run_agent package.module:callable [ARG ...]", file=sys.stderr)
        return 2
    logging.basicConfig(level=os.environ.get("MABEAM_LOG_LEVEL", "WARNING"), stream=sys.stderr)
    asyncio.run(_main(argv[0], argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
