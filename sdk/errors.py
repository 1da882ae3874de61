"""The one error table of the mesh: exception <-> gRPC status code <-> ErrorInfo reason.

Servers raise these exceptions from any depth; the shared server interceptor
(:mod:`mabeam.server`) turns them into a gRPC status with rich details
(``google.rpc.ErrorInfo`` with the reason, ``google.rpc.BadRequest`` naming the
field). Clients get the same exceptions back from :func:`from_rpc_error`, so a
caller writes ``except VersionMismatch as e: e.metadata["current_version"]``
whatever service answered.

Retryable: :class:`Unavailable` (etcd or a replica unreachable; retry with
back-off, possibly on another replica) and :class:`Aborted` (a lost
compare-and-set: re-read, then retry). Everything else needs a different request.

An error that a service got from another service it called (``service`` names
that one; :class:`mabeam.client.MeshClient` sets it) is not the caller's
mistake: :func:`from_downstream` maps it by cause before it is answered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from mabeam.v1 import common_pb2

ERROR_DOMAIN = "mabeam.dev"


class MabeamError(Exception):
    """Base of every error the mesh reports; carries the gRPC code and reason.

    Example::

        try:
            await client.registry.get_agent("a1")
        except NotFound as e:
            print(e.code, e.reason, e.message)
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    default_reason: ClassVar[int] = common_pb2.ERROR_REASON_UNSPECIFIED
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        reason: int | None = None,
        field: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason_value = self.default_reason if reason is None else reason
        self.field = field
        self.metadata: dict[str, str] = dict(metadata or {})
        # The mesh service that answered with this error, when it came from a
        # call to another service (set by MeshClient); None when raised here.
        self.service: str | None = None

    @property
    def reason(self) -> str:
        """The ErrorInfo reason string, e.g. ``"VERSION_MISMATCH"``."""
        name = common_pb2.ErrorReason.Name(self.reason_value)  # type: ignore[arg-type]
        return name.removeprefix("ERROR_REASON_")

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def to_status(self) -> status_pb2.Status:
        """The ``google.rpc.Status`` sent on the wire, with ErrorInfo (and BadRequest)."""
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata)
        packed = any_pb2.Any()
        packed.Pack(info)
        status.details.append(packed)
        if self.field is not None:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.message)
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(bad)
            status.details.append(packed)
        return status


class InvalidArgument(MabeamError):
    """A request field is missing or malformed; ``field`` names it."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = common_pb2.ERROR_REASON_INVALID_FIELD

    def __init__(self, field: str, message: str, **kw: object) -> None:
        super().__init__(f"{field}: {message}", field=field, **kw)  # type: ignore[arg-type]


class NotFound(MabeamError):
    """The named object does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MabeamError):
    """The object exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = common_pb2.ERROR_REASON_ALREADY_EXISTS


class PermissionDenied(MabeamError):
    """The caller does not hold the token the operation needs."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = common_pb2.ERROR_REASON_TOKEN_MISMATCH


class Unauthenticated(MabeamError):
    """The call carried no credential the mesh knows (missing, malformed, unknown or revoked)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = common_pb2.ERROR_REASON_UNAUTHENTICATED


class FailedPrecondition(MabeamError):
    """The request conflicts with the current state of the system."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = common_pb2.ERROR_REASON_FAILED_PRECONDITION


class Aborted(MabeamError):
    """A compare-and-set lost a race; re-read and retry."""

    code = grpc.StatusCode.ABORTED
    default_reason = common_pb2.ERROR_REASON_VERSION_MISMATCH
    retryable = True


class OutOfRange(MabeamError):
    """A revision or page position is outside what is available."""

    code = grpc.StatusCode.OUT_OF_RANGE


class DeadlineExceeded(MabeamError):
    """A deadline passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = common_pb2.ERROR_REASON_DEADLINE_EXCEEDED


class Unavailable(MabeamError):
    """etcd or a service replica cannot be reached; retry with back-off."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = common_pb2.ERROR_REASON_STORE_UNAVAILABLE
    retryable = True


class ResourceExhausted(MabeamError):
    """A limit was reached; the message says which.

    etcd refused a write for lack of resources (its database is full: NOSPACE;
    reason STORE_EXHAUSTED), or a watch stream's consumer fell too far behind
    and the server ended the stream (reason WATCH_QUEUE_FULL: watch again from
    the last revision received).
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = common_pb2.ERROR_REASON_STORE_EXHAUSTED


class Unimplemented(MabeamError):
    """The operation is defined but not provided by this build."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = common_pb2.ERROR_REASON_NOT_IMPLEMENTED


class Internal(MabeamError):
    """A bug in mabeam."""

    code = grpc.StatusCode.INTERNAL
    default_reason = common_pb2.ERROR_REASON_INTERNAL


