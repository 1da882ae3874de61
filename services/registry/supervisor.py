"""Supervised agents: started as processes, watched, restarted per policy.

The desired state of each supervised agent is its record under
``P/supervised/<id>`` (etcd); which registry replica runs it is the owner key
``P/supervisor-owner/<id>``, bound to that replica's lease. Every replica
reconciles: an agent that should run and has no owner is taken (a create-only
transaction, so exactly one replica wins) and started as a child process. When
a replica dies its lease lapses, its owner keys vanish and another replica
takes its agents over; its children die with it (PR_SET_PDEATHSIG). Every
state write is a transaction that checks ownership, so a replica that lost its
lease cannot overwrite the new owner's record, and it kills its children as
soon as it learns that it lost the lease: an agent is not left running twice.

The RPCs (StartAgent, StopAgent, RestartAgent) write the desired state and
wait until the owner reports it reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import timestamp_pb2
from grpc import aio

from mabeam import errors
from mabeam.client import ChannelPool
from mabeam.discovery import EndpointResolver
from mabeam.runtime import process, validate
from mabeam.runtime.cache import PrefixCache
from mabeam.runtime.etcd import EtcdClient, LeaseKeeper, release, try_acquire
from mabeam.server import MeshServer
from mabeam.services.registry.restart_policy import RestartPolicy, RestartTracker, Strategy
from mabeam.services.registry.store import RegistryStore, decode_supervised, new_token
from mabeam.v1 import agent_pb2, agent_pb2_grpc, common_pb2, registry_pb2, registry_pb2_grpc

if TYPE_CHECKING:
    from mabeam.services.registry.directory import AgentDirectory

log = logging.getLogger("mabeam.registry.supervisor")

S = registry_pb2
ACTIVE = (S.SUPERVISION_STATE_STARTING, S.SUPERVISION_STATE_RUNNING, S.SUPERVISION_STATE_RESTARTING)
ENTRY_POINT_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")
STRATEGIES = {
    S.RESTART_STRATEGY_UNSPECIFIED: Strategy.PERMANENT,
    S.RESTART_STRATEGY_PERMANENT: Strategy.PERMANENT,
    S.RESTART_STRATEGY_TRANSIENT: Strategy.TRANSIENT,
    S.RESTART_STRATEGY_TEMPORARY: Strategy.TEMPORARY,
}


def _seconds(d: Any) -> float:
    return float(d.seconds + d.nanos / 1e9)


def policy_of(p: registry_pb2.RestartPolicy, present: bool = True) -> RestartPolicy:
    """The pure policy of a proto policy (defaults: permanent, 3 restarts in 5 s)."""
    if not present:
        return RestartPolicy()
    try:
        return RestartPolicy(
            strategy=STRATEGIES.get(p.strategy, Strategy.PERMANENT),
            max_restarts=p.max_restarts if p.HasField("period") or p.max_restarts else 3,
            period_s=_seconds(p.period) if p.HasField("period") else 5.0,
            backoff_initial_s=_seconds(p.backoff_initial),
            backoff_max_s=_seconds(p.backoff_max) if p.HasField("backoff_max") else 5.0,
        )
    except ValueError as exc:
        field, _, message = str(exc).partition(": ")
        raise errors.InvalidArgument(f"restart_policy.{field}", message) from None


def check_launch(launch: registry_pb2.LaunchSpec) -> None:
    """A launch spec the OS can start a process from, else INVALID_ARGUMENT naming the field."""
    target = launch.WhichOneof("target")
    if target is None:
        raise errors.InvalidArgument("launch", "give a command or a python_entry_point")
    if target == "command" and not launch.command.argv:
        raise errors.InvalidArgument("launch.command.argv", "must not be empty")
    if target == "python_entry_point" and not ENTRY_POINT_RE.match(launch.python_entry_point):
        raise errors.InvalidArgument("launch.python_entry_point", "must look like 'package.module:callable'")
    # What exec refuses (a NUL byte, a malformed variable name) is refused here, not by the supervisor.
    for i, arg in enumerate(launch.command.argv):
        if "\x00" in arg:
            raise errors.InvalidArgument(f"launch.command.argv[{i}]", "must not contain a NUL character")
    for name, value in launch.env.items():
        if not name or "=" in name or "\x00" in name:
            raise errors.InvalidArgument("launch.env", f"{name[:140]!r} is not an environment variable name")
        if "\x00" in value:
            raise errors.InvalidArgument(f"launch.env[{name}]", "must not contain a NUL character")
    if "\x00" in launch.working_dir:
        raise errors.InvalidArgument("launch.working_dir", "must not contain a NUL character")


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


class Supervisor:
    """One registry replica's share of the supervision work."""

    def __init__(
        self, server: MeshServer, etcd: EtcdClient, store: RegistryStore, directory: AgentDirectory
    ) -> None:
        self._server = server
        self._etcd = etcd
        self._store = store
        self._directory = directory
        self.replica_id = server.instance_id
        self.records: PrefixCache[registry_pb2.SupervisedAgent] = PrefixCache(
            etcd, store.keys.supervised, decode_supervised
        )
        self.owners: PrefixCache[str] = PrefixCache(etcd, store.keys.owners, lambda k, v: bytes(v).decode())
        self._keeper: LeaseKeeper | None = None
        self._children: dict[str, asyncio.Task[None]] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._wake = asyncio.Event()
        self._migrations: dict[
            str, tuple[registry_pb2.MigrateAgentRequest, asyncio.Future[registry_pb2.MigrateAgentResponse]]
        ] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._peers: EndpointResolver | None = None
        self.pool = ChannelPool(server.config.client_tls())

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        await self.records.start()
        await self.owners.start()
        self.records.add_listener(lambda *a: self._wake.set())
        self.owners.add_listener(lambda *a: self._wake.set())
        self._keeper = LeaseKeeper(self._etcd, self._server.config.service_ttl)
        await self._keeper.start()
        config = self._server.config
        self._peers = EndpointResolver(config.etcd_endpoints, config.prefix, "registry", tls=config.etcd_tls)
        await self._peers.start()
        self._server.spawn(self._reconcile_loop(), "supervisor")
        self._server.on_stop(self.stop)

    async def stop(self) -> None:
        """Stop this replica's children; release their ownership so another replica takes them."""
        children, self._children = self._children, {}
        for task in children.values():
            task.cancel()
        await asyncio.gather(*children.values(), return_exceptions=True)
        for task in list(self._retiring):
            task.cancel()
        if self._keeper is not None:
            await self._keeper.revoke()
        if self._peers is not None:
            await self._peers.stop()
        await self.pool.close()
        await self.records.stop()
        await self.owners.stop()

    def all(self) -> list[registry_pb2.SupervisedAgent]:
        return [r for _, r in sorted(self.records.items())]

    async def is_supervised(self, agent_id: str) -> bool:
        record = self.records.get(self._store.keys.supervised_agent(agent_id))
        return record is not None and record.state in ACTIVE

    def _record(self, agent_id: str) -> registry_pb2.SupervisedAgent | None:
        return self.records.get(self._store.keys.supervised_agent(agent_id))

    # -- reconciliation -----------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            self._wake.clear()
            try:
                await self._reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("supervision pass failed: %s", exc)

    async def _reconcile(self) -> None:
        assert self._keeper is not None
        if self._keeper.lost.is_set():
            # Our ownerships lapsed with the lease: another replica may run our
            # agents now, so ours must stop before anything else.
            log.warning("supervisor lease lost: stopping %d children", len(self._children))
            children, self._children = self._children, {}
            for task in children.values():
                task.cancel()
            await asyncio.gather(*children.values(), return_exceptions=True)
            self._keeper = LeaseKeeper(self._etcd, self._server.config.service_ttl)
            await self._keeper.start()
        for _key, record in list(self.records.items()):
            agent_id = record.agent_id
            owner = self.owners.get(self._store.keys.owner(agent_id))
            running_here = agent_id in self._children and not self._children[agent_id].done()
            if record.state in ACTIVE and not running_here:
                if owner is None or owner == self.replica_id:
                    if await try_acquire(
                        self._etcd, self._store.keys.owner(agent_id), self.replica_id, self._keeper.lease_id
                    ):
                        self._children[agent_id] = asyncio.create_task(
                            self._supervise(agent_id), name=f"supervise:{agent_id}"
                        )
            elif record.state not in ACTIVE and running_here:
                self._children.pop(agent_id).cancel()
            elif owner is not None and owner != self.replica_id and running_here:
                log.warning("lost ownership of %s to %s: stopping it here", agent_id, owner)
                self._children.pop(agent_id).cancel()
        known = {r.agent_id for _, r in self.records.items()}
        for agent_id in list(self._children):
            if agent_id not in known:
                self._children.pop(agent_id).cancel()

    async def _write(self, agent_id: str, change: Callable[[registry_pb2.SupervisedAgent], None]) -> bool:
        """Apply ``change`` to the record, only while this replica owns the agent."""
        current = await self._etcd.get(self._store.keys.supervised_agent(agent_id))
        if current is None:
            return False
        record = registry_pb2.SupervisedAgent.FromString(current.value)
        change(record)
        record.supervisor_id = self.replica_id
        c = self._etcd
        ok, _ = await c.transaction(
            compare=[
                c.transactions.value(self._store.keys.owner(agent_id)) == self.replica_id.encode(),
                c.transactions.mod(self._store.keys.supervised_agent(agent_id)) == current.mod_revision,
            ],
            success=[
                c.transactions.put(self._store.keys.supervised_agent(agent_id), record.SerializeToString())
            ],
            failure=[],
        )
        return bool(ok)

    async def _write_retrying(
        self, agent_id: str, change: Callable[[registry_pb2.SupervisedAgent], None]
    ) -> bool:
        for _ in range(20):
            if await self._write(agent_id, change):
                return True
            owner = await self._etcd.get(self._store.keys.owner(agent_id))
            if owner is None or bytes(owner.value).decode() != self.replica_id:
                return False
            await asyncio.sleep(0.02)
        return False

    async def _secret(self, agent_id: str) -> str:
        got = await self._etcd.get(self._store.keys.supervised_token(agent_id))
        return bytes(got.value).decode() if got is not None else ""

    def _argv_env(
        self, record: registry_pb2.SupervisedAgent, token: str = ""
    ) -> tuple[list[str], dict[str, str], str | None]:
        launch = record.launch
        if launch.WhichOneof("target") == "python_entry_point":
            argv = process.python_module_argv("mabeam.run_agent", launch.python_entry_point)
        else:
            argv = list(launch.command.argv)
        config = self._server.config
        env = {
            **os.environ,
            **dict(launch.env),
            "MABEAM_AGENT_ID": record.agent_id,
            "MABEAM_AGENT_TOKEN": token,
            "MABEAM_REGISTRY": self._server.address,
            "MABEAM_ETCD": ",".join(config.etcd_endpoints),
            "MABEAM_PREFIX": config.prefix,
            "PYTHONUNBUFFERED": "1",
        }
        return argv, env, launch.working_dir or None

    async def _supervise(self, agent_id: str) -> None:
        """Run one agent's process for as long as this replica owns it."""
        record = self._record(agent_id)
        if record is None:
            return
        tracker = RestartTracker(policy_of(record.restart_policy))
        proc: subprocess.Popen[bytes] | None = None
        try:
            while True:
                record = self._record(agent_id)
                if record is None or record.state not in ACTIVE:
                    return
                argv, env, cwd = self._argv_env(record, await self._secret(agent_id))
                started = _now()
                try:
                    proc = process.spawn(argv, env=env, cwd=cwd)
                # ValueError: exec refuses the spec (e.g. a NUL byte in a record older than check_launch).
                except (OSError, ValueError) as exc:
                    await self._write_retrying(
                        agent_id, functools.partial(self._failed, reason=f"cannot start: {exc}")
                    )
                    return
                self._procs[agent_id] = proc
                pid = proc.pid

                def starting(r: registry_pb2.SupervisedAgent, pid: int = pid, started: Any = started) -> None:
                    r.state = S.SUPERVISION_STATE_STARTING
                    r.pid = pid
                    r.started_at.CopyFrom(started)

                if not await self._write_retrying(agent_id, starting):
                    return
                timeout = record_start_timeout(record)
                outcome = await self._await_registration(agent_id, proc, started, timeout)
                if outcome == "registered":
                    await self._write_retrying(agent_id, _running)
                    outcome = await self._await_exit_or_restart(agent_id, proc)
                    while outcome == "migrate":
                        proc = await self._migrate_process(agent_id, proc)
                        outcome = await self._await_exit_or_restart(agent_id, proc)
                if outcome == "restart-requested":
                    await process.terminate(proc, 5.0)
                    await self._drop_registration(agent_id)
                    continue
                if outcome == "timeout":
                    proc.kill()
                await process.wait_exit(proc)
                await self._drop_registration(agent_id)
                code = proc.returncode
                exit_code, sig = (None, -code) if code is not None and code < 0 else (code, None)
                if outcome == "timeout":
                    exit_code, sig = None, signal.SIGKILL
                decision = tracker.on_exit(exit_code, sig, time.monotonic())
                how = f"exit code {exit_code}" if sig is None else f"signal {sig}"
                if outcome == "timeout":
                    how = "did not register within the start timeout"
                if decision.give_up:
                    failed = functools.partial(self._failed, reason=decision.reason, how=how)
                    await self._write_retrying(agent_id, failed)
                    return
                if not decision.restart:

                    def stopped(r: registry_pb2.SupervisedAgent, d: Any = decision, h: str = how) -> None:
                        r.state, r.pid, r.last_exit, r.reason = S.SUPERVISION_STATE_STOPPED, 0, h, d.reason

                    await self._write_retrying(agent_id, stopped)
                    return

                def restarting(r: registry_pb2.SupervisedAgent, h: str = how) -> None:
                    r.state, r.pid, r.last_exit = S.SUPERVISION_STATE_RESTARTING, 0, h
                    r.restart_count += 1

                await self._write_retrying(agent_id, restarting)
                await asyncio.sleep(decision.delay_s)
        finally:
            if proc is not None and proc.poll() is None:
                await asyncio.shield(process.terminate(proc, 5.0))
            self._procs.pop(agent_id, None)
            if proc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._after_stop(agent_id))

    async def _drop_registration(self, agent_id: str) -> None:
        """The process is dead: remove its registration now instead of after its TTL.

        The supervisor owns the agent, so it may; and the restarted process can
        then register under the same id at once.
        """
        with contextlib.suppress(Exception):
            agent, _ = await self._store.get_agent(agent_id)
            if agent is not None:
                await self._etcd.revoke_lease(agent.lease_id)

    async def _after_stop(self, agent_id: str) -> None:
        def stopped(r: registry_pb2.SupervisedAgent) -> None:
            r.pid = 0

        await self._write(agent_id, stopped)
        record = self._record(agent_id)
        if record is None or record.state not in ACTIVE:
            await release(self._etcd, self._store.keys.owner(agent_id), self.replica_id)

    @staticmethod
    def _failed(r: registry_pb2.SupervisedAgent, reason: str, how: str = "") -> None:
        r.state, r.pid, r.reason = S.SUPERVISION_STATE_FAILED, 0, reason
        if how:
            r.last_exit = how

    async def _await_registration(
        self, agent_id: str, proc: subprocess.Popen[bytes], started: timestamp_pb2.Timestamp, timeout: float
    ) -> str:
        deadline = time.monotonic() + timeout
        # Only a registration made after this start counts (not the last process's).
        since = started.seconds + started.nanos / 1e9
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return "exited"
            agent = self._directory.agents.get(self._store.keys.agent(agent_id))
            if agent is not None and agent.registered_at.seconds + agent.registered_at.nanos / 1e9 >= since:
                return "registered"
            await asyncio.sleep(0.01)
        return "timeout"

    async def _await_exit_or_restart(self, agent_id: str, proc: subprocess.Popen[bytes]) -> str:
        exit_waiter = asyncio.ensure_future(process.wait_exit(proc))
        try:
            while not exit_waiter.done():
                record = self._record(agent_id)
                if (
                    record is not None
                    and record.state == S.SUPERVISION_STATE_RESTARTING
                    and record.reason == RESTART_REQUESTED
                ):
                    return "restart-requested"
                if agent_id in self._migrations:
                    return "migrate"
                # Wake on the exit at once; look at the desired state now and then.
                await asyncio.wait({exit_waiter}, timeout=0.1)
            return "exited"
        finally:
            exit_waiter.cancel()

    async def _migrate_process(self, agent_id: str, old: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        """Move a supervised agent to a new process: start it (standby), migrate, stop the old one.

        Returns the process supervised from now on (the old one if the move failed).
        """
        request, done = self._migrations.pop(agent_id)
        record = self._record(agent_id)
        assert record is not None
        moved = registry_pb2.SupervisedAgent()
        moved.CopyFrom(record)
        moved.launch.CopyFrom(request.launch)
        argv, env, cwd = self._argv_env(moved, await self._secret(agent_id))
        env["MABEAM_STANDBY"] = "1"
        try:
            new = process.spawn(argv, env=env, cwd=cwd, stdout=subprocess.PIPE)
        except (OSError, ValueError) as exc:  # the old process keeps serving
            done.set_exception(
                errors.FailedPrecondition(f"cannot start the new instance of {agent_id!r}: {exc}")
            )
            return old
        try:
            address = await asyncio.wait_for(_serving_address(new), record_start_timeout(record))
            target = registry_pb2.MigrateAgentRequest(
                agent_id=agent_id, token=request.token, target_endpoint=address
            )
            response = await migrate(self._etcd, self._store, self._directory, target, self.pool)
        except BaseException as exc:
            await process.terminate(new, 2.0)
            if not done.done():
                done.set_exception(
                    exc if isinstance(exc, Exception) else errors.Internal("migration interrupted")
                )
            if isinstance(exc, Exception):
                return old
            raise
        self._procs[agent_id] = new
        pid, started = new.pid, _now()

        def switched(r: registry_pb2.SupervisedAgent) -> None:
            r.launch.CopyFrom(request.launch)
            r.pid = pid
            r.started_at.CopyFrom(started)

        await self._write_retrying(agent_id, switched)
        done.set_result(response)
        # The old instance forwards what it held once it sees the switch (it polls
        # its registration every 20 ms); then it is stopped, with its own grace.
        retire = asyncio.create_task(_retire(old), name=f"retire:{agent_id}")
        self._retiring.add(retire)
        retire.add_done_callback(self._retiring.discard)
        return new

    # -- RPCs ---------------------------------------------------------------

    async def start_agent(
        self, request: registry_pb2.StartAgentRequest
    ) -> tuple[registry_pb2.SupervisedAgent, str]:
        agent_id = validate.identifier(request.agent_id, "agent_id")
        check_launch(request.launch)
        policy_of(request.restart_policy, request.HasField("restart_policy"))
        timeout = validate.seconds(
            request.start_timeout, "start_timeout", default=10.0, minimum=0.1, maximum=600
        )
        key = self._store.keys.supervised_agent(agent_id)
        existing = await self._etcd.get(key)
        if existing is not None:
            rec = registry_pb2.SupervisedAgent.FromString(existing.value)
            if rec.state in ACTIVE:
                raise errors.AlreadyExists(
                    f"agent {agent_id!r} is already supervised ({S.SupervisionState.Name(rec.state)})"
                )
        elif self._directory.get(agent_id) is not None:
            raise errors.AlreadyExists(
                f"agent {agent_id!r} is registered and not supervised",
                reason=common_pb2.ERROR_REASON_AGENT_ALREADY_REGISTERED,
            )
        record = registry_pb2.SupervisedAgent(
            agent_id=agent_id,
            launch=request.launch,
            restart_policy=request.restart_policy,
            state=S.SUPERVISION_STATE_STARTING,
        )
        record.start_timeout.FromNanoseconds(int(timeout * 1e9))
        c = self._etcd
        expected = existing.mod_revision if existing is not None else 0
        compare = (
            c.transactions.mod(key) == expected if existing is not None else c.transactions.create(key) == 0
        )
        # The supervisor chooses the agent's token and gives it to every process it
        # starts for the agent, so whoever started it can migrate or deregister it.
        token = new_token()
        ok, _ = await c.transaction(
            compare=[compare],
            success=[
                c.transactions.put(key, record.SerializeToString()),
                c.transactions.put(self._store.keys.supervised_token(agent_id), token.encode()),
            ],
            failure=[],
        )
        if not ok:
            raise errors.Aborted(f"agent {agent_id!r} was started concurrently")
        self._wake.set()
        started = await self._wait(
            agent_id, lambda r: r.state == S.SUPERVISION_STATE_RUNNING or r.state not in ACTIVE, timeout + 5
        )
        return started, token

    async def stop_agent(self, request: registry_pb2.StopAgentRequest) -> registry_pb2.SupervisedAgent:
        agent_id = validate.identifier(request.agent_id, "agent_id")
        grace = validate.seconds(request.grace, "grace", default=5.0, minimum=0, maximum=300)

        def stop(r: registry_pb2.SupervisedAgent) -> None:
            r.state, r.reason = S.SUPERVISION_STATE_STOPPED, "stopped on request"

        await self._update_desired(agent_id, stop)
        self._wake.set()
        return await self._wait(agent_id, lambda r: r.pid == 0, grace + 10)

    async def restart_agent(self, request: registry_pb2.RestartAgentRequest) -> registry_pb2.SupervisedAgent:
        agent_id = validate.identifier(request.agent_id, "agent_id")
        before = self._record(agent_id)

        def restart(r: registry_pb2.SupervisedAgent) -> None:
            if r.state not in ACTIVE:
                raise errors.FailedPrecondition(
                    f"agent {agent_id!r} is {S.SupervisionState.Name(r.state)}: start it with StartAgent"
                )
            r.state, r.reason = S.SUPERVISION_STATE_RESTARTING, RESTART_REQUESTED

        await self._update_desired(agent_id, restart)
        old_start = before.started_at.seconds + before.started_at.nanos / 1e9 if before else 0.0
        return await self._wait(
            agent_id,
            lambda r: (
                (
                    r.state == S.SUPERVISION_STATE_RUNNING
                    and r.started_at.seconds + r.started_at.nanos / 1e9 > old_start
                )
                or r.state not in ACTIVE
            ),
            30.0,
        )

    async def _update_desired(
        self, agent_id: str, change: Callable[[registry_pb2.SupervisedAgent], None]
    ) -> None:
        key = self._store.keys.supervised_agent(agent_id)
        c = self._etcd
        for _ in range(50):
            current = await c.get(key)
            if current is None:
                raise errors.NotFound(f"agent {agent_id!r} is not supervised (start it with StartAgent)")
            record = registry_pb2.SupervisedAgent.FromString(current.value)
            change(record)
            ok, _ = await c.transaction(
                compare=[c.transactions.mod(key) == current.mod_revision],
                success=[c.transactions.put(key, record.SerializeToString())],
                failure=[],
            )
            if ok:
                return
            await asyncio.sleep(0.01)
        raise errors.Aborted(f"agent {agent_id!r} changed too often to update; retry")

    async def _wait(
        self, agent_id: str, done: Callable[[registry_pb2.SupervisedAgent], bool], timeout: float
    ) -> registry_pb2.SupervisedAgent:
        deadline = time.monotonic() + timeout
        while True:
            got = await self._etcd.get(self._store.keys.supervised_agent(agent_id))
            if got is None:
                raise errors.NotFound(f"agent {agent_id!r} is no longer supervised")
            record = registry_pb2.SupervisedAgent.FromString(got.value)
            if done(record):
                if record.state == S.SUPERVISION_STATE_FAILED:
                    raise errors.FailedPrecondition(
                        f"agent {agent_id!r} failed: {record.reason} ({record.last_exit})"
                    )
                return record
            if time.monotonic() > deadline:
                raise errors.DeadlineExceeded(
                    f"agent {agent_id!r} is {S.SupervisionState.Name(record.state)} after {timeout:.0f} s"
                )
            await asyncio.sleep(0.05)

    async def migrate_agent(
        self, request: registry_pb2.MigrateAgentRequest
    ) -> registry_pb2.MigrateAgentResponse:
        if request.WhichOneof("target") != "launch":
            return await migrate(self._etcd, self._store, self._directory, request, self.pool)
        agent_id = validate.identifier(request.agent_id, "agent_id")
        check_launch(request.launch)
        record = self._record(agent_id)
        if record is None or record.state not in ACTIVE:
            raise errors.FailedPrecondition(
                f"agent {agent_id!r} is not a running supervised agent: migrate it with target_endpoint"
            )
        if not await self._store.token_matches(agent_id, request.token):
            raise errors.PermissionDenied(f"wrong or missing token for agent {agent_id!r}")
        owner = self.owners.get(self._store.keys.owner(agent_id))
        if owner is not None and owner != self.replica_id:
            # The replica that runs the agent's process moves it: hand the call over.
            address = self._peers.address_of(owner) if self._peers is not None else None
            if address is None:
                raise errors.Unavailable(f"the registry replica supervising {agent_id!r} is not reachable")
            async with aio.insecure_channel(address) as channel:
                try:
                    return await registry_pb2_grpc.RegistryServiceStub(channel).MigrateAgent(
                        request, timeout=60
                    )
                except grpc.RpcError as exc:
                    raise errors.from_rpc_error(exc) from None
        if agent_id in self._migrations or agent_id not in self._children:
            raise errors.FailedPrecondition(f"agent {agent_id!r} is already moving, or not running here yet")
        done: asyncio.Future[registry_pb2.MigrateAgentResponse] = asyncio.get_running_loop().create_future()
        self._migrations[agent_id] = (request, done)
        try:
            return await asyncio.wait_for(asyncio.shield(done), 60)
        except TimeoutError:
            raise errors.DeadlineExceeded(f"migrating {agent_id!r} took longer than 60 s") from None


RESTART_REQUESTED = "restart requested"
RETIRE_AFTER_S = 1.0


async def _serving_address(proc: subprocess.Popen[bytes]) -> str:
    """The address from an agent process's 'mabeam agents serving on HOST:PORT: ids' line."""
    assert proc.stdout is not None
    while True:
        line = await asyncio.to_thread(proc.stdout.readline)
        if not line:
            raise errors.FailedPrecondition(f"the new instance exited (status {proc.poll()}) before serving")
        text = line.decode(errors="replace").strip()
        if text.startswith("mabeam agents serving on "):
            return text.removeprefix("mabeam agents serving on ").split(": ", 1)[0]


async def _retire(proc: subprocess.Popen[bytes]) -> None:
    await asyncio.sleep(RETIRE_AFTER_S)
    await process.terminate(proc, 5.0)


def _running(r: registry_pb2.SupervisedAgent) -> None:
    r.state, r.reason = S.SUPERVISION_STATE_RUNNING, ""


def record_start_timeout(record: registry_pb2.SupervisedAgent) -> float:
    return _seconds(record.start_timeout) or 10.0


async def migrate(
    etcd: EtcdClient,
    store: RegistryStore,
    directory: AgentDirectory,
    request: registry_pb2.MigrateAgentRequest,
    pool: ChannelPool,
) -> registry_pb2.MigrateAgentResponse:
    """Move a live agent to an instance already serving at ``target_endpoint``.

    1. The old instance exports its state; from then on it holds new calls.
    2. The new instance imports it.
    3. The registration switches to the new endpoint in one transaction
       (generation + 1).
    4. The old instance sees the switch (it watches its own registration),
       forwards the calls it held and every later one to the new endpoint, and
       stops. Callers see one agent throughout; nothing is lost.
    """
    agent_id = validate.identifier(request.agent_id, "agent_id")
    agent, create_revision = await store.get_agent(agent_id)
    if agent is None:
        raise errors.NotFound(
            f"agent {agent_id!r} is not registered", reason=common_pb2.ERROR_REASON_AGENT_NOT_FOUND
        )
    if not await store.token_matches(agent_id, request.token):
        raise errors.PermissionDenied(f"wrong or missing token for agent {agent_id!r}")
    if request.WhichOneof("target") != "target_endpoint":
        raise errors.InvalidArgument(
            "target_endpoint", "give the host:port of a running instance (launch specs are not supported yet)"
        )
    target = validate.endpoint(request.target_endpoint, "target_endpoint")
    if target == agent.endpoint:
        raise errors.InvalidArgument("target_endpoint", "is the agent's current endpoint")
    started = time.monotonic()
    # The pool's channels are reused, and carry TLS when it is on.
    old = agent_pb2_grpc.AgentServiceStub(pool.get(agent.endpoint))
    new = agent_pb2_grpc.AgentServiceStub(pool.get(target))
    try:
        exported = await old.ExportState(agent_pb2.ExportStateRequest(agent_id=agent_id), timeout=30)
    except grpc.RpcError as exc:
        raise errors.FailedPrecondition(
            f"exporting the state of {agent_id!r} failed: {exc.details()}"
        ) from None
    try:
        await new.ImportState(
            agent_pb2.ImportStateRequest(
                agent_id=agent_id, state=exported.state, content_type=exported.content_type
            ),
            timeout=30,
        )
    except grpc.RpcError as exc:
        # Give the old instance its state back so it resumes serving.
        with contextlib.suppress(grpc.RpcError):
            await old.ImportState(
                agent_pb2.ImportStateRequest(
                    agent_id=agent_id, state=exported.state, content_type=exported.content_type
                ),
                timeout=30,
            )
        raise errors.FailedPrecondition(
            f"importing the state into {target} failed: {exc.details()}"
        ) from None
    moved = registry_pb2.Agent()
    moved.CopyFrom(agent)
    moved.endpoint = target
    moved.generation = agent.generation + 1
    if not await store.put_agent(moved, agent.lease_id, create_revision):
        raise errors.Aborted(f"agent {agent_id!r} re-registered during the migration; retry")
    pause = time.monotonic() - started
    response = registry_pb2.MigrateAgentResponse(agent=directory.view(moved), state_bytes=len(exported.state))
    response.pause.FromNanoseconds(int(pause * 1e9))
    return response


__all__ = ["Supervisor", "migrate", "policy_of"]
