"""mabeam.v1.AuthService, served by the registry: tokens and certificate principals, and WhoAmI.

Principals are written through :class:`mabeam.runtime.auth.PrincipalStore`
and read from the replica's watch-fed :class:`mabeam.runtime.auth.PrincipalBook`
(the one its authorizer checks calls against), so a revocation here is seen
by every replica of every service as soon as their watches deliver it.
The policy (admin only, WhoAmI for anyone known) is in :data:`mabeam.auth.POLICY`.
"""

from __future__ import annotations

import logging
from typing import Any

from mabeam import auth, errors
from mabeam.runtime import validate
from mabeam.runtime.auth import PrincipalBook, PrincipalStore
from mabeam.runtime.etcd import EtcdClient
from mabeam.server import MeshServer
from mabeam.v1 import auth_pb2, auth_pb2_grpc

SERVICE_NAME = "mabeam.v1.AuthService"
log = logging.getLogger("mabeam.registry.auth")


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    """Token management over gRPC (what ``mabeam auth`` calls)."""

    def __init__(self, book: PrincipalBook, etcd: EtcdClient, server: MeshServer) -> None:
        self._book = book
        self._store = PrincipalStore(etcd, server.config)

    async def CreateToken(
        self, request: auth_pb2.CreateTokenRequest, context: Any
    ) -> auth_pb2.CreateTokenResponse:
        name = auth.check_name(request.name)
        if request.role not in auth.ROLE_NAMES or request.role == auth_pb2.ROLE_UNSPECIFIED:
            raise errors.InvalidArgument(
                "role", "role: one of ROLE_ADMIN, ROLE_OPERATOR, ROLE_AGENT, ROLE_READER"
            )
        if request.role == auth.SERVICE:
            raise errors.InvalidArgument(
                "role",
                "ROLE_SERVICE is not granted over the API: `mabeam auth init` writes the service token",
            )
        pattern = ""
        if request.agent_pattern:
            if request.role != auth.AGENT:
                raise errors.InvalidArgument("agent_pattern", "agent_pattern is for ROLE_AGENT only")
            pattern = auth.check_pattern(request.agent_pattern)
        if request.certificate_subject:
            subject = request.certificate_subject
            if len(subject) > auth.MAX_SUBJECT or not subject.isprintable():
                raise errors.InvalidArgument(
                    "certificate_subject",
                    f"certificate_subject: at most {auth.MAX_SUBJECT} printable characters",
                )
            record = await self._store.grant_subject(name, request.role, subject, pattern)
            log.info("role %s granted to certificate %r (%s)", auth.role_name(request.role), subject, name)
            return auth_pb2.CreateTokenResponse(principal=record.identity.to_proto())
        record, token = await self._store.mint(name, request.role, pattern)
        log.info(
            "token %s created: name %r, role %s",
            record.identity.principal_id,
            name,
            auth.role_name(request.role),
        )
        return auth_pb2.CreateTokenResponse(principal=record.identity.to_proto(), token=token)

    async def ListTokens(
        self, request: auth_pb2.ListTokensRequest, context: Any
    ) -> auth_pb2.ListTokensResponse:
        size = validate.page_size(request.page_size)
        identities = [r.identity for r in self._book.records()]
        chunk, token = validate.page(identities, lambda i: i.principal_id, size, request.page_token, [])
        return auth_pb2.ListTokensResponse(principals=[i.to_proto() for i in chunk], next_page_token=token)

    async def RevokeToken(
        self, request: auth_pb2.RevokeTokenRequest, context: Any
    ) -> auth_pb2.RevokeTokenResponse:
        given = request.id.strip()
        principal_id = auth.token_id(given) or given
        if not principal_id or len(principal_id) > 64:
            raise errors.InvalidArgument(
                "id", "id: a principal id (mabeam auth list shows them), at most 64 characters"
            )
        caller = auth.current()
        if caller is not None and caller.principal_id == principal_id:
            raise errors.FailedPrecondition(
                "a token cannot revoke itself: create another admin token first, then revoke this one with it"
            )
        record = await self._store.delete(principal_id)
        if record is None:
            raise errors.NotFound(f"no principal {principal_id!r}")
        log.info("principal %s revoked (%s)", principal_id, record.identity.name)
        return auth_pb2.RevokeTokenResponse(principal=record.identity.to_proto())

    async def WhoAmI(self, request: auth_pb2.WhoAmIRequest, context: Any) -> auth_pb2.WhoAmIResponse:
        caller = auth.current()
        if caller is None:
            raise errors.FailedPrecondition("this mesh runs without auth: every caller is anonymous")
        return auth_pb2.WhoAmIResponse(principal=caller.to_proto())


def book_of(server: MeshServer) -> PrincipalBook | None:
    """The replica's principal book (None when it runs without auth)."""
    authorizer = server.authorizer
    verifier = authorizer.verifier if authorizer is not None else None
    return verifier if isinstance(verifier, PrincipalBook) else None


def add(server: MeshServer, etcd: EtcdClient) -> None:
    """Serve AuthService on ``server`` when it runs with auth."""
    book = book_of(server)
    if book is None:
        return
    server.add_service(
        SERVICE_NAME, auth_pb2_grpc.add_AuthServiceServicer_to_server, AuthServicer(book, etcd, server)
    )
