"""The life of one supervised agent's process on the replica that owns the agent.

:func:`supervise` runs as one task per agent (started by the reconcile loop in
:mod:`.supervisor`): start the process, wait until it registers (within the
record's start timeout), watch it until it exits or a restart is requested,
then apply the restart policy and start it again, mark it stopped, or mark it
failed. Each state change is written through the supervisor's ownership-checked
writes, so a replica that lost the agent cannot record anything for it.

A migration (:mod:`.migration`) may replace the process while this task
watches it: the task then follows the new process (``Supervisor.procs`` holds
the current one) and the old one's exit is not a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import subprocess
import time
from typing import TYPE_CHECKING, Any, Literal

from google.protobuf import timestamp_pb2

from mabeam import errors
from mabeam.runtime import process
from mabeam.services.registry import launch as launches
from mabeam.services.registry import nodes, usage
from mabeam.services.registry.restart_policy import RestartTracker
from mabeam.v1 import registry_pb2

if TYPE_CHECKING:
    from mabeam.services.registry.supervisor import Supervisor

ACTIVE = (
    registry_pb2.SUPERVISION_STATE_STARTING,
    registry_pb2.SUPERVISION_STATE_RUNNING,
    registry_pb2.SUPERVISION_STATE_RESTARTING,
)
RESTART_REQUESTED = "restart requested"

Outcome = Literal["registered", "exited", "timeout", "restart-requested", "replaced"]


def now() -> timestamp_pb2.Timestamp:
    """The current time as a protobuf Timestamp."""
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def failed(r: registry_pb2.SupervisedAgent, reason: str, how: str = "") -> None:
    """Record change: the agent failed for good."""
    r.state, r.pid, r.reason = registry_pb2.SUPERVISION_STATE_FAILED, 0, reason
    if how:
        r.last_exit = how


def running(r: registry_pb2.SupervisedAgent) -> None:
    """Record change: the agent's process registered."""
    r.state, r.reason = registry_pb2.SUPERVISION_STATE_RUNNING, ""


async def supervise(sup: Supervisor, agent_id: str, adopted: subprocess.Popen[bytes] | None = None) -> None:
    """Run one agent's process for as long as this replica owns it (cancelled when it no longer does).

    ``adopted``: a process already serving the agent (a migration from another node started it
    here); it is watched first instead of starting one."""
    record = sup.record(agent_id)
    if record is None:
        return
    tracker = RestartTracker(launches.policy_of(record.restart_policy))
    proc: subprocess.Popen[bytes] | None = None
    # RSS and CPU of the agent's process, sampled while it runs here (see .usage).
    measuring = asyncio.create_task(usage.measure(sup, agent_id), name=f"measure:{agent_id}")
    try:
        # Its processes' credential, for as long as this replica runs the agent.
        await sup.issue_credential(agent_id)
        while True:
            record = sup.record(agent_id)
            if record is None or record.state not in ACTIVE:
                return
            if adopted is not None:
                # Migrated here from another node: the process serves and is registered already.
                proc, adopted = adopted, None
                outcome: Outcome = "registered"
            else:
                # Read before the process starts: only a registration written after it counts.
                before = await sup.store.registration_mark(agent_id)
                started = now()
                try:
                    # Resolved through this replica's launch policy each time: a record
                    # written under another policy (a kind this catalog lacks, a
                    # free-form argv without --allow-argv) is not run here.
                    spec = sup.launch_of(record.launch, agent_id, await sup.secret(agent_id))
                    # The process declares the node it runs on: this replica's.
                    proc = spawn(spec, {nodes.NODE_NAME_ENV: sup.node.name})
                # ValueError: exec refuses the spec (e.g. a NUL byte in a record older than check_launch).
                except (OSError, ValueError) as exc:
                    await sup.revoke_credential(agent_id)
                    await sup.write_retrying(
                        agent_id, functools.partial(failed, reason=f"cannot start: {exc}")
                    )
                    return
                except errors.MabeamError as exc:
                    await sup.revoke_credential(agent_id)
                    await sup.write_retrying(
                        agent_id, functools.partial(failed, reason=f"cannot start: {exc.message}")
                    )
                    return
                sup.procs[agent_id] = proc
                pid = proc.pid

                def starting(r: registry_pb2.SupervisedAgent, pid: int = pid, started: Any = started) -> None:
                    r.state = registry_pb2.SUPERVISION_STATE_STARTING
                    r.pid = pid
                    r.node = sup.node.name
                    r.started_at.CopyFrom(started)

                if not await sup.write_retrying(agent_id, starting):
                    return
                outcome = await _await_registration(
                    sup, agent_id, proc, before, launches.start_timeout(record)
                )
            if outcome == "registered":
                await sup.write_retrying(agent_id, running)
                outcome = await _await_exit_or_restart(sup, agent_id, proc)
                while outcome == "replaced":  # migrated: watch the new process from now on
                    proc = sup.procs[agent_id]
                    outcome = await _await_exit_or_restart(sup, agent_id, proc)
            if outcome == "restart-requested":
                await process.terminate(proc, 5.0)
                await _drop_registration(sup, agent_id)
                continue
            if outcome == "timeout":
                proc.kill()
            await process.wait_exit(proc)
            await _drop_registration(sup, agent_id)
            code = proc.returncode
            exit_code, sig = (None, -code) if code is not None and code < 0 else (code, None)
            if outcome == "timeout":
                exit_code, sig = None, signal.SIGKILL
            decision = tracker.on_exit(exit_code, sig, time.monotonic())
            how = f"exit code {exit_code}" if sig is None else f"signal {sig}"
            if outcome == "timeout":
                how = "did not register within the start timeout"
            if decision.give_up or not decision.restart:
                # No process of the agent runs here any more: its credential goes before its record says so.
                await sup.revoke_credential(agent_id)
            if decision.give_up:
                await sup.write_retrying(agent_id, functools.partial(failed, reason=decision.reason, how=how))
                return
            if not decision.restart:

                def stopped(r: registry_pb2.SupervisedAgent, d: Any = decision, h: str = how) -> None:
                    r.state, r.pid, r.last_exit, r.reason = (
                        registry_pb2.SUPERVISION_STATE_STOPPED,
                        0,
                        h,
                        d.reason,
                    )

                await sup.write_retrying(agent_id, stopped)
                return

            def restarting(r: registry_pb2.SupervisedAgent, h: str = how) -> None:
                r.state, r.pid, r.last_exit = registry_pb2.SUPERVISION_STATE_RESTARTING, 0, h
                r.restart_count += 1

            await sup.write_retrying(agent_id, restarting)
            await asyncio.sleep(decision.delay_s)
    finally:
        measuring.cancel()
        # The current process, which a migration may have replaced since ``proc`` was set.
        proc = sup.procs.pop(agent_id, proc)
        if proc is not None and proc.poll() is None:
            await asyncio.shield(process.terminate(proc, 5.0))
        await asyncio.shield(sup.revoke_credential(agent_id))
        if proc is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(_after_stop(sup, agent_id))


