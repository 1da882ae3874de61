"""etcd's upkeep from the mesh: alarms, database size, compaction, defragmentation.

etcd runs with periodic auto-compaction and an explicit space quota
(:mod:`mabeam.runtime.embedded_etcd`, ``compose.yaml``). When its database
still reaches the quota, etcd raises the cluster-wide NOSPACE alarm and
refuses every write (``RESOURCE_EXHAUSTED``, reason ``STORE_EXHAUSTED``)
while reads, watches and lease keep-alives go on. This module is what the
mesh does about it (``docs/operations.md``):

* :class:`AlarmWatch`: one per service replica; asks etcd's alarm list every
  few seconds (and at once when a write was refused for lack of space) and
  tells its listeners when the NOSPACE alarm comes and goes. The services
  report it as the health check name :data:`STORE_HEALTH`.
* :func:`alarms`, :func:`member_status`, :func:`quota_bytes`: what ``mabeam
  status`` and ``mabeam maintenance status`` show.
* :func:`compact`, :func:`defragment`, :func:`disarm`: the recovery, behind
  ``mabeam maintenance compact|defrag|disarm``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import ssl
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import aetcd.exceptions
import aetcd.rpc
import grpc
from grpc import aio

from mabeam.runtime.etcd.client import UNREACHABLE, EtcdClient, connect, log
from mabeam.tls import TLS

__all__ = [
    "ALARM_CHECK_INTERVAL_S",
    "NOSPACE",
    "STORE_HEALTH",
    "Alarm",
    "AlarmWatch",
    "MemberStatus",
    "alarms",
    "compact",
    "defragment",
    "disarm",
    "member_status",
    "quota_bytes",
]

# The health check name (grpc.health.v1) under which each service replica says
# whether etcd accepts writes: NOT_SERVING while the NOSPACE alarm is active.
# The replica's own health ("" and its service name) stays SERVING: reads,
# watches and heartbeats still work (docs/decisions.md, "etcd upkeep").
STORE_HEALTH = "mabeam.store"
NOSPACE = "NOSPACE"
ALARM_CHECK_INTERVAL_S = 3.0
_CALL_TIMEOUT_S = 2.0
# Defragmenting a member blocks it while it rewrites its database: seconds per GiB.
DEFRAG_TIMEOUT_S = 300.0


@dataclasses.dataclass(frozen=True)
class Alarm:
    """One active etcd alarm: the member that raised it and its kind (``NOSPACE``, ``CORRUPT``)."""

    member_id: int
    kind: str


@dataclasses.dataclass(frozen=True)
class MemberStatus:
    """One member's answer to etcd's Maintenance Status (sizes in bytes)."""

    endpoint: str
    member_id: int
    version: str
    db_size: int
    db_size_in_use: int
    leader: int
    revision: int
    errors: tuple[str, ...]

    @property
    def is_leader(self) -> bool:
        """True when this member is the cluster's leader."""
        return self.member_id == self.leader


def _kind(value: int) -> str:
    return str(aetcd.rpc.AlarmType.Name(value))


async def _stub(client: EtcdClient) -> aetcd.rpc.MaintenanceStub:
    await client.connect()
    assert client.maintenancestub is not None
    return client.maintenancestub


async def _rpc(call: Awaitable[Any]) -> Any:
    """Await a raw stub call, its grpc error raised as aetcd's exception (as aetcd's own calls do)."""
    try:
        return await call
    except aio.AioRpcError as exc:
        aetcd.exceptions._handle_exception(exc)
        raise


async def alarms(client: EtcdClient, timeout: float | None = _CALL_TIMEOUT_S) -> list[Alarm]:
    """The cluster's active alarms (alarms are replicated: any member answers for all)."""
    stub = await _stub(client)
    request = aetcd.rpc.AlarmRequest(action=aetcd.rpc.AlarmRequest.GET, memberID=0, alarm=aetcd.rpc.NONE)
    reply = await _rpc(stub.Alarm(request, timeout=timeout, metadata=client.metadata))
    return [Alarm(int(a.memberID), _kind(a.alarm)) for a in reply.alarms]


async def disarm(client: EtcdClient, timeout: float | None = 10.0) -> list[Alarm]:
    """Deactivate every active NOSPACE alarm; the alarms disarmed.

    Disarm only after space was freed (:func:`compact`, then :func:`defragment`
    each member): a database still over the quota raises the alarm again at
    the next write.
    """
    stub = await _stub(client)
    disarmed = []
    for alarm in await alarms(client, timeout):
        if alarm.kind != NOSPACE:
            continue
        request = aetcd.rpc.AlarmRequest(
            action=aetcd.rpc.AlarmRequest.DEACTIVATE, memberID=alarm.member_id, alarm=aetcd.rpc.NOSPACE
        )
        await _rpc(stub.Alarm(request, timeout=timeout, metadata=client.metadata))
        disarmed.append(alarm)
    return disarmed


