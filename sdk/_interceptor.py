"""The error interceptor of :class:`mabeam.server.MeshServer`: every handler's exception as a gRPC status.

Exceptions from :mod:`mabeam.errors` become statuses with rich details
(grpcio-status); what the server's ``ErrorMapper`` knows (the services map
etcd's errors) becomes what it says; anything else becomes ``INTERNAL`` and
is logged, so a handler's bug never takes the server down. Each call is
counted by method and code (:mod:`mabeam.telemetry`), and checked by the
server's :class:`mabeam.auth.Authorizer` first when auth is on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from mabeam import auth, errors, telemetry

log = logging.getLogger("mabeam.server")

ErrorMapper = Callable[[BaseException], "errors.MabeamError | None"]


def to_mabeam_error(
    exc: BaseException, mapper: ErrorMapper | None = None, service: str | None = None
) -> errors.MabeamError:
    """Map any exception raised by a handler to the error table.

    ``mapper`` maps the exceptions of a layer this module does not know (the
    services pass the etcd layer's); it answers None for the others.
    An error that another mesh service answered to a call the handler made
    (``exc.service`` set, and not ``service``, the server's own kind: a call
    handed to a peer replica answers as is) is mapped by cause
    (:func:`mabeam.errors.from_downstream`): it was not the caller's mistake.
    Retryable results: ``UNAVAILABLE`` (etcd unreachable or a peer down) and
    ``ABORTED`` (lost compare-and-set). ``INTERNAL`` means a bug and is logged
    with its traceback.
    """
    if isinstance(exc, errors.MabeamError):
        if exc.service is not None and exc.service != service:
            return errors.from_downstream(exc)
        return exc
    if mapper is not None:
        mapped = mapper(exc)
        if mapped is not None:
            return mapped
    if isinstance(exc, grpc.RpcError):
        return errors.from_rpc_error(exc)
    if isinstance(exc, TimeoutError):
        return errors.DeadlineExceeded(f"timed out: {exc}")
    log.exception("internal error", exc_info=exc)
    return errors.Internal(f"internal error: {type(exc).__name__}: {exc}")


async def _abort(context: aio.ServicerContext[Any, Any], err: errors.MabeamError) -> None:
    await context.abort(err.code, err.message, trailing_metadata=errors.trailing_metadata(err))


async def _iterate(result: Any) -> AsyncIterator[Any]:
    """A streaming handler's result as an async iterator.

    Handlers are async generators; a plain coroutine (e.g. a placeholder that
    raises Unimplemented) is awaited so its exception is mapped like any other.
    """
    if inspect.isawaitable(result):
        result = await result
    if result is None:
        return _empty()
    return result  # type: ignore[no-any-return]


async def _empty() -> AsyncIterator[Any]:
    return
    yield


def _record(method: str, code: str, started: float) -> None:
    meters = telemetry.instruments()
    attributes = {"rpc.method": method, "rpc.grpc.status_code": code}
    meters.rpc_duration.record(time.perf_counter() - started, attributes)
    meters.rpc_calls.add(1, attributes)


def _wrap_handler(
    handler: grpc.RpcMethodHandler,
    method: str = "",
    mapper: ErrorMapper | None = None,
    service: str | None = None,
    authorizer: auth.Authorizer | None = None,
) -> grpc.RpcMethodHandler:
    """Wrap a method handler: the caller is checked first (``authorizer``), exceptions become statuses.

    A call the authorizer refuses never reaches the handler, so it changes nothing.
    """
    rule = authorizer.rule(method) if authorizer is not None else None
    guard = authorizer if rule is not None else None
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            code = "OK"
            try:
                if guard is not None:
                    guard.check(method, rule, request, context)  # type: ignore[arg-type]
                return await inner_uu(request, context)
            except (aio.AbortError, asyncio.CancelledError):
                code = "ABORTED_BY_HANDLER"
                raise
            except Exception as exc:
                err = to_mabeam_error(exc, mapper, service)
                code = err.code.name
                await _abort(context, err)
            finally:
                _record(method, code, started)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                caller = guard.check(method, rule, request, context) if guard is not None else None  # type: ignore[arg-type]
                async for item in await _iterate(inner_us(request, context)):
                    if guard is not None:
                        guard.recheck(caller, context)  # a token revoked mid-stream ends the stream
                    yield item
            except (aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await _abort(context, to_mabeam_error(exc, mapper, service))

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            try:
                if guard is not None:
                    guard.check(method, rule, None, context)  # type: ignore[arg-type]
                return await inner_su(requests, context)
            except (aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await _abort(context, to_mabeam_error(exc, mapper, service))

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    inner_ss = handler.stream_stream
    assert inner_ss is not None

    async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
        try:
            caller = guard.check(method, rule, None, context) if guard is not None else None  # type: ignore[arg-type]
            async for item in await _iterate(inner_ss(requests, context)):
                if guard is not None:
                    guard.recheck(caller, context)  # a token revoked mid-stream ends the stream
                yield item
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _abort(context, to_mabeam_error(exc, mapper, service))

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, handler.request_deserializer, handler.response_serializer
    )


class ErrorInterceptor(aio.ServerInterceptor):
    """Checks the caller (when ``authorizer`` is set), turns handler exceptions into statuses."""

    def __init__(
        self,
        mapper: ErrorMapper | None = None,
        service: str | None = None,
        authorizer: auth.Authorizer | None = None,
    ) -> None:
        self._mapper = mapper
        self._service = service
        self._authorizer = authorizer
        # Handlers are fixed per method: wrap each once, not on every call.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return handler
        wrapped = _wrap_handler(handler, method, self._mapper, self._service, self._authorizer)
        self._wrapped[method] = wrapped
        return wrapped
