"""How a variable is written: compare-and-set, same type, last-write-wins, or plainly.

Each write is one transaction of :mod:`.store`; the ones that read first
(same type, last-write-wins) retry while the variable moves between the read
and the write, and give up with ABORTED after a bounded number of tries.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass

import stamina

from mabeam import errors
from mabeam.runtime.idempotency import TxnOps
from mabeam.services.orchestrator import variables
from mabeam.services.orchestrator.store import LeaseNotFound, VariableStore
from mabeam.v1 import common_pb2, orchestrator_pb2

# Reads and writes tried while the variable keeps moving in between.
SAME_TYPE_TRIES = 20
LAST_WRITE_WINS_TRIES = 50


@dataclass
class Written:
    """The outcome of a write: the variable as stored now, and why it was not applied."""

    variable: orchestrator_pb2.Variable | None
    applied: bool = True
    reason: str = ""


class _Moved(Exception):
    """The variable changed between the read and the write: read and try again."""


def version_mismatch(name: str, expected: int, current: orchestrator_pb2.Variable | None) -> errors.Aborted:
    version = current.version if current is not None else 0
    return errors.Aborted(
        f"variable {name!r} is at version {version}, not the expected {expected}",
        metadata={"current_version": str(version)},
    )


def check_type(name: str, current: orchestrator_pb2.Variable, value: common_pb2.Value) -> None:
    """FAILED_PRECONDITION unless ``value`` is of the type the variable holds."""
    if variables.kind_of(current.value) != variables.kind_of(value):
        raise errors.FailedPrecondition(
            f"variable {name!r} holds a {variables.kind_of(current.value)}, not a {variables.kind_of(value)}",
            reason=common_pb2.ERROR_REASON_TYPE_MISMATCH,
        )


async def _stored(
    write: Awaitable[tuple[bool, orchestrator_pb2.Variable | None]], lease: int
) -> tuple[bool, orchestrator_pb2.Variable | None]:
    """The write's outcome; a lease that does not exist is the caller's FAILED_PRECONDITION."""
    try:
        return await write
    except LeaseNotFound:
        raise errors.FailedPrecondition(
            f"lease_id {lease} does not exist (it lapsed or was never granted)"
        ) from None


async def put(store: VariableStore, var: orchestrator_pb2.Variable, lease: int) -> Written:
    """Write whatever is stored."""
    _, now = await _stored(store.put(var.name, var, lease), lease)
    return Written(now)


async def compare_and_set(
    store: VariableStore,
    var: orchestrator_pb2.Variable,
    expected: int,
    lease: int,
    record: TxnOps | None = None,
) -> Written:
    """Write if the variable is at version ``expected`` (0 = absent) and holds the same type.

    ABORTED (with the current version) when the version differs,
    FAILED_PRECONDITION when only the type does. ``record``: the call's
    outcome, written in the same transaction (:mod:`mabeam.runtime.idempotency`).
    """
    ok, now = await _stored(store.put_if_version(var.name, var, expected, lease, record=record), lease)
    if not ok:
        if now is not None and now.version == expected:
            check_type(var.name, now, var.value)
        raise version_mismatch(var.name, expected, now)
    return Written(now)


async def same_type(store: VariableStore, var: orchestrator_pb2.Variable, lease: int) -> Written:
    """Write if the variable is absent or holds a value of the same type."""
    try:
        async for attempt in stamina.retry_context(
            on=_Moved, attempts=SAME_TYPE_TRIES, timeout=None, wait_initial=0, wait_max=0, wait_jitter=0
        ):
            with attempt:
                current = await store.get(var.name)
                if current is not None:
                    check_type(var.name, current, var.value)
                ok, now = await _stored(store.put_if_unchanged(var.name, var, current, lease), lease)
                if not ok:
                    raise _Moved
    except _Moved:
        raise errors.Aborted(f"variable {var.name!r} kept changing; retry") from None
    return Written(now)


async def last_write_wins(store: VariableStore, var: orchestrator_pb2.Variable, lease: int) -> Written:
    """Write unless the stored value's timestamp is as new as ``var``'s or newer (then discarded)."""
    new = var.timestamp.ToNanoseconds()
    try:
        async for attempt in stamina.retry_context(
            on=_Moved, attempts=LAST_WRITE_WINS_TRIES, timeout=None, wait_initial=0, wait_max=0, wait_jitter=0
        ):
            with attempt:
                current = await store.get(var.name)
                if (
                    current is not None
                    and current.HasField("timestamp")
                    and current.timestamp.ToNanoseconds() >= new
                ):
                    return Written(
                        current,
                        applied=False,
                        reason=f"discarded: the stored value is newer or as new ({current.timestamp.ToJsonString()})",
                    )
                ok, now = await _stored(store.put_if_unchanged(var.name, var, current, lease), lease)
                if not ok:
                    raise _Moved
    except _Moved:
        raise errors.Aborted(f"variable {var.name!r} kept changing; retry") from None
    return Written(now)
