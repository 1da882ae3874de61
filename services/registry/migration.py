"""Moving a live agent to another instance (MigrateAgent): one flow, read top to bottom in :func:`migrate`.

1. Export: the old instance returns the agent's state (``ExportState``); from
   then on it holds the agent's calls, so the state is final.
2. The new instance: the caller's ``target_endpoint``, or, with a launch spec
   (supervised agents), a process this replica starts in standby
   (``MABEAM_STANDBY=1``: served, not registered). Its address comes from its
   ready file (:class:`mabeam.runtime.process.ReadyFile`), not from its output.
3. Import: the new instance takes the state (``ImportState``) and a new
   registration token, minted here (``ImportStateRequest.token``; the export
   never carries a token), with which it takes the heartbeats over. Its hash
   is stored first (``agent-tokens-moving/``), so its beats pass at once.
4. Switch: the registration names the new endpoint, generation + 1, and the
   new token's hash is the registration's, in one transaction on the
   registration's create revision.
5. Tell the old instance (``AgentMoved``): it forwards the calls it held, and
   every later one, to the new endpoint at once. An instance that does not
   implement it answers UNIMPLEMENTED; that is not an error. Then the old
   token stops working (until here its beats still pass).
6. Stop the old process (supervised agents): supervision follows the new
   process, and the old one is stopped a second later, with its own grace.

A failure before the switch gives the old instance its state back (it
resumes serving) and stops a process started in step 2. The flow runs to its
end even when the caller goes away. With a launch spec the flow runs on the
replica that runs the agent's process; another replica hands the call over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
from typing import TYPE_CHECKING, Any

import grpc

from mabeam import auth, errors
from mabeam.runtime import process, validate
from mabeam.services.registry import nodes
from mabeam.services.registry.launch import check_launch, start_timeout
from mabeam.services.registry.processes import ACTIVE, now, spawn
from mabeam.services.registry.store import new_token
from mabeam.v1 import agent_pb2, agent_pb2_grpc, common_pb2, registry_pb2, registry_pb2_grpc

if TYPE_CHECKING:
    from mabeam.services.registry.supervisor import Supervisor

log = logging.getLogger("mabeam.registry.migration")

CALL_TIMEOUT_S = 30.0
MOVED_TIMEOUT_S = 5.0
HAND_OVER_TIMEOUT_S = 90.0
# How long the old process lives on after the switch: callers that looked the
# agent up before the move still call the old endpoint for a moment, and the
# old instance forwards those calls.
RETIRE_AFTER_S = 1.0


PLACED_NODE_HEADER = "mabeam-placed-node"


def placed_node(context: Any) -> str | None:
    """The node a peer registry replica already chose for a move it hands over (the
    ``mabeam-placed-node`` header), heeded only from the mesh's own services."""
    identity = auth.current()
    if identity is None or identity.role != auth.SERVICE:
        return None
    for key, value in context.invocation_metadata() or ():
        if key == PLACED_NODE_HEADER and isinstance(value, str):
            return value
    return None


async def migrate_agent(
    sup: Supervisor, request: registry_pb2.MigrateAgentRequest, placed: str | None = None
) -> registry_pb2.MigrateAgentResponse:
    """The RPC: run :func:`migrate` here, or on the replica that runs the agent's process.
    ``placed``: the node a peer replica chose when it handed the move over (not chosen again)."""
    agent_id = validate.identifier(request.agent_id, "agent_id")
    adopt_from: str | None = None
    if request.HasField("placement"):
        if request.WhichOneof("target") != "launch":
            raise errors.InvalidArgument(
                "placement", "is only for a move with a launch spec (supervised agents)"
            )
        nodes.check_placement(request.placement)
    if request.WhichOneof("target") == "launch":
        check_launch(request.launch, sup.policy)  # before any write: a refused launch changes nothing
        record = sup.record(agent_id)
        if record is None or record.state not in ACTIVE:
            raise errors.FailedPrecondition(
                f"agent {agent_id!r} is not a running supervised agent: migrate it with target_endpoint"
            )
        if not await sup.store.token_matches(agent_id, request.token):
            raise errors.PermissionDenied(f"wrong or missing token for agent {agent_id!r}")
        owner = sup.owner(agent_id)
        owner_node = sup.node_of_replica(owner) if owner is not None else None
        if placed is not None:
            target_node: str | None = placed
        elif request.HasField("placement"):
            target_node = sup.place(request.placement)
        else:
            target_node = owner_node
        if target_node is not None and target_node != owner_node:
            if target_node != sup.node.name:
                # Another node: a replica of it starts the new instance and takes the agent over.
                return await _hand_over(sup, sup.replica_on(target_node), request, node=target_node)
            if owner is None:
                raise errors.FailedPrecondition(f"agent {agent_id!r} is not running anywhere yet; retry")
            adopt_from = owner
        elif owner is not None and owner != sup.replica_id:
            return await _hand_over(sup, owner, request)
    # Shielded: a caller that goes away does not leave a half-done move behind.
    moving = asyncio.ensure_future(migrate(sup, request, adopt_from=adopt_from))
    moving.add_done_callback(lambda t: t.cancelled() or t.exception())
    return await asyncio.shield(moving)