async def compact(client: EtcdClient, timeout: float | None = 60.0) -> int:
    """Compact etcd's history up to the current revision (physically); the revision compacted to.

    Every key keeps its latest value; older versions are gone (a watch that
    resumes from before it makes a watch-fed cache list again). The space
    becomes free inside the database; :func:`defragment` gives it back.
    """
    await client.connect()
    assert client.kvstub is not None
    kv = client.kvstub
    head = await _rpc(
        kv.Range(aetcd.rpc.RangeRequest(key=b"\0", limit=1), timeout=timeout, metadata=client.metadata)
    )
    revision = int(head.header.revision)
    request = aetcd.rpc.CompactionRequest(revision=revision, physical=True)
    try:
        await _rpc(kv.Compact(request, timeout=timeout, metadata=client.metadata))
    except aetcd.exceptions.ClientError as exc:
        cause = exc.__cause__
        # Already compacted to this revision (auto-compaction got there first): nothing to do.
        if not (isinstance(cause, aio.AioRpcError) and cause.code() == grpc.StatusCode.OUT_OF_RANGE):
            raise
    return revision


async def member_status(
    endpoint: str, tls: TLS | None = None, timeout: float = _CALL_TIMEOUT_S
) -> MemberStatus:
    """The Maintenance Status of the member at ``endpoint`` (asked of it alone)."""
    client = await connect([endpoint], tls=tls, timeout=timeout)
    try:
        stub = await _stub(client)
        r = await _rpc(stub.Status(aetcd.rpc.StatusRequest(), timeout=timeout, metadata=client.metadata))
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    return MemberStatus(
        endpoint=endpoint,
        member_id=int(r.header.member_id),
        version=str(r.version),
        db_size=int(r.dbSize),
        db_size_in_use=int(r.dbSizeInUse),
        leader=int(r.leader),
        revision=int(r.header.revision),
        errors=tuple(str(e) for e in r.errors),
    )


async def defragment(
    endpoint: str, tls: TLS | None = None, timeout: float = DEFRAG_TIMEOUT_S
) -> MemberStatus:
    """Defragment the member at ``endpoint`` and return its status afterwards.

    The member blocks reads and writes while it rewrites its database, so
    defragment members one at a time (``mabeam maintenance defrag`` does).
    """
    client = await connect([endpoint], tls=tls, timeout=timeout)
    try:
        stub = await _stub(client)
        await _rpc(stub.Defragment(aetcd.rpc.DefragmentRequest(), timeout=timeout, metadata=client.metadata))
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    return await member_status(endpoint, tls)


_QUOTA_METRIC = re.compile(rb"^etcd_server_quota_backend_bytes\s+([0-9.e+]+)\s*$", re.M)


def _fetch_metrics(url: str, tls: TLS | None, timeout: float) -> bytes:
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context(cafile=tls.ca_file if tls and tls.ca_file else None)
        if tls is not None and tls.cert_file and tls.key_file:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    with opener.open(url.rstrip("/") + "/metrics", timeout=timeout) as reply:
        return bytes(reply.read())


async def quota_bytes(endpoint: str, tls: TLS | None = None, timeout: float = _CALL_TIMEOUT_S) -> int | None:
    """The member's space quota in bytes, from its ``/metrics``; None when it cannot be read.

    etcd 3.5's Status does not carry the quota; its metrics do
    (``etcd_server_quota_backend_bytes``).
    """
    try:
        body = await asyncio.to_thread(_fetch_metrics, endpoint, tls, timeout)
    except (OSError, ValueError, ssl.SSLError):
        return None
    found = _QUOTA_METRIC.search(body)
    return int(float(found.group(1))) if found else None


class AlarmWatch:
    """Follows etcd's NOSPACE alarm for one service replica and tells its listeners when it changes.

    One AlarmList call every ``interval`` seconds (cheap: the alarms are in
    memory on every member), and one at once after :meth:`check_soon` (a write
    refused for lack of space). A failed check (etcd unreachable) leaves the
    last answer standing: whether etcd is reachable is the caches' health.
    """

    def __init__(self, client: EtcdClient, interval: float = ALARM_CHECK_INTERVAL_S) -> None:
        self._client = client
        self._interval = interval
        self._listeners: list[Callable[[tuple[Alarm, ...]], None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.active: tuple[Alarm, ...] = ()

    @property
    def nospace(self) -> bool:
        """True while etcd's NOSPACE alarm is active (as of the last check)."""
        return any(a.kind == NOSPACE for a in self.active)

    def add_listener(self, listener: Callable[[tuple[Alarm, ...]], None]) -> None:
        """Call ``listener(active_alarms)`` whenever the set of active alarms changes."""
        self._listeners.append(listener)

    def check_soon(self) -> None:
        """Check now rather than at the next tick (safe from any code on the loop's thread)."""
        self._wake.set()

    async def check(self) -> tuple[Alarm, ...]:
        """Ask etcd once, tell the listeners if the alarms changed; the active alarms."""
        found = tuple(sorted(await alarms(self._client), key=lambda a: (a.kind, a.member_id)))
        if found != self.active:
            self.active = found
            if found:
                log.warning(
                    "etcd alarm active: %s; writes are refused until an operator frees space "
                    "(mabeam maintenance compact, defrag, disarm)",
                    ", ".join(f"{a.kind} (member {a.member_id:x})" for a in found),
                )
            else:
                log.warning("etcd alarms cleared: writes are accepted again")
            for listener in self._listeners:
                try:
                    listener(found)
                except Exception:
                    log.exception("etcd alarm listener failed")
        return found

    def start(self) -> None:
        """Start checking in the background; :meth:`stop` ends it."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="etcd-alarm-watch")

    async def stop(self) -> None:
        """Stop checking; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while not self._client.closed:
            try:
                await self.check()
            except (*UNREACHABLE, aetcd.exceptions.ClientError, aio.AioRpcError, OSError) as exc:
                log.debug("etcd alarm check failed: %s", exc)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
