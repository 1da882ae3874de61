"""Idempotent mutating RPCs (Google AIP-155): the outcome of each ``request_id``, kept in etcd.

Every mutating request message carries an optional ``request_id`` (1-128
characters of ``[A-Za-z0-9._:-]``, e.g. a UUID; the SDK sets one). The first
call with an id is applied and its outcome recorded; for the window
(:data:`WINDOW_S`, 10 minutes) a call with the same id and the same request
gets that outcome back (the response, or the error) and is not applied
again; the same id with a different request is ``INVALID_ARGUMENT``.

Keys (under the mesh prefix P), owned by :class:`RequestLog`:

======================================  ===========================================  =====================
key                                     value                                        lease
======================================  ===========================================  =====================
P/requests/<service>/<method>/<id>      JSON: ``state`` ``pending`` | ``done``,      pending: the replica's
                                        ``fp`` (sha256 of the request without its    (it dies with it);
                                        id), the response or the error status        done: the window's
======================================  ===========================================  =====================

The window lease is shared: one lease of ``window + window/10`` seconds is
granted every ``window/10`` seconds and never refreshed, so a record lives
between one and 1.1 windows and the keys go with their lease, without a sweep.

Two ways to record an outcome:

* **With the write** (:meth:`Guard.txn_ops`): the handler's own etcd
  transaction carries ``create(record) == 0`` in its compare and the record's
  put in its success branch, so the write and its record commit together:
  "applied but not recorded" cannot happen, and of two concurrent calls with
  one id only one transaction applies; the other finds the record. Used where
  the response is known before the transaction (SetVariable compare-and-set,
  DeleteVariable, RegisterAgent).
* **Right after** (every other RPC): the call first *claims* the id (a
  ``pending`` record created only if absent, on a lease of this replica kept
  alive while it lives), then runs, then replaces the claim with the outcome.
  A concurrent duplicate finds the claim and waits for the outcome; if the
  claiming replica dies, its claim goes with its lease (within the service
  TTL) and the duplicate claims the id and runs the call. The order is
  claim, apply, record: a replica that dies between applying and recording
  leaves no outcome, so a resend applies the call again — the one gap, as
  wide as one etcd write; it cannot be closed without the write's own
  transaction, hence the first way wherever a store allows it.

Secrets are not recorded. A handler whose response carries one (a token)
passes ``record_as`` (the response as recorded: the secret cleared) and
``replayed`` (what a replay answers: typically a new secret, minted and
stored as a hash, so the one who resends, who lost the first answer, gets a
working one and the first one stops working), see :meth:`RequestLog.run`.

Recorded errors are those that say the call was judged and not applied
(NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, FAILED_PRECONDITION, ABORTED,
OUT_OF_RANGE; another mesh service's error as this one answers it,
:func:`mabeam.errors.from_downstream`). Any other failure (UNAVAILABLE,
DEADLINE_EXCEEDED, INTERNAL, INVALID_ARGUMENT of the rest of the request,
cancellation) records nothing and releases the claim, so the same id may be
sent again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import message as pb_message
from google.rpc import status_pb2

from mabeam import errors
from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient, LeaseKeeper

log = logging.getLogger("mabeam.runtime.idempotency")

WINDOW_S = 600
MAX_REQUEST_ID = 128
_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1," + str(MAX_REQUEST_ID) + r"}\Z")
# Errors that say "judged and not applied": recorded, and replayed to a duplicate.
RECORDED: tuple[type[errors.MabeamError], ...] = (
    errors.NotFound,
    errors.AlreadyExists,
    errors.PermissionDenied,
    errors.FailedPrecondition,
    errors.Aborted,
    errors.OutOfRange,
)
# A record larger than this is not kept (etcd refuses requests over 1.5 MiB): the claim is
# released instead, and a resend runs the call again.
MAX_RECORD_BYTES = 1024 * 1024
_WAIT_FIRST_S = 0.02
_WAIT_MAX_S = 0.5

M = TypeVar("M", bound=pb_message.Message)


def check_request_id(value: str) -> str:
    """The request's id ('' = none); INVALID_ARGUMENT naming the limit when malformed."""
    if value and not _ID_RE.match(value):
        raise errors.InvalidArgument(
            "request_id",
            f"{value[:140]!r} must be at most {MAX_REQUEST_ID} characters of [A-Za-z0-9._:-] (e.g. a UUID)",
        )
    return value