async def migrate(
    sup: Supervisor, request: registry_pb2.MigrateAgentRequest, *, adopt_from: str | None = None
) -> registry_pb2.MigrateAgentResponse:
    """Move the agent; see the module's docstring for the steps.

    ``adopt_from``: the replica (on another node) that runs the agent now; the new instance starts
    here and this replica takes the agent's supervision over from it (:meth:`Supervisor.adopt`).
    """
    agent_id = validate.identifier(request.agent_id, "agent_id")
    agent, create_revision = await sup.store.get_agent(agent_id)
    if agent is None:
        raise errors.NotFound(
            f"agent {agent_id!r} is not registered", reason=common_pb2.ERROR_REASON_AGENT_NOT_FOUND
        )
    if not await sup.store.token_matches(agent_id, request.token):
        raise errors.PermissionDenied(f"wrong or missing token for agent {agent_id!r}")
    launch = request.launch if request.WhichOneof("target") == "launch" else None
    old_proc: subprocess.Popen[bytes] | None = None
    if launch is not None:
        if adopt_from is None:  # else the process runs on another node, whose replica stops it
            old_proc = sup.procs.get(agent_id)
            if old_proc is None or not sup.runs_here(agent_id):
                raise errors.FailedPrecondition(f"agent {agent_id!r} is not running here yet; retry")
    elif request.WhichOneof("target") != "target_endpoint":
        raise errors.InvalidArgument(
            "target_endpoint", "give the host:port of a running instance, or a launch spec"
        )
    elif validate.endpoint(request.target_endpoint, "target_endpoint") == agent.endpoint:
        raise errors.InvalidArgument("target_endpoint", "is the agent's current endpoint")
    if agent_id in sup.moving:
        raise errors.FailedPrecondition(f"agent {agent_id!r} is already moving")
    moving: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sup.moving[agent_id] = moving
    try:
        started = time.monotonic()
        # The pool's channels are reused, and carry TLS when it is on.
        old = agent_pb2_grpc.AgentServiceStub(sup.pool.get(agent.endpoint))

        # 1. Export; the old instance holds the agent's calls from here on.
        try:
            exported = await old.ExportState(
                agent_pb2.ExportStateRequest(agent_id=agent_id), timeout=CALL_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            raise errors.FailedPrecondition(
                f"exporting the state of {agent_id!r} failed: {exc.details()}"
            ) from None
        state = agent_pb2.ImportStateRequest(
            agent_id=agent_id, state=exported.state, content_type=exported.content_type
        )
        new_proc: subprocess.Popen[bytes] | None = None
        try:
            # 2. The new instance (a supervised one is started with the new token, too).
            token = await sup.secret(agent_id) if launch is not None else new_token()
            if adopt_from is not None:
                await sup.issue_credential(agent_id)  # the credential its processes here present
            if launch is not None:
                target, new_proc = await _start_standby(sup, agent_id, launch, token)
            else:
                target = request.target_endpoint
            # 3. Import, with the new token, valid from now on.
            if not await sup.store.begin_move(agent_id, agent.lease_id, create_revision, token):
                raise errors.Aborted(f"agent {agent_id!r} re-registered during the migration; retry")
            given = agent_pb2.ImportStateRequest(token=token)
            given.MergeFrom(state)
            try:
                await agent_pb2_grpc.AgentServiceStub(sup.pool.get(target)).ImportState(
                    given, timeout=CALL_TIMEOUT_S
                )
            except grpc.RpcError as exc:
                raise errors.FailedPrecondition(
                    f"importing the state into {target} failed: {exc.details()}"
                ) from None
            # 4. Switch the registration.
            moved = registry_pb2.Agent()
            moved.CopyFrom(agent)
            moved.endpoint = target
            moved.generation = agent.generation + 1
            # A process started here runs on this node; of a caller's instance the node is not known.
            moved.node = sup.node.name if launch is not None else ""
            if not await sup.store.switch_agent(moved, create_revision, token):
                raise errors.Aborted(f"agent {agent_id!r} re-registered during the migration; retry")
        except BaseException:
            # Give the old instance its state back so it resumes serving; stop what we started.
            with contextlib.suppress(grpc.RpcError):  # no token: it keeps its own
                await asyncio.shield(old.ImportState(state, timeout=CALL_TIMEOUT_S))
            if new_proc is not None:
                await asyncio.shield(process.terminate(new_proc, 2.0))
            if adopt_from is not None:
                await asyncio.shield(sup.revoke_credential(agent_id))
            raise
        pause = time.monotonic() - started

        # 5. Tell the old instance, which forwards what it held (and stops beating).
        await _tell_moved(old, moved)
        with contextlib.suppress(Exception):
            await sup.store.end_move(agent_id)  # the old token stops working

        # 6. Supervision follows the new process; the old one is stopped.
        if old_proc is not None and new_proc is not None:
            await _replace_process(sup, agent_id, old_proc, new_proc, launch)
        elif adopt_from is not None and new_proc is not None and launch is not None:
            await _take_over(sup, agent_id, adopt_from, new_proc, launch, request.placement)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(sup.store.end_move(agent_id))  # a failed move leaves no second token
        sup.moving.pop(agent_id, None)
        moving.set_result(None)
    response = registry_pb2.MigrateAgentResponse(
        agent=sup.directory.view(moved), state_bytes=len(exported.state)
    )
    response.pause.FromNanoseconds(int(pause * 1e9))
    return response


async def _start_standby(
    sup: Supervisor, agent_id: str, launch: registry_pb2.LaunchSpec, token: str
) -> tuple[str, subprocess.Popen[bytes]]:
    """Start the agent's new process in standby; its address, from its ready file, and the process."""
    record = sup.record(agent_id)
    timeout = start_timeout(record) if record is not None else start_timeout(registry_pb2.SupervisedAgent())
    spec = sup.launch_of(launch, agent_id, token, standby=True)
    with process.ReadyFile() as ready:
        try:
            proc = spawn(
                spec, {**ready.env(), nodes.NODE_NAME_ENV: sup.node.name}
            )  # its output to the agent's log
        except (OSError, ValueError) as exc:  # the old process keeps serving
            raise errors.FailedPrecondition(f"cannot start the new instance of {agent_id!r}: {exc}") from None
        try:
            return (await ready.wait(proc, timeout)).address, proc
        except process.ExitedBeforeReady as exc:
            raise errors.FailedPrecondition(
                f"the new instance of {agent_id!r} exited (status {exc.status}) before serving"
            ) from None
        except TimeoutError:
            await process.terminate(proc, 2.0)
            raise errors.DeadlineExceeded(
                f"the new instance of {agent_id!r} did not serve within {timeout:.0f} s"
            ) from None
        except BaseException:
            await asyncio.shield(process.terminate(proc, 2.0))
            raise


async def _tell_moved(old: agent_pb2_grpc.AgentServiceStub, moved: registry_pb2.Agent) -> None:
    """AgentMoved on the old instance; one that cannot be told is stopped or left, not an error."""
    try:
        await old.AgentMoved(
            agent_pb2.AgentMovedRequest(
                agent_id=moved.agent_id, new_endpoint=moved.endpoint, generation=moved.generation
            ),
            timeout=MOVED_TIMEOUT_S,
        )
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            log.warning(
                "telling the old instance of %s that it moved failed: %s", moved.agent_id, exc.details()
            )


async def _replace_process(
    sup: Supervisor,
    agent_id: str,
    old: subprocess.Popen[bytes],
    new: subprocess.Popen[bytes],
    launch: registry_pb2.LaunchSpec,
) -> None:
    """Hand ``new`` to the agent's supervision task (it follows Supervisor.procs) and retire ``old``."""
    if sup.procs.get(agent_id) is not old:
        # Supervision of the agent ended here during the move (stopped, or lost
        # the lease): the new process is not ours to keep; whoever supervises
        # the agent now starts it again.
        await process.terminate(new, 2.0)
        return
    sup.procs[agent_id] = new
    pid, started = new.pid, now()

    def switched(r: registry_pb2.SupervisedAgent) -> None:
        r.launch.CopyFrom(launch)
        r.pid = pid
        r.started_at.CopyFrom(started)

    await sup.write_retrying(agent_id, switched)
    retire = asyncio.create_task(_retire(old), name=f"retire:{agent_id}")
    sup.retiring.add(retire)
    retire.add_done_callback(sup.retiring.discard)


async def _take_over(
    sup: Supervisor,
    agent_id: str,
    old_owner: str,
    new: subprocess.Popen[bytes],
    launch: registry_pb2.LaunchSpec,
    placement: registry_pb2.Placement,
) -> None:
    """The new process runs on this node: take the agent's supervision over from ``old_owner``,
    whose replica then stops the old process (it no longer owns the agent)."""
    pid, started, node = new.pid, now(), sup.node.name

    def switched(r: registry_pb2.SupervisedAgent) -> None:
        r.launch.CopyFrom(launch)
        r.pid = pid
        r.started_at.CopyFrom(started)
        r.node = node
        r.placement.CopyFrom(placement)  # where it may run from now on

    if not await sup.adopt(agent_id, old_owner, new, switched):
        # The old owner lost the agent meanwhile (died, stopped it): whoever supervises it now
        # starts it again; this process is not ours to keep.
        log.warning(
            "taking %s over from %s failed: it changed hands; stopping the new process", agent_id, old_owner
        )
        await process.terminate(new, 2.0)
        await sup.revoke_credential(agent_id)


async def _retire(proc: subprocess.Popen[bytes]) -> None:
    await asyncio.sleep(RETIRE_AFTER_S)
    await process.terminate(proc, 5.0)


async def _hand_over(
    sup: Supervisor, owner: str, request: registry_pb2.MigrateAgentRequest, *, node: str | None = None
) -> registry_pb2.MigrateAgentResponse:
    """The replica ``owner`` runs the agent's process (or, with ``node``, is a replica of the node
    the new instance goes to), so it moves it: pass the call on."""
    address = sup.peers.address_of(owner) if sup.peers is not None else None
    if address is None:
        raise errors.service_unavailable(
            "registry",
            f"the registry replica {owner!r} that would move {request.agent_id!r} is not reachable",
        )
    # Without its request_id: this replica holds the id's claim and records the
    # outcome; the owner, seeing the same id pending, would wait for it forever.
    forwarded = registry_pb2.MigrateAgentRequest()
    forwarded.CopyFrom(request)
    forwarded.ClearField("request_id")
    # The node chosen here, in a header: the replica there does not choose again, and records
    # the caller's placement as it was (naming the node in it would pin the agent there).
    metadata = ((PLACED_NODE_HEADER, node),) if node is not None else None
    # The pool's channels carry the service's TLS (client certificate included) when it is on.
    try:
        return await registry_pb2_grpc.RegistryServiceStub(sup.peer_pool.get(address)).MigrateAgent(  # type: ignore[no-any-return]
            forwarded, timeout=HAND_OVER_TIMEOUT_S, metadata=metadata
        )
    except grpc.RpcError as exc:
        # A peer of this service: its status is answered as is (an unreachable one names the registry).
        raise errors.from_rpc_error(exc, service="registry") from None
