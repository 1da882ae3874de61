"""Async clients for the four services.

:class:`MeshClient` holds one client per service. Each client reaches its
service through a :class:`Balancer`: explicit addresses, or the live endpoints
that the replicas publish in etcd (:mod:`mabeam.discovery`), balanced round
robin over reused channels. Every mutating call carries a ``request_id``
(AIP-155): the caller's, else a UUID the client sets on a copy of the request
— except a coordination session (``Run*``), where the caller opts in by
setting one: there the record costs two etcd writes beside the session's own
(a claim, then the outcome), which made a 10-agent auction 1.6x its raw
baseline instead of 1.0x. A call that fails with ``UNAVAILABLE`` because the
replica is gone is tried once more on the next endpoint: a read (``Get*``,
``List*``) and a call with a ``request_id`` always (a write cut off mid-call
that the dying replica applied is answered from its record, not applied
twice), any other call only when it never reached a server (no connection
could be made).
Every gRPC error reaches the caller as an exception from :mod:`mabeam.errors`,
code and message kept, its ``service`` naming the service that answered (a
service that could not be reached at all is ``UNAVAILABLE`` with the reason
``SERVICE_UNAVAILABLE`` naming it, not the store's reason).

Example::

    async with await MeshClient.connect(registry="127.0.0.1:50051") as mesh:
        reply = await mesh.registry.ListAgents(registry_pb2.ListAgentsRequest(capability="bid"))

    # or discover every service from etcd:
    mesh = await MeshClient.connect(etcd=["http://127.0.0.1:2379"])
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
from google.protobuf import any_pb2, descriptor_pool, message, struct_pb2
from grpc import aio

from mabeam import auth, errors
from mabeam._channels import (  # noqa: F401  (the pool's public home is mabeam.client)
    CHANNEL_IDLE_TIMEOUT,
    CHANNEL_OPTIONS,
    KEEPALIVE_TIME_MS,
    MAX_CHANNELS,
    ChannelPool,
)
from mabeam.tls import TLS
from mabeam.v1 import (
    agent_pb2,
    auth_pb2_grpc,
    coordination_pb2_grpc,
    messaging_pb2,
    messaging_pb2_grpc,
    orchestrator_pb2_grpc,
    planner_pb2_grpc,
    registry_pb2_grpc,
)

if TYPE_CHECKING:
    from mabeam.discovery import EndpointResolver

S = TypeVar("S")


class Balancer:
    """Round robin over a service's endpoints: fixed addresses or a discovery resolver."""

    def __init__(
        self,
        service: str,
        pool: ChannelPool,
        addresses: Sequence[str] = (),
        resolver: EndpointResolver | None = None,
    ) -> None:
        if not addresses and resolver is None:
            raise ValueError(f"{service}: give addresses or a discovery resolver")
        self.service = service
        self._pool = pool
        self._addresses = list(addresses)
        self._resolver = resolver
        self._counter = itertools.count()

    def addresses(self) -> list[str]:
        """The endpoints calls may go to now."""
        if self._resolver is not None:
            found = self._resolver.addresses()
            if found:
                return found
        return list(self._addresses)

    def pick(self, skip: str | None = None) -> str:
        """The next endpoint in round robin, avoiding ``skip`` when there is another."""
        addresses = self.addresses()
        if not addresses:
            raise errors.service_unavailable(self.service, f"the {self.service} service has no live endpoint")
        if skip is not None and len(addresses) > 1:
            addresses = [a for a in addresses if a != skip]
        return addresses[next(self._counter) % len(addresses)]

    def channel(self, address: str) -> aio.Channel:
        """The reused channel to ``address``."""
        return self._pool.get(address)

    def stub(self, address: str, stub_class: Callable[[aio.Channel], S]) -> S:
        """The reused ``stub_class`` stub to ``address``."""
        return self._pool.stub(address, stub_class)