def fingerprint(request: pb_message.Message) -> str:
    """sha256 of the request without its ``request_id`` (deterministic serialization)."""
    clone = type(request)()
    clone.CopyFrom(request)
    clone.ClearField("request_id")  # type: ignore[arg-type]
    return hashlib.sha256(clone.SerializeToString(deterministic=True)).hexdigest()


@dataclass
class TxnOps:
    """What a store adds to its transaction: compares (AND) and success operations."""

    compare: list[Any] = field(default_factory=list)
    success: list[Any] = field(default_factory=list)


class _RecordedStatus(grpc.RpcError):
    """A recorded error status, shaped like a grpc error for :func:`mabeam.errors.from_rpc_error`."""

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self._status = status_pb2.Status.FromString(raw)

    def code(self) -> grpc.StatusCode:
        for code in grpc.StatusCode:
            if code.value[0] == self._status.code:
                return code
        return grpc.StatusCode.UNKNOWN

    def details(self) -> str:
        return self._status.message

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:  # type: ignore[override]
        return (("grpc-status-details-bin", self._raw),)


_current: contextvars.ContextVar[Guard | None] = contextvars.ContextVar("mabeam_request_guard", default=None)


def current() -> Guard | None:
    """The guard of the idempotent call being handled (None: no request_id, or not atomic)."""
    return _current.get()


class Guard:
    """Records a call's outcome in the handler's own transaction (see the module doc)."""

    def __init__(self, log: RequestLog, key: bytes, fp: str) -> None:
        self._log = log
        self._key = key
        self._fp = fp
        self.recorded = False

    async def txn_ops(self, response: pb_message.Message, *, fill_revision: bool = False) -> TxnOps:
        """Compare and put to add to the write's transaction, recording ``response``.

        The handler returns success only when that transaction applied, and
        then returns ``response`` (``fill_revision``: except the variable's
        ``mod_revision``, which a replay takes from the record, written in
        the same transaction).
        """
        c = self._log.client
        lease = await self._log.window_lease()
        record = _encode("done", self._fp, response=response, fill_revision=fill_revision)
        self.recorded = True
        return TxnOps(
            compare=[c.transactions.create(self._key) == 0],
            success=[c.transactions.put(self._key, record, lease=lease)],
        )


def _encode(
    state: str,
    fp: str,
    *,
    response: pb_message.Message | None = None,
    error: errors.MabeamError | None = None,
    fill_revision: bool = False,
) -> bytes:
    out: dict[str, Any] = {"state": state, "fp": fp}
    if response is not None:
        out["response"] = base64.b64encode(response.SerializeToString()).decode()
    if error is not None:
        out["status"] = base64.b64encode(error.to_status().SerializeToString()).decode()
    if fill_revision:
        out["fill_revision"] = True
    return json.dumps(out).encode()


