"""What an AgentHost reports of its own process in heartbeats, and the node it declares.

:class:`ProcessUsage` measures this process with the standard library alone
(the SDK takes no dependency for it): resident memory from
``/proc/self/statm`` (Linux; elsewhere the peak RSS of ``resource.getrusage``,
0 where neither exists) and CPU time (``os.times``) over wall time since the
previous sample, one core = 1.0. An AgentHost takes one sample per heartbeat
round and puts it on every agent's beat whose :meth:`mabeam.agent.Agent.load`
left ``memory_bytes`` and ``cpu_fraction`` at 0, with ``shared_process`` set
when the host serves more than one agent (it cannot measure per agent: the
figures are the process's, not to be added up).

:func:`node_name` is the node an AgentHost declares at registration
(``RegisterAgentRequest.node``): ``$MABEAM_NODE_NAME`` (a supervisor sets it to
its own node for the processes it starts), else the host name.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from mabeam.v1 import common_pb2

NODE_NAME_ENV = "MABEAM_NODE_NAME"


def node_name() -> str:
    """``$MABEAM_NODE_NAME``, else the host name made an identifier ([A-Za-z0-9._:-], at most 128)."""
    given = os.environ.get(NODE_NAME_ENV)
    name = given or socket.gethostname()
    return "".join(c if c.isalnum() or c in "._:-" else "-" for c in name)[:128] or "localhost"


def _rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError):
        return 0


class ProcessUsage:
    """This process's RSS and CPU fraction, the CPU averaged between two samples."""

    def __init__(self) -> None:
        self._last = (time.monotonic(), self._cpu())
        self._result: tuple[int, float] = (0, 0.0)

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system

    def sample(self, at_most_every: float = 0.0) -> tuple[int, float]:
        """(RSS bytes, CPU fraction since the previous sample); within ``at_most_every`` seconds of
        the previous sample, that one again (several callers a round: a CPU fraction over a few
        milliseconds is 0 or a spike of tens of cores, os.times() counting in 10 ms steps)."""
        now, cpu = time.monotonic(), self._cpu()
        then, cpu_then = self._last
        if now - then < at_most_every:
            return self._result
        self._last = (now, cpu)
        fraction = max(0.0, (cpu - cpu_then) / (now - then)) if now > then else 0.0
        self._result = (_rss(), round(fraction, 4))
        return self._result


def fill(load: common_pb2.AgentLoad, rss: int, cpu: float, shared: bool) -> common_pb2.AgentLoad:
    """``load`` with the process's figures where the agent reported none."""
    if not load.memory_bytes and not load.cpu_fraction:
        load.memory_bytes, load.cpu_fraction, load.shared_process = rss, cpu, shared
    return load