def spawn(spec: launches.Launch, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a supervised agent's process, its stdout and stderr appended to its own log file.

    Never a pipe nobody reads, nor the registry's own stdout (a terminal, or a
    pipe when the registry was started by hand): an agent that writes a lot
    never blocks on its output.
    """
    process.rotate_log(spec.log)
    with process.open_log(spec.log) as log:
        return process.spawn(
            spec.argv, env={**spec.env, **(extra_env or {})}, cwd=spec.cwd, stdout=log, stderr=log
        )


async def _drop_registration(sup: Supervisor, agent_id: str) -> None:
    """The process is dead: remove its registration now instead of after its TTL.

    The supervisor owns the agent, so it may; and the restarted process can
    then register under the same id at once.
    """
    with contextlib.suppress(Exception):
        agent, _ = await sup.store.get_agent(agent_id)
        if agent is not None:
            await sup.store.revoke_lease(agent.lease_id)


async def _after_stop(sup: Supervisor, agent_id: str) -> None:
    """No process any more: pid 0, and give the ownership up unless the agent should run."""

    def stopped(r: registry_pb2.SupervisedAgent) -> None:
        r.pid = 0

    await sup.write(agent_id, stopped)
    record = sup.record(agent_id)
    if record is None or record.state not in ACTIVE:
        await sup.release(agent_id)


async def _await_registration(
    sup: Supervisor,
    agent_id: str,
    proc: subprocess.Popen[bytes],
    before: tuple[int, int],
    timeout: float,
) -> Outcome:
    """Started means registered: the registration is what the rest of the mesh sees.

    Only a registration made after this start counts (not the last process's):
    one written after ``before``'s revision, on a lease other than the one the
    key had then (a registration always takes a new lease; the prober's status
    writes keep it).
    """
    deadline = time.monotonic() + timeout
    since_revision, old_lease = before
    key = sup.store.keys.agent(agent_id)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return "exited"
        agent = sup.directory.agents.get(key)
        if (
            agent is not None
            and sup.directory.agents.mod_revision(key) > since_revision
            and agent.lease_id != old_lease
        ):
            return "registered"
        await asyncio.sleep(0.01)
    return "timeout"


async def _await_exit_or_restart(sup: Supervisor, agent_id: str, proc: subprocess.Popen[bytes]) -> Outcome:
    """Until ``proc`` exits, a restart is requested, or a migration replaced it."""
    exit_waiter = asyncio.ensure_future(process.wait_exit(proc))
    log = launches.agent_log(agent_id, sup.server.config)
    looks = 0
    try:
        while True:
            looks += 1
            if looks % 10 == 0:  # about once a second
                process.rotate_log(log)
            moving = sup.moving.get(agent_id)
            if exit_waiter.done() and moving is not None:
                # It died mid-migration: the migration fails or has just replaced it; see which.
                await asyncio.wait({moving})
                continue
            if sup.procs.get(agent_id) is not proc:
                return "replaced"
            if exit_waiter.done():
                return "exited"
            record = sup.record(agent_id)
            if (
                moving is None
                and record is not None
                and record.state == registry_pb2.SUPERVISION_STATE_RESTARTING
                and record.reason == RESTART_REQUESTED
            ):
                return "restart-requested"
            # Wake on the exit at once; look at the desired state now and then.
            await asyncio.wait({exit_waiter}, timeout=0.1)
    finally:
        exit_waiter.cancel()