class RequestLog:
    """One service's record of request ids; :meth:`run` wraps each mutating handler."""

    def __init__(
        self, client: EtcdClient, config: MeshConfig, service: str, *, window: int = WINDOW_S
    ) -> None:
        self.client = client
        self.prefix = config.key("requests") + f"/{service}/".encode()
        self.window = window
        self._claim_ttl = max(int(config.service_ttl), 1)
        self._claims: LeaseKeeper | None = None
        self._window_lease = 0
        self._window_granted = 0.0
        self._lock = asyncio.Lock()

    def key(self, method: str, request_id: str) -> bytes:
        return self.prefix + f"{method}/{request_id}".encode()

    async def stop(self) -> None:
        """Revoke this replica's claims (pending calls' records) and stop refreshing them."""
        keeper, self._claims = self._claims, None
        if keeper is not None:
            with contextlib.suppress(Exception):
                await keeper.revoke()
            with contextlib.suppress(Exception):
                await keeper.stop()

    async def window_lease(self) -> int:
        """The current shared lease of ``window + window/10`` s, granted anew every ``window/10`` s."""
        loop = asyncio.get_running_loop()
        rotate = self.window / 10
        async with self._lock:
            if not self._window_lease or loop.time() - self._window_granted >= rotate:
                lease = await self.client.lease(self.window + int(rotate) + 1)
                self._window_lease, self._window_granted = int(lease.id), loop.time()
            return self._window_lease

    async def _claim_lease(self) -> int:
        async with self._lock:
            if self._claims is None or self._claims.lost.is_set():
                old, self._claims = self._claims, None
                if old is not None:
                    with contextlib.suppress(Exception):
                        await old.stop()
                keeper = LeaseKeeper(self.client, self._claim_ttl)
                await keeper.start()
                self._claims = keeper
            return self._claims.lease_id

    async def run(
        self,
        method: str,
        request: Any,
        response_type: type[M],
        work: Callable[[], Awaitable[M]],
        *,
        atomic: bool = False,
        on_replay: Callable[[M, int], None] | None = None,
        record_as: Callable[[M], M] | None = None,
        replayed: Callable[[M], Awaitable[M]] | None = None,
    ) -> M:
        """Run ``work`` once per ``request.request_id`` within the window (no id: just run it).

        ``atomic``: ``work`` records the outcome in its own transaction
        through :func:`current` (:meth:`Guard.txn_ops`); else the id is
        claimed first and the outcome recorded right after. ``on_replay``
        gets a replayed response and the record's revision, for
        ``fill_revision`` records. ``record_as``: the response as it is
        recorded (e.g. without its secret; atomic handlers record what they
        pass to :meth:`Guard.txn_ops`); ``replayed``: turns a replayed response
        into the answer (e.g. puts a new secret in).
        """
        request_id = check_request_id(request.request_id)
        if not request_id:
            return await work()
        c = self.client
        key = self.key(method, request_id)
        fp = fingerprint(request)
        wait = _WAIT_FIRST_S
        claim_revision = 0
        # Atomic: no read first; the write's transaction fails when a record is there, and
        # the failure's answer (below, _finish) is that record. Else claim the id, or meet
        # the record of the first call with it: one transaction either way.
        while not atomic:
            lease = await self._claim_lease()
            ok, responses = await c.transaction(
                compare=[c.transactions.create(key) == 0],
                success=[
                    c.transactions.put(key, _encode("pending", fp), lease=lease),
                    c.transactions.get(key),
                ],
                failure=[c.transactions.get(key)],
            )
            ranged = responses[-1] if responses else []
            if ok:
                claim_revision = int(ranged[0][1].mod_revision) if ranged else 0
                break
            if not ranged:
                continue  # gone in between (its claim's replica died): claim it
            kv = ranged[0][1]
            record = json.loads(kv.value)
            self._check_same(record, fp, request_id, method)
            if record.get("state") == "done":
                return await _after(
                    replayed, self._replay(record, int(kv.mod_revision), response_type, on_replay)
                )
            # Pending: the first call with this id runs (here or on another replica).
            await asyncio.sleep(wait)
            wait = min(wait * 2, _WAIT_MAX_S)
        guard = Guard(self, key, fp) if atomic else None
        token = _current.set(guard)
        try:
            response = await work()
        except errors.MabeamError as exc:
            if exc.service:  # another mesh service's answer: recorded as this one answers it
                exc = errors.from_downstream(exc)
            if isinstance(exc, RECORDED):
                return await _after(
                    replayed,
                    await self._finish(key, fp, claim_revision, response_type, on_replay, error=exc),
                )
            if claim_revision:
                with contextlib.suppress(Exception):
                    await self._release(key, claim_revision)
            raise exc from None
        except BaseException:
            if claim_revision:
                with contextlib.suppress(Exception):
                    await self._release(key, claim_revision)
            raise
        finally:
            _current.reset(token)
        if guard is not None and guard.recorded:
            return response
        recorded = record_as(response) if record_as is not None else response
        answer = await self._finish(key, fp, claim_revision, response_type, on_replay, response=recorded)
        # Ours was recorded (answer is what we recorded): answer with the response itself.
        return response if answer is recorded else await _after(replayed, answer)

    async def _release(self, key: bytes, claim_revision: int) -> None:
        """Remove this call's claim (nothing recorded): the id may be sent again."""
        c = self.client
        await c.transaction(
            compare=[c.transactions.mod(key) == claim_revision],
            success=[c.transactions.delete(key)],
            failure=[],
        )

    async def _finish(
        self,
        key: bytes,
        fp: str,
        claim_revision: int,
        response_type: type[M],
        on_replay: Callable[[M, int], None] | None,
        *,
        response: M | None = None,
        error: errors.MabeamError | None = None,
    ) -> M:
        """Record the outcome (over this call's claim, or where none is) and return or raise it.

        When another outcome is there already (a concurrent call with the same
        id applied first), that one is the answer.
        """
        c = self.client
        record = _encode("done", fp, response=response, error=error)
        compare = (
            [c.transactions.mod(key) == claim_revision]
            if claim_revision
            else [c.transactions.create(key) == 0]
        )
        try:
            if len(record) > MAX_RECORD_BYTES:
                raise ValueError(f"the outcome is {len(record)} bytes, over {MAX_RECORD_BYTES}")
            lease = await self.window_lease()
            ok, responses = await c.transaction(
                compare=compare,
                success=[c.transactions.put(key, record, lease=lease)],
                failure=[c.transactions.get(key)],
            )
        except Exception as exc:
            # The call was applied (or judged): its answer stands though it is not kept.
            log.warning("outcome of %s not recorded (%s); a resend would apply it again", key.decode(), exc)
            if claim_revision:
                with contextlib.suppress(Exception):
                    await self._release(key, claim_revision)
            ok, responses = True, []
        if not ok:
            ranged = responses[-1] if responses else []
            if ranged:
                kv = ranged[0][1]
                record = json.loads(kv.value)
                method, request_id = key[len(self.prefix) :].decode().split("/", 1)
                self._check_same(record, fp, request_id, method)
                if record.get("state") == "done":
                    return self._replay(record, int(kv.mod_revision), response_type, on_replay)
        if error is not None:
            raise error
        assert response is not None
        return response

    def _check_same(self, record: dict[str, Any], fp: str, request_id: str, method: str) -> None:
        """INVALID_ARGUMENT when the id's record is of another request."""
        if record.get("fp") != fp:
            raise errors.InvalidArgument(
                "request_id",
                f"{request_id!r} was used within the last {self.window} s for a different "
                f"{method} request; a new request needs a new id",
            )

    @staticmethod
    def _replay(
        record: dict[str, Any],
        revision: int,
        response_type: type[M],
        on_replay: Callable[[M, int], None] | None,
    ) -> M:
        if "status" in record:
            raise errors.from_rpc_error(_RecordedStatus(base64.b64decode(record["status"])))
        response = response_type.FromString(base64.b64decode(record.get("response", "")))
        if record.get("fill_revision") and on_replay is not None:
            on_replay(response, revision)
        return response


async def _after(replayed: Callable[[M], Awaitable[M]] | None, response: M) -> M:
    """A replayed response as answered (see ``replayed`` of :meth:`RequestLog.run`)."""
    return await replayed(response) if replayed is not None else response


def idempotent(
    response_type: type[M],
) -> Callable[[Callable[[Any, Any, Any], Awaitable[M]]], Callable[[Any, Any, Any], Awaitable[M]]]:
    """Decorate a servicer's mutating handler: :meth:`RequestLog.run` with its store's
    ``self.store.requests``, the handler's name as the method, the outcome recorded right after."""

    def wrap(fn: Callable[[Any, Any, Any], Awaitable[M]]) -> Callable[[Any, Any, Any], Awaitable[M]]:
        method = fn.__name__

        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: Any) -> M:
            log: RequestLog = self.store.requests
            return await log.run(method, request, response_type, lambda: fn(self, request, context))

        return handler

    return wrap


__all__ = [
    "MAX_REQUEST_ID",
    "RECORDED",
    "WINDOW_S",
    "Guard",
    "RequestLog",
    "TxnOps",
    "check_request_id",
    "current",
    "idempotent",
]