class Cancelled(MabeamError):
    """The call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class Unknown(MabeamError):
    """A status that the table does not know (e.g. from a foreign server)."""

    code = grpc.StatusCode.UNKNOWN


_BY_CODE: dict[grpc.StatusCode, type[MabeamError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        Unauthenticated,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        DeadlineExceeded,
        ResourceExhausted,
        Unavailable,
        Unimplemented,
        Internal,
        Cancelled,
        Unknown,
    )
}


def trailing_metadata(error: MabeamError) -> tuple[tuple[str, str | bytes], ...]:
    """Trailing metadata that carries ``error``'s rich status to the client (grpcio-status packs it)."""
    return tuple(rpc_status.to_status(error.to_status()).trailing_metadata)


def _rich_status(err: Any) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` a failed call carries, if any (grpcio-status parses it)."""
    if not (hasattr(err, "trailing_metadata") and hasattr(err, "code") and hasattr(err, "details")):
        return None
    try:
        status: status_pb2.Status | None = rpc_status.from_call(err)
    except ValueError:  # details that disagree with the call's own code or message: ignored
        return None
    return status


def from_rpc_error(err: grpc.RpcError, *, service: str | None = None) -> MabeamError:
    """Turn a grpc error into the table's exception, unpacking ErrorInfo / BadRequest.

    ``service`` names the mesh service that was called (MeshClient passes it):
    it is kept on the exception, and an ``UNAVAILABLE`` that carries no
    ErrorInfo (the service could not be reached at all) gets the reason
    ``SERVICE_UNAVAILABLE`` naming it, not the store's.
    """
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else None) or str(code)
    reason: int | None = None
    field: str | None = None
    metadata: dict[str, str] = {}
    status = _rich_status(err)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                metadata = dict(info.metadata)
                try:
                    reason = common_pb2.ErrorReason.Value("ERROR_REASON_" + info.reason)
                except ValueError:
                    reason = None
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                if bad.field_violations:
                    field = bad.field_violations[0].field
    if service is not None and reason is None and code == grpc.StatusCode.UNAVAILABLE:
        reason = common_pb2.ERROR_REASON_SERVICE_UNAVAILABLE
        metadata = {"service": service}
        message = f"the {service} service is unreachable: {message}"
    cls = _BY_CODE.get(code, Unknown)
    exc = MabeamError.__new__(cls)
    MabeamError.__init__(exc, message, reason=reason, field=field, metadata=metadata)
    exc.service = service
    return exc


def service_unavailable(service: str, message: str) -> Unavailable:
    """``UNAVAILABLE`` because the mesh service ``service`` has no replica to call (not the store)."""
    exc = Unavailable(
        message, reason=common_pb2.ERROR_REASON_SERVICE_UNAVAILABLE, metadata={"service": service}
    )
    exc.service = service
    return exc


def from_downstream(err: MabeamError) -> MabeamError:
    """What a service answers when a call it made to another mesh service (``err.service``) failed.

    The other service's status describes the request the service built, not
    the caller's, so it is mapped by cause, naming that service (ErrorInfo
    metadata ``service``, ``downstream_code``, ``downstream_reason``):

    * ``UNAVAILABLE`` (or ``CANCELLED``: the call was dropped there) stays
      ``UNAVAILABLE``, retryable, reason ``SERVICE_UNAVAILABLE``;
    * ``DEADLINE_EXCEEDED`` stays ``DEADLINE_EXCEEDED``; ``RESOURCE_EXHAUSTED``
      (its store is full) stays, with its reason;
    * ``ABORTED`` (it lost a race) stays ``ABORTED``, retryable, reason
      ``DEPENDENCY_FAILED``;
    * ``NOT_FOUND``, ``ALREADY_EXISTS``, ``FAILED_PRECONDITION`` (the mesh's
      state conflicts) become ``FAILED_PRECONDITION``;
    * anything else — ``INVALID_ARGUMENT``, ``PERMISSION_DENIED``,
      ``INTERNAL``, ... (it refused a request this service built, or failed) —
      becomes ``INTERNAL``.
    """
    service = err.service or "another"
    metadata = {"service": service, "downstream_code": err.code.name}
    if err.reason_value:
        metadata["downstream_reason"] = err.reason
    said = f"the {service} service answered {err.code.name}: {err.message}"
    failed = common_pb2.ERROR_REASON_DEPENDENCY_FAILED
    out: MabeamError
    if isinstance(err, Unavailable | Cancelled):
        named = err.message.startswith(f"the {service} service ")  # said by MeshClient already
        out = Unavailable(
            err.message if named else f"the {service} service is unavailable: {err.message}",
            reason=common_pb2.ERROR_REASON_SERVICE_UNAVAILABLE,
            metadata=metadata,
        )
    elif isinstance(err, DeadlineExceeded):
        out = DeadlineExceeded(said, metadata=metadata)
    elif isinstance(err, ResourceExhausted):
        out = ResourceExhausted(said, reason=err.reason_value or None, metadata=metadata)
    elif isinstance(err, Aborted):
        out = Aborted(said, reason=failed, metadata=metadata)
    elif isinstance(err, NotFound | AlreadyExists | FailedPrecondition):
        out = FailedPrecondition(said, reason=failed, metadata=metadata)
    else:
        out = Internal(said, reason=failed, metadata=metadata)
    return out


def status_code_number(code: grpc.StatusCode) -> int:
    """The numeric google.rpc.Code of a grpc.StatusCode."""
    return int(code.value[0])