# What grpc says when a call could not be sent at all (the endpoint refuses
# connections): the server never saw it, so another replica may take it.
_NOT_SENT = ("failed to connect", "connection refused")
_READS = ("Get", "List")
# Sessions: a request_id only when the caller gives one (see the module doc).
_ID_BY_CALLER_ONLY = frozenset({"RunAuction", "RunMarket", "RunConsensus", "Run"})


def retry_is_safe(method: str, exc: grpc.RpcError, *, request_id: bool = False) -> bool:
    """Whether a call of ``method`` that failed with ``exc`` may be sent to another replica.

    Only ``UNAVAILABLE`` qualifies: for a read (``Get*``, ``List*``) and for a
    call that carries a ``request_id`` (``request_id=True``) always: a write
    cut off mid-way ("Socket closed") that the dying replica applied is
    answered from its recorded outcome, not applied again (AIP-155, see
    :mod:`mabeam.runtime.idempotency`). Any other call only when it never
    reached a server.
    """
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    if request_id or method.startswith(_READS):
        return True
    details = (exc.details() or "").lower()
    return any(marker in details for marker in _NOT_SENT)


def _with_request_id(request: Any) -> Any:
    """A copy of ``request`` with a new ``request_id`` (a UUID)."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.request_id = str(uuid.uuid4())
    return copy


class ServiceClient:
    """A stub proxy: ``await client.Method(request)`` with balancing and typed errors.

    Unary and client-streaming methods return the response; server-streaming
    ones return an async iterator of responses.
    """

    def __init__(self, balancer: Balancer, stub_factory: Callable[[aio.Channel], Any], service: str) -> None:
        self._balancer = balancer
        self._stub_factory = stub_factory
        descriptor = descriptor_pool.Default().FindServiceByName(service)
        self._streams_out = {m.name: m.server_streaming for m in descriptor.methods}
        # Mutating calls: their request has a request_id, which the client sets when the caller did not.
        self._with_request_id = {
            m.name
            for m in descriptor.methods
            if not m.client_streaming and "request_id" in m.input_type.fields_by_name
        }
        self._sets_request_id = self._with_request_id - _ID_BY_CALLER_ONLY
        self._calls: dict[str, Callable[..., Any]] = {}
        self._service = balancer.service

    def _stub(self, address: str) -> Any:
        return self._balancer.stub(address, self._stub_factory)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        calls = self.__dict__.get("_calls")
        if calls is None or name not in self.__dict__.get("_streams_out", {}):
            raise AttributeError(name)
        call = calls.get(name)
        if call is None:
            call = self._streaming(name) if self._streams_out[name] else self._unary(name)
            calls[name] = call
        return call

    def _unary(self, name: str) -> Callable[..., Any]:
        sets_id = name in self._sets_request_id
        carries_id = name in self._with_request_id

        async def call(request: Any, **kwargs: Any) -> Any:
            if sets_id and not request.request_id:
                # On a copy: the caller's message may be sent again as a new request.
                request = _with_request_id(request)
            with_id = carries_id and bool(request.request_id)
            address = self._balancer.pick()
            try:
                return await getattr(self._stub(address), name)(request, **kwargs)
            except grpc.RpcError as exc:
                if len(self._balancer.addresses()) < 2 or not retry_is_safe(name, exc, request_id=with_id):
                    raise errors.from_rpc_error(exc, service=self._service) from None
            retry_at = self._balancer.pick(skip=address)
            try:
                return await getattr(self._stub(retry_at), name)(request, **kwargs)
            except grpc.RpcError as exc:
                raise errors.from_rpc_error(exc, service=self._service) from None

        return call

    def _streaming(self, name: str) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, **kwargs: Any) -> AsyncIterator[Any]:
            address = self._balancer.pick()
            stream = getattr(self._stub(address), name)(request, **kwargs)
            try:
                async for item in stream:
                    yield item
            except grpc.RpcError as exc:
                raise errors.from_rpc_error(exc, service=self._service) from None
            finally:
                stream.cancel()

        return call


async def list_all(call: Callable[[Any], Awaitable[Any]], request: Any, field: str) -> list[Any]:
    """Every item of a paged ``List*`` call, page after page (1,000 a page).

    Example::

        agents = await list_all(mesh.registry.ListAgents, ListAgentsRequest(capability="bid"), "agents")
    """
    request.page_size = 1000
    request.page_token = ""
    items: list[Any] = []
    while True:
        page = await call(request)
        items.extend(getattr(page, field))
        if not page.next_page_token:
            return items
        request.page_token = page.next_page_token


class MeshClient:
    """Clients for the registry, orchestrator, coordination and planner services.

    Each attribute is a :class:`ServiceClient` (balancing, a resend to
    another replica when safe, typed errors). It offers exactly the async
    interface of the service's generated stub — the same methods, requests
    and responses — so it is annotated with that interface
    (``RegistryServiceAsyncStub``, ...) for type checkers and editors.
    """

    registry: registry_pb2_grpc.RegistryServiceAsyncStub
    orchestrator: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub
    coordination: coordination_pb2_grpc.CoordinationServiceAsyncStub
    planner: planner_pb2_grpc.PlannerServiceAsyncStub
    # Token management and WhoAmI, served by the registry's replicas.
    auth: auth_pb2_grpc.AuthServiceAsyncStub
    # Messages and topics, served by the coordination service's replicas.
    messaging: messaging_pb2_grpc.MessagingServiceAsyncStub

    _STUBS: dict[str, Callable[[aio.Channel], Any]] = {
        "registry": registry_pb2_grpc.RegistryServiceStub,
        "orchestrator": orchestrator_pb2_grpc.OrchestratorServiceStub,
        "coordination": coordination_pb2_grpc.CoordinationServiceStub,
        "planner": planner_pb2_grpc.PlannerServiceStub,
    }

    def __init__(
        self, pool: ChannelPool, balancers: dict[str, Balancer], closers: Sequence[Any] = ()
    ) -> None:
        self._pool = pool
        self._balancers = balancers
        self._closers = list(closers)
        self._closed = False
        for service, balancer in balancers.items():
            client = ServiceClient(balancer, self._STUBS[service], f"mabeam.v1.{service.capitalize()}Service")
            setattr(self, service, cast(Any, client))
        if "registry" in balancers:
            self.auth = cast(
                Any,
                ServiceClient(balancers["registry"], auth_pb2_grpc.AuthServiceStub, "mabeam.v1.AuthService"),
            )
        if "coordination" in balancers:
            self.messaging = cast(
                Any,
                ServiceClient(
                    balancers["coordination"],
                    messaging_pb2_grpc.MessagingServiceStub,
                    "mabeam.v1.MessagingService",
                ),
            )

    @classmethod
    async def connect(
        cls,
        *,
        registry: str | Sequence[str] | None = None,
        orchestrator: str | Sequence[str] | None = None,
        coordination: str | Sequence[str] | None = None,
        planner: str | Sequence[str] | None = None,
        etcd: Sequence[str] | None = None,
        prefix: str = "/mabeam",
        tls: TLS | None = None,
        etcd_tls: TLS | None = None,
        token: str | None = None,
    ) -> MeshClient:
        """Connect by explicit ``host:port`` addresses, by etcd discovery, or both.

        A service given neither an address nor etcd is not available on the
        client (AttributeError on use). ``tls`` is for the services,
        ``etcd_tls`` for etcd (discovery). ``token`` is presented on every
        call; None takes :func:`mabeam.auth.default_token` (``$MABEAM_TOKEN``,
        ``$MABEAM_TOKEN_FILE``, or the admin token ``mabeam up`` wrote), ""
        presents none.
        """
        from mabeam import discovery

        explicit = {
            "registry": registry,
            "orchestrator": orchestrator,
            "coordination": coordination,
            "planner": planner,
        }
        pool = ChannelPool(tls, auth.default_token() if token is None else token or None)
        closers: list[Any] = []
        balancers: dict[str, Balancer] = {}
        for service, given in explicit.items():
            addresses = [given] if isinstance(given, str) else list(given or ())
            resolver = None
            if etcd:
                resolver = discovery.EndpointResolver(etcd, prefix, service, tls=etcd_tls)
                try:
                    await resolver.start()
                except BaseException:
                    for closer in closers:
                        await closer.stop()
                    raise
                closers.append(resolver)
            if addresses or resolver is not None:
                balancers[service] = Balancer(service, pool, addresses, resolver)
        return cls(pool, balancers, closers)

    # -- messages and topics -----------------------------------------------------------

    async def send(
        self,
        payload: Mapping[str, Any] | message.Message,
        *,
        to: str = "",
        capability: str = "",
        sender: str = "client",
        message_id: str | None = None,
        timeout: float = 5.0,
        attempts: int = 3,
    ) -> messaging_pb2.SendResponse:
        """Send ``payload`` (a JSON-able dict, or any protobuf message: packed in an Any) to agent
        ``to``, or to the least-loaded agent offering ``capability``.

        At-least-once: on UNAVAILABLE or DEADLINE_EXCEEDED it is sent again with the
        same ``message_id`` (a UUID unless given), up to ``attempts`` calls; the agent
        drops a copy it has seen. Other errors are raised at once (see MessagingService.Send).
        """
        request = messaging_pb2.SendRequest(
            agent_id=to, capability=capability, message=agent_message(payload, sender, message_id)
        )
        request.timeout.FromNanoseconds(int(timeout * 1e9))
        return await _resending(self.messaging.Send, request, attempts)  # type: ignore[no-any-return]

    async def publish(
        self,
        topic: str,
        payload: Mapping[str, Any] | message.Message,
        *,
        sender: str = "client",
        message_id: str | None = None,
        timeout: float = 5.0,
        attempts: int = 3,
    ) -> messaging_pb2.PublishResponse:
        """Publish ``payload`` to every subscriber of ``topic``; the answer counts delivered,
        duplicates, dropped (inbox full) and failed subscribers. Resent as :meth:`send` is
        when the call itself fails (subscribers that had it count as duplicates)."""
        request = messaging_pb2.PublishRequest(
            topic=topic, message=agent_message(payload, sender, message_id)
        )
        request.timeout.FromNanoseconds(int(timeout * 1e9))
        return await _resending(self.messaging.Publish, request, attempts)  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Close channels, discovery watches and the etcd connection; safe twice."""
        if self._closed:
            return
        self._closed = True
        for closer in reversed(self._closers):
            stop = getattr(closer, "stop", None) or closer.close
            try:
                await stop()
            except Exception:  # closing must not mask the caller's error
                pass
        await self._pool.close()

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def agent_message(
    payload: Mapping[str, Any] | message.Message, sender: str, message_id: str | None = None
) -> agent_pb2.AgentMessage:
    """An AgentMessage carrying ``payload``: a dict as its ``json`` Struct, a protobuf message
    packed in its ``any``; ``message_id`` a UUID unless given."""
    out = agent_pb2.AgentMessage(message_id=message_id or str(uuid.uuid4()), sender_id=sender)
    if isinstance(payload, struct_pb2.Struct):
        out.json.CopyFrom(payload)
    elif isinstance(payload, message.Message):
        packed = any_pb2.Any()
        packed.Pack(payload)
        out.any.CopyFrom(packed)
    else:
        out.json.update(dict(payload))
    return out


async def _resending(call: Callable[[Any], Awaitable[Any]], request: Any, attempts: int) -> Any:
    """``call(request)``, sent again (the same message_id) after UNAVAILABLE or DEADLINE_EXCEEDED."""
    for attempt in range(max(1, attempts)):
        try:
            return await call(request)
        except (errors.Unavailable, errors.DeadlineExceeded):
            if attempt + 1 >= max(1, attempts):
                raise
    raise AssertionError("unreachable")
