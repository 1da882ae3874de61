"""Agents the planner starts for goals that may (``GoalSpec.may_start_agents``), and stops when idle.

A step whose capability no live agent offers, in a goal that allows it, makes
the planner ask the registry to start an agent of the launch catalog's kind
named like the capability (``StartAgent``, ``LaunchSpec.kind``, restart policy
temporary), with the planner's service credentials; the registry runs the
catalog's process (its ``LaunchPolicy`` decides, as for any caller) and
answers once the agent has registered. The planner then waits until the
registry's listing shows the agent and runs the step on it.

The replica that started an agent keeps it while steps run on it and stops
it (``StopAgent``) once it has been idle for the idle time
(``MABEAM_PLANNER_AGENT_IDLE``, seconds, default 60; ``--agent-idle``). A
replica that stops stops the agents it started. Steps of one capability
started at once share one start. The agents started are recorded in
``Goal.plan.started_agents`` and as ``AGENT_STARTED`` events.

Which replica keeps which agent is in etcd (see the store's key table): the
agent's record (``planner-agents/<id>``, no lease) is written before
``StartAgent`` with the replica's claim (``planner-agent-claims/<id>``, on
the replica's lease). When a replica dies its claims go with its lease, and
another replica's idle pass adopts the unclaimed agents (idle from then) and
stops them after the idle time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf import duration_pb2

from mabeam import errors
from mabeam.client import MeshClient
from mabeam.config import ConfigError
from mabeam.services.planner.store import GoalStore
from mabeam.v1 import registry_pb2

log = logging.getLogger("mabeam.planner.launcher")

IDLE_ENV = "MABEAM_PLANNER_AGENT_IDLE"
DEFAULT_IDLE_S = 60.0
# How long the registry may take to see the started agent register (StartAgent's start_timeout).
START_TIMEOUT_S = 20.0
# After StartAgent answered: how long the registry's listing may take to show the agent.
LISTED_WITHIN_S = 10.0
# Agents one replica keeps started at once, at most (a bounded table; beyond, starts are refused).
MAX_STARTED = 256


def idle_seconds(environ: dict[str, str] | os._Environ[str], given: str | None = None) -> float:
    """The idle time: ``given`` (a flag) over ``$MABEAM_PLANNER_AGENT_IDLE`` over 60 s; 0.1-86400 s."""
    raw = given if given is not None else environ.get(IDLE_ENV)
    if raw is None or raw == "":
        return DEFAULT_IDLE_S
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{IDLE_ENV}: {raw!r} is not a number of seconds") from None
    if not 0.1 <= value <= 86400:
        raise ConfigError(f"{IDLE_ENV}: {value} s is outside 0.1-86400 s")
    return value


# StartAgent refusals after which the registry runs nothing: the record is dropped at once.
REFUSED = (
    errors.InvalidArgument,
    errors.NotFound,
    errors.PermissionDenied,
    errors.FailedPrecondition,
    errors.ResourceExhausted,
    errors.AlreadyExists,
)


@dataclass
class Started:
    """An agent this replica started: how many steps use it, since when it is idle."""

    agent_id: str
    capability: str
    in_use: int = 0
    idle_since: float = 0.0


class Launcher:
    """Starts catalog agents for capabilities nobody offers; stops them once idle."""

    def __init__(
        self,
        mesh: Callable[[], MeshClient],
        store: GoalStore,
        instance_id: str,
        lease: Callable[[], int],
        idle_s: float,
    ) -> None:
        self._mesh = mesh
        self.store = store
        self.instance_id = instance_id
        self._lease = lease  # the replica's lease (claims are bound to it)
        self.idle_s = idle_s
        self.started: dict[str, Started] = {}
        self._starting: dict[str, asyncio.Future[str]] = {}
        self._adopt_after: str | None = None  # where the next adoption pass reads from

    @property
    def mesh(self) -> MeshClient:
        return self._mesh()

    async def can_start(self, capability: str) -> bool:
        """True when the registry's catalog has a kind named ``capability`` (StartAgent validate_only)."""
        try:
            await self.mesh.registry.StartAgent(
                self._request(capability, "planner-check", validate_only=True)
            )
        except (errors.NotFound, errors.InvalidArgument, errors.PermissionDenied):
            return False
        return True

    def _request(
        self, capability: str, agent_id: str, *, validate_only: bool = False
    ) -> registry_pb2.StartAgentRequest:
        return registry_pb2.StartAgentRequest(
            agent_id=agent_id,
            launch=registry_pb2.LaunchSpec(kind=capability),
            restart_policy=registry_pb2.RestartPolicy(strategy=registry_pb2.RESTART_STRATEGY_TEMPORARY),
            start_timeout=duration_pb2.Duration(seconds=int(START_TIMEOUT_S)),
            validate_only=validate_only,
        )

    async def start(self, capability: str) -> str:
        """Start one agent of kind ``capability`` (shared by concurrent callers); its id once listed."""
        pending = self._starting.get(capability)
        if pending is None:
            pending = asyncio.ensure_future(self._start(capability))
            self._starting[capability] = pending
            pending.add_done_callback(lambda _: self._starting.pop(capability, None))
        return await asyncio.shield(pending)

    async def _start(self, capability: str) -> str:
        if len(self.started) >= MAX_STARTED:
            raise errors.ResourceExhausted(
                f"this planner replica runs {MAX_STARTED} agents it started; at most"
            )
        agent_id = f"{capability[:80]}-{uuid.uuid4().hex[:10]}"
        # Recorded first: a replica that dies right after StartAgent leaves an agent another adopts.
        await self.store.record_started(agent_id, capability, self.instance_id, self._lease())
        # Kept in use until it is listed (and the caller's step takes it): never stopped as idle first.
        entry = self.started[agent_id] = Started(agent_id, capability, in_use=1, idle_since=time.monotonic())
        try:
            await self.mesh.registry.StartAgent(self._request(capability, agent_id))
        except REFUSED:  # the registry started nothing: forget it
            self.started.pop(agent_id, None)
            with contextlib.suppress(Exception):
                await self.store.drop_started(agent_id)
            raise
        except BaseException:
            # Unknown (cut off, timed out, cancelled): the agent may run, or start later. It stays
            # recorded and idle, so the idle pass stops it (a NotFound from StopAgent also ends it).
            self._release_start(entry)
            raise
        deadline = time.monotonic() + LISTED_WITHIN_S
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(errors.NotFound):
                    got = await self.mesh.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id))
                    if got.agent.agent_id == agent_id:
                        log.info("started agent %s for capability %r", agent_id, capability)
                        return agent_id
                await asyncio.sleep(0.05)
        finally:
            self._release_start(entry)
        raise errors.DeadlineExceeded(f"agent {agent_id!r} started but not listed within {LISTED_WITHIN_S} s")

    @staticmethod
    def _release_start(entry: Started) -> None:
        """The start is over (the agent is listed, or it is not known): idle from now."""
        entry.in_use = max(0, entry.in_use - 1)
        entry.idle_since = time.monotonic()

    def use(self, agent_id: str) -> None:
        """A step starts on ``agent_id`` (no-op for agents this replica did not start)."""
        entry = self.started.get(agent_id)
        if entry is not None:
            entry.in_use += 1

    def release(self, agent_id: str) -> None:
        """A step ended on ``agent_id``: it is idle from now when no other step uses it."""
        entry = self.started.get(agent_id)
        if entry is not None:
            entry.in_use = max(0, entry.in_use - 1)
            entry.idle_since = time.monotonic()

    async def stop_idle(self) -> list[str]:
        """Stop the agents idle for the idle time; their ids."""
        now = time.monotonic()
        idle = [e for e in self.started.values() if e.in_use == 0 and now - e.idle_since >= self.idle_s]
        stopped: list[str] = []
        for entry in idle:
            if await self._stop(entry.agent_id):
                stopped.append(entry.agent_id)
        return stopped

    async def _stop(self, agent_id: str) -> bool:
        try:
            await self.mesh.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id=agent_id))
        except errors.NotFound:
            pass  # gone already
        except errors.MabeamError as exc:
            log.info("stopping idle agent %s failed (tried again): %s", agent_id, exc.message)
            return False
        await self.store.drop_started(agent_id)
        self.started.pop(agent_id, None)
        log.info("stopped agent %s (idle %.1f s)", agent_id, self.idle_s)
        return True

    async def adopt(self) -> list[str]:
        """Claim the started agents nobody keeps (their replica died): idle from now; their ids."""
        adopted: list[str] = []
        room = MAX_STARTED - len(self.started)
        if room <= 0:
            return adopted
        # A window of the records a pass, from where the last one stopped: every record is seen
        # in turn, however many the live replicas hold before it.
        found, self._adopt_after = await self.store.unclaimed_started(max(room, 100), self._adopt_after)
        for agent_id, capability in found[:room]:
            if agent_id in self.started:
                continue
            if await self.store.claim_started(agent_id, self.instance_id, self._lease()):
                self.started[agent_id] = Started(agent_id, capability, idle_since=time.monotonic())
                adopted.append(agent_id)
                log.info(
                    "adopted agent %s (capability %r): its planner replica is gone", agent_id, capability
                )
        return adopted

    async def run(self) -> None:
        """Adopt agents whose replica died and stop idle agents, a few times per idle time."""
        while True:
            await asyncio.sleep(max(0.05, min(self.idle_s / 4, 5.0)))
            try:
                await self.keep_claims()
                await self.adopt()
                await self.stop_idle()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("idle agents pass failed: %s", exc)

    async def keep_claims(self) -> list[str]:
        """Hold every agent this replica started on its current lease: one whose claim went with a
        lapsed lease is claimed again, unless another replica adopted it meanwhile — then it is
        that replica's to stop, and forgotten here. The ids forgotten."""
        lost: list[str] = []
        for agent_id in list(self.started):
            if not await self.store.claim_started(agent_id, self.instance_id, self._lease()):
                self.started.pop(agent_id, None)
                lost.append(agent_id)
                log.info(
                    "agent %s was adopted by another planner replica (this one's lease lapsed)", agent_id
                )
        return lost

    async def stop_all(self) -> None:
        """The replica stops: stop every agent it started."""
        for agent_id in list(self.started):
            with contextlib.suppress(Exception):
                await self._stop(agent_id)
