"""StartAgent, StopAgent and RestartAgent: write the desired state, then wait until it is reached.

Any registry replica may serve these calls. They never touch a process: they
change the agent's record in etcd (a transaction on its revision), wake the
reconcile loop, and read the record until the replica that owns the agent
(:mod:`.processes`) reports the state asked for, or a failure, or the
deadline passes.

StartAgent also places the agent: the least-loaded live node its placement
allows is recorded in the record's ``node`` (:meth:`.supervisor.Supervisor.place`),
and only a replica of that node starts the process (:mod:`.nodes`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import stamina

from mabeam import errors
from mabeam.runtime import validate
from mabeam.runtime.retention import expired_message
from mabeam.services.registry import nodes
from mabeam.services.registry.launch import DEFAULT_START_TIMEOUT_S, check_launch, policy_of, seconds
from mabeam.services.registry.processes import ACTIVE, RESTART_REQUESTED
from mabeam.services.registry.store import new_token
from mabeam.v1 import common_pb2, registry_pb2

if TYPE_CHECKING:
    from mabeam.services.registry.supervisor import Supervisor


class _Changed(Exception):
    """The record changed between read and write: read again."""


async def start_agent(
    sup: Supervisor, request: registry_pb2.StartAgentRequest
) -> tuple[registry_pb2.SupervisedAgent, str]:
    """Record the agent as supervised (with a fresh token); return once it runs, with the token.

    With ``validate_only``: the checks alone, then an empty record and no token.
    """
    agent_id = validate.identifier(request.agent_id, "agent_id")
    # Everything is checked before the first write: a refused launch leaves etcd as it was.
    check_launch(request.launch, sup.policy)
    policy_of(request.restart_policy, request.HasField("restart_policy"))
    timeout = validate.seconds(
        request.start_timeout, "start_timeout", default=DEFAULT_START_TIMEOUT_S, minimum=0.1, maximum=600
    )
    nodes.check_placement(request.placement)
    if request.validate_only:
        return registry_pb2.SupervisedAgent(), ""
    existing, mod_revision = await sup.store.get_supervised(agent_id)
    if existing is not None:
        if existing.state in ACTIVE:
            raise errors.AlreadyExists(
                f"agent {agent_id!r} is already supervised ({registry_pb2.SupervisionState.Name(existing.state)})"
            )
    elif sup.directory.get(agent_id) is not None:
        raise errors.AlreadyExists(
            f"agent {agent_id!r} is registered and not supervised",
            reason=common_pb2.ERROR_REASON_AGENT_ALREADY_REGISTERED,
        )
    record = registry_pb2.SupervisedAgent(
        agent_id=agent_id,
        launch=request.launch,
        restart_policy=request.restart_policy,
        state=registry_pb2.SUPERVISION_STATE_STARTING,
        placement=request.placement,
        # The least-loaded live node the placement allows; a replica of it starts the process.
        node=sup.place(request.placement),
    )
    record.start_timeout.FromNanoseconds(int(timeout * 1e9))
    # The caller's token (only its hash is stored): it acts for the agent (migrate,
    # deregister) across restarts. Each process gets a token of its own (Supervisor.secret).
    token = new_token()
    if not await sup.store.create_supervised(record, token, mod_revision):
        raise errors.Aborted(f"agent {agent_id!r} was started concurrently")
    sup.wake.set()
    started = await _wait(
        sup,
        agent_id,
        lambda r: r.state == registry_pb2.SUPERVISION_STATE_RUNNING or r.state not in ACTIVE,
        timeout + 5,
    )
    return started, token


async def stop_agent(sup: Supervisor, request: registry_pb2.StopAgentRequest) -> registry_pb2.SupervisedAgent:
    """Mark the agent stopped; return once its process is gone."""
    agent_id = validate.identifier(request.agent_id, "agent_id")
    grace = validate.seconds(request.grace, "grace", default=5.0, minimum=0, maximum=300)

    def stop(r: registry_pb2.SupervisedAgent) -> None:
        r.state, r.reason = registry_pb2.SUPERVISION_STATE_STOPPED, "stopped on request"

    await _update_desired(sup, agent_id, stop)
    sup.wake.set()
    return await _wait(sup, agent_id, lambda r: r.pid == 0, grace + 10)


async def restart_agent(
    sup: Supervisor, request: registry_pb2.RestartAgentRequest
) -> registry_pb2.SupervisedAgent:
    """Ask for a restart; return once a process started after this call runs."""
    agent_id = validate.identifier(request.agent_id, "agent_id")
    before = sup.record(agent_id)

    def restart(r: registry_pb2.SupervisedAgent) -> None:
        if r.state not in ACTIVE:
            raise errors.FailedPrecondition(
                f"agent {agent_id!r} is {registry_pb2.SupervisionState.Name(r.state)}: start it with StartAgent"
            )
        r.state, r.reason = registry_pb2.SUPERVISION_STATE_RESTARTING, RESTART_REQUESTED

    await _update_desired(sup, agent_id, restart)
    old_start = seconds(before.started_at) if before else 0.0
    return await _wait(
        sup,
        agent_id,
        lambda r: (
            (r.state == registry_pb2.SUPERVISION_STATE_RUNNING and seconds(r.started_at) > old_start)
            or r.state not in ACTIVE
        ),
        30.0,
    )


async def _update_desired(
    sup: Supervisor, agent_id: str, change: Callable[[registry_pb2.SupervisedAgent], None]
) -> None:
    """Apply ``change`` to the record (any replica may), again if it changed meanwhile."""
    try:
        async for attempt in stamina.retry_context(
            on=_Changed, attempts=50, timeout=None, wait_initial=0.01, wait_max=0.1, wait_jitter=0.01
        ):
            with attempt:
                record, mod_revision = await sup.store.get_supervised(agent_id)
                if record is None:
                    # Never supervised, or stopped and expired (retention): the message says both.
                    raise errors.NotFound(expired_message(f"supervised agent {agent_id!r}", sup.retention))
                change(record)
                if not await sup.store.put_supervised_if(record, mod_revision):
                    raise _Changed
    except _Changed:
        raise errors.Aborted(f"agent {agent_id!r} changed too often to update; retry") from None


async def _wait(
    sup: Supervisor, agent_id: str, done: Callable[[registry_pb2.SupervisedAgent], bool], timeout: float
) -> registry_pb2.SupervisedAgent:
    """The record once ``done`` holds for it; FAILED_PRECONDITION if the agent failed instead."""
    deadline = time.monotonic() + timeout
    while True:
        record, _ = await sup.store.get_supervised(agent_id)
        if record is None:
            raise errors.NotFound(f"agent {agent_id!r} is no longer supervised")
        if done(record):
            if record.state == registry_pb2.SUPERVISION_STATE_FAILED:
                raise errors.FailedPrecondition(
                    f"agent {agent_id!r} failed: {record.reason} ({record.last_exit})"
                )
            return record
        if time.monotonic() > deadline:
            raise errors.DeadlineExceeded(
                f"agent {agent_id!r} is {registry_pb2.SupervisionState.Name(record.state)} after {timeout:.0f} s"
            )
        await asyncio.sleep(0.05)
