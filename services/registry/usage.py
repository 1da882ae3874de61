"""Measured resources of supervised agents: RSS and CPU of each process a replica runs.

While a supervised agent's process runs here, :func:`measure` samples it with
psutil every :data:`SAMPLE_INTERVAL_S` (the current process of the agent: a
migration's new one once it replaced the old) and stores the figures as an
``AgentLoad`` (``memory_bytes`` = RSS, ``cpu_fraction`` = CPU time used over
wall time since the previous sample, one core = 1.0, ``reported_at``) under
``P/agent-measured/<id>`` on the agent's lease (:mod:`.store`): only when they
moved (more than 1 MiB or 0.05 of a core) or every lease TTL/2, so a steady
agent costs an etcd write every few seconds, not every sample. Lookups show it
as ``Agent.measured``; ListNodes sums it per node and placement uses it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import psutil

from mabeam.v1 import common_pb2

if TYPE_CHECKING:
    from mabeam.services.registry.supervisor import Supervisor

log = logging.getLogger("mabeam.registry.usage")

SAMPLE_INTERVAL_S = 2.0
MEMORY_MOVED = 1 << 20
CPU_MOVED = 0.05


class ProcessSampler:
    """RSS and CPU fraction of one process, the CPU averaged between two samples."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._process = psutil.Process(pid)
        times = self._process.cpu_times()
        self._last = (time.monotonic(), times.user + times.system)

    def sample(self) -> common_pb2.AgentLoad:
        """The figures now (psutil.Error when the process is gone)."""
        with self._process.oneshot():
            rss = self._process.memory_info().rss
            times = self._process.cpu_times()
        now, cpu = time.monotonic(), times.user + times.system
        then, cpu_then = self._last
        self._last = (now, cpu)
        fraction = max(0.0, (cpu - cpu_then) / (now - then)) if now > then else 0.0
        figures = common_pb2.AgentLoad(memory_bytes=int(rss), cpu_fraction=round(fraction, 4))
        figures.reported_at.GetCurrentTime()
        return figures


def moved(old: common_pb2.AgentLoad | None, new: common_pb2.AgentLoad) -> bool:
    """Whether ``new`` differs from the stored ``old`` enough to be written."""
    return (
        old is None
        or abs(int(old.memory_bytes) - int(new.memory_bytes)) > MEMORY_MOVED
        or abs(old.cpu_fraction - new.cpu_fraction) > CPU_MOVED
    )


async def measure(sup: Supervisor, agent_id: str, interval: float = SAMPLE_INTERVAL_S) -> None:
    """Sample the agent's current process here and store the figures, until cancelled."""
    sampler: ProcessSampler | None = None
    last_put = 0.0
    while True:
        proc = sup.procs.get(agent_id)
        agent = sup.directory.agents.get(sup.store.keys.agent(agent_id))
        if proc is not None and proc.poll() is None and agent is not None:
            try:
                if sampler is None or sampler.pid != proc.pid:
                    sampler = ProcessSampler(proc.pid)  # its first CPU figure comes at the next sample
                else:
                    figures = sampler.sample()
                    ttl = agent.lease_ttl.seconds or 5
                    now = time.monotonic()
                    if moved(sup.directory.measured_of(agent_id), figures) or now - last_put > ttl / 2:
                        if await sup.store.put_measured(agent_id, figures, agent.lease_id):
                            last_put = now
            except psutil.Error:
                sampler = None  # gone: the supervision task sees the exit
            except Exception as exc:  # etcd unreachable: try at the next sample
                log.debug("measuring %s failed: %s", agent_id, exc)
        await asyncio.sleep(interval)
