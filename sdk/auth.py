"""Who may call what: principals, roles, the policy table and the check every server runs.

A caller is identified by a bearer token in the ``authorization`` metadata
(``authorization: Bearer mbt_<id>_<secret>``) or, with mutual TLS on, by the
subject (common name) of its verified client certificate. Each principal has
one role (``mabeam.v1.Role``); :data:`POLICY` says, for every RPC of every
service, which roles may call it. A method with no rule is refused: an RPC
cannot ship unguarded (``tests/unit/test_auth_policy.py`` walks the descriptors).

Tokens carry 256 random bits; the mesh stores only their SHA-256 digest and
compares digests in constant time. The principals live in etcd; servers hold
them in a watch-fed cache (:mod:`mabeam.runtime.auth`), so checking a call
costs no etcd round trip. Agents check the mesh's own calls to them against
the digests of the service tokens, which the registry hands them
(:class:`ServiceVerifier`).

This module is part of the SDK: it imports no etcd client.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from mabeam import errors

# Re-exported: the token functions are part of this module's interface.
from mabeam.credentials import (
    ADMIN_TOKEN_FILE,
    SERVICE_TOKEN_FILE,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    TOKEN_PREFIX,
    agent_call_token,
    call_metadata,
    client_interceptors,
    default_token,
    digest,
    new_token,
    read_token_file,
    token_id,
    write_token_file,
)
from mabeam.v1 import auth_pb2, common_pb2

ADMIN = auth_pb2.ROLE_ADMIN
OPERATOR = auth_pb2.ROLE_OPERATOR
AGENT = auth_pb2.ROLE_AGENT
READER = auth_pb2.ROLE_READER
SERVICE = auth_pb2.ROLE_SERVICE

ROLE_NAMES: dict[int, str] = {
    ADMIN: "admin",
    OPERATOR: "operator",
    AGENT: "agent",
    READER: "reader",
    SERVICE: "service",
}
ROLES_BY_NAME: dict[str, int] = {name: role for role, name in ROLE_NAMES.items()}

MAX_AUTHORIZATION = 512
MAX_NAME = 128
MAX_SUBJECT = 256
MAX_PATTERN = 128
_NAME = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_PATTERN = re.compile(r"^[A-Za-z0-9._:*?-]{1,128}$")


def role_name(role: int) -> str:
    """``"admin"`` for ``ROLE_ADMIN``, ..., ``"none"`` for an unknown value."""
    return ROLE_NAMES.get(role, "none")


def certificate_principal_id(subject: str) -> str:
    """The principal id of a certificate subject: ``cert-`` and 12 hex digits."""
    return "cert-" + hashlib.sha256(subject.encode()).hexdigest()[:12]


def check_name(name: str) -> str:
    """``name`` if it is 1-128 characters of [A-Za-z0-9._:@-], else INVALID_ARGUMENT."""
    if not _NAME.fullmatch(name):  # fullmatch: ``$`` alone lets a final newline through
        raise errors.InvalidArgument(
            "name", f"name {name[:40]!r}: 1-{MAX_NAME} characters of [A-Za-z0-9._:@-]"
        )
    return name


def check_pattern(pattern: str) -> str:
    """An agent id glob of at most 128 characters of [A-Za-z0-9._:*?-], else INVALID_ARGUMENT."""
    if not _PATTERN.fullmatch(pattern):
        raise errors.InvalidArgument(
            "agent_pattern",
            f"agent_pattern {pattern[:40]!r}: 1-{MAX_PATTERN} characters of [A-Za-z0-9._:*?-]",
        )
    return pattern


@dataclass(frozen=True)
class Identity:
    """Who a call comes from: the principal's id, name and role."""

    principal_id: str
    name: str
    role: int
    agent_pattern: str = ""
    subject: str = ""

    def may_act_for(self, agent_id: str) -> bool:
        """True when this caller may register, beat, deregister or migrate ``agent_id``."""
        if self.role in (ADMIN, SERVICE):
            return True
        return self.role == AGENT and fnmatchcase(agent_id, self.agent_pattern or "*")

    def to_proto(self) -> auth_pb2.Principal:
        return auth_pb2.Principal(
            id=self.principal_id,
            name=self.name,
            role=self.role,  # type: ignore[arg-type]
            agent_pattern=self.agent_pattern,
            certificate_subject=self.subject,
        )


@dataclass(frozen=True)
class Rule:
    """Who may call one RPC.

    ``roles``: the roles allowed. ``scoped``: an agent-role caller may only
    name agent ids in its ``agent_pattern`` (the request's ``agent_id``; a
    stream checks each message itself with :func:`require_agent`).
    ``elevated``: fields (dotted paths) that, when set, need the admin role
    (e.g. a launch spec in ``MigrateAgent``: launching is an admin's).
    """

    roles: frozenset[int]
    scoped: bool = False
    elevated: tuple[str, ...] = ()


_ALL = frozenset({ADMIN, OPERATOR, AGENT, READER, SERVICE})
_READ = _ALL
_OPERATE = frozenset({ADMIN, OPERATOR, SERVICE})
_ADMINISTER = frozenset({ADMIN, SERVICE})
_AGENT_SELF = frozenset({ADMIN, AGENT, SERVICE})
_MESH = frozenset({SERVICE})
_SEND = frozenset({ADMIN, OPERATOR, AGENT, SERVICE})

READ = Rule(_READ)
OPERATE = Rule(_OPERATE)
ADMINISTER = Rule(_ADMINISTER)
AGENT_SELF = Rule(_AGENT_SELF, scoped=True)
MESH_ONLY = Rule(_MESH)


def _service(name: str, rules: Mapping[str, Rule]) -> dict[str, Rule]:
    return {f"/mabeam.v1.{name}/{method}": rule for method, rule in rules.items()}


# Every RPC of every mabeam service, and who may call it. docs/security.md
# shows this table; tests/unit/test_auth_policy.py fails on an RPC without a rule.
POLICY: dict[str, Rule] = {
    **_service(
        "RegistryService",
        {
            "RegisterAgent": AGENT_SELF,
            "Heartbeat": Rule(_AGENT_SELF),  # each beat's agent id: require_agent in the registry
            "DeregisterAgent": AGENT_SELF,
            "GetAgent": READ,
            "ListAgents": READ,
            "WatchAgents": READ,
            "StartAgent": ADMINISTER,
            "StopAgent": OPERATE,
            "RestartAgent": OPERATE,
            "ListSupervisedAgents": READ,
            "MigrateAgent": Rule(_AGENT_SELF, scoped=True, elevated=("launch",)),
            "ListNodes": READ,
        },
    ),
    **_service(
        "OrchestratorService",
        {
            "SetVariable": OPERATE,
            "GetVariable": READ,
            "ListVariables": READ,
            "DeleteVariable": OPERATE,
            "WatchVariables": READ,
            "BindVariable": Rule(_OPERATE, elevated=("binding.worker_pool",)),
            "UnbindVariable": OPERATE,
            "ListBindings": READ,
            "CoordinateVariable": OPERATE,
            "CoordinateSystem": OPERATE,
        },
    ),
    **_service(
        "CoordinationService",
        {
            "RunAuction": OPERATE,
            "RunMarket": OPERATE,
            "RunConsensus": OPERATE,
            "Run": OPERATE,
            "RegisterProtocol": ADMINISTER,
            "ListProtocols": READ,
            "UnregisterProtocol": ADMINISTER,
            "GetSession": READ,
            "ListSessions": READ,
            "WatchSession": READ,
        },
    ),
    # Served by the coordination service's processes. Send/Publish: an agent sends as itself only
    # (message.sender_id, checked by the service); Subscribe/Unsubscribe: an agent for its own ids.
    **_service(
        "MessagingService",
        {
            "Send": Rule(_SEND),
            "Publish": Rule(_SEND),
            "Subscribe": Rule(_SEND, scoped=True),
            "Unsubscribe": Rule(_SEND, scoped=True),
            "ListSubscriptions": READ,
        },
    ),
    **_service(
        "PlannerService",
        {
            # Starting agents is an admin's (StartAgent): so is a goal that lets the planner start them.
            "SubmitGoal": Rule(_OPERATE, elevated=("goal.may_start_agents",)),
            "ExecuteGoal": Rule(_OPERATE, elevated=("goal.may_start_agents",)),
            "GetGoal": READ,
            "ListGoals": READ,
            "CancelGoal": OPERATE,
        },
    ),
    **_service(
        "AuthService",
        {
            "CreateToken": Rule(frozenset({ADMIN})),
            "ListTokens": Rule(frozenset({ADMIN})),
            "RevokeToken": Rule(frozenset({ADMIN})),
            "WhoAmI": Rule(_ALL),
        },
    ),
    # Served by agents and protocol plugins: only the mesh's services call them.
    **_service(
        "AgentService",
        {
            "Coordinate": MESH_ONLY,
            "CoordinateBatch": MESH_ONLY,
            "ExecuteStep": MESH_ONLY,
            "ExportState": MESH_ONLY,
            "ImportState": MESH_ONLY,
            "AgentMoved": MESH_ONLY,
            "Plan": MESH_ONLY,
            "Deliver": MESH_ONLY,
            "DeliverBatch": MESH_ONLY,
        },
    ),
    **_service("ProtocolPluginService", {"Describe": MESH_ONLY, "Advance": MESH_ONLY}),
}

# Open to anyone: probes need health; reflection shows only the public contracts.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("mabeam_identity", default=None)


def current() -> Identity | None:
    """The identity of the call being handled (None when the server runs without auth)."""
    return _current.get()


def require_agent(agent_id: str) -> None:
    """PERMISSION_DENIED unless the current caller may act for ``agent_id`` (no-op without auth)."""
    identity = _current.get()
    if identity is not None and not identity.may_act_for(agent_id):
        raise errors.PermissionDenied(
            f"{role_name(identity.role)} token {identity.name!r} may act for agent ids matching "
            f"{identity.agent_pattern or '*'!r}, not {agent_id!r}",
            reason=common_pb2.ERROR_REASON_NOT_AUTHORIZED,
            metadata={"agent_id": agent_id, "role": role_name(identity.role)},
        )


# -- the server side -----------------------------------------------------------------


class Verifier:
    """Turns a bearer token or a certificate subject into an :class:`Identity`, or None.

    Implementations: the services' watch-fed principal book
    (:class:`mabeam.runtime.auth.PrincipalBook`) and the agents'
    :class:`ServiceVerifier`. Both answer from memory.
    """

    @property
    def enabled(self) -> bool:
        """False while this verifier cannot tell anyone apart: :meth:`Authorizer.check` then checks nothing."""
        return True

    def by_token(self, token: str) -> Identity | None:  # pragma: no cover - interface
        raise NotImplementedError

    def by_subject(self, subject: str) -> Identity | None:
        return None


def _has(request: Any, path: str) -> bool:
    obj = request
    *parents, last = path.split(".")
    for name in parents:
        if not obj.HasField(name):
            return False
        obj = getattr(obj, name)
    descriptor = obj.DESCRIPTOR.fields_by_name[last]
    if descriptor.message_type is not None or descriptor.containing_oneof is not None:
        return bool(obj.HasField(last))
    return bool(getattr(obj, last))


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _subject(context: Any) -> str:
    try:
        names = context.auth_context().get("x509_common_name") or []
    except Exception:
        return ""
    return names[0].decode() if names else ""


@dataclass
class Authorizer:
    """Authenticates and authorizes one call against :data:`POLICY` (or ``policy``).

    Run by the server's interceptor before the handler (so a refused call
    writes nothing); sets :func:`current` for the handler.
    """

    verifier: Verifier
    policy: Mapping[str, Rule] = field(default_factory=lambda: POLICY)

    def rule(self, method: str) -> Rule | None:
        """The rule of ``method``; None for the open ones (health, reflection)."""
        if method.startswith(OPEN_PREFIXES):
            return None
        rule = self.policy.get(method)
        if rule is None:
            # Fail closed: a method nobody wrote a rule for is nobody's.
            return Rule(frozenset())
        return rule

    def identify(self, context: Any) -> Identity:
        """The caller of the call behind ``context``, else UNAUTHENTICATED."""
        raw = _bearer(context.invocation_metadata())
        if raw is None:
            subject = _subject(context)
            if subject:
                found = self.verifier.by_subject(subject)
                if found is not None:
                    return found
                raise errors.Unauthenticated(
                    f"client certificate {subject[:64]!r} holds no role: an admin grants one "
                    "(mabeam auth create --certificate-subject), or send a bearer token"
                )
            raise errors.Unauthenticated(
                "no credentials: send 'authorization: Bearer <token>' "
                f"(${TOKEN_ENV}, or the {ADMIN_TOKEN_FILE} file mabeam up wrote)"
            )
        if len(raw) > MAX_AUTHORIZATION:
            raise errors.Unauthenticated(f"authorization header longer than {MAX_AUTHORIZATION} characters")
        scheme, _, token = raw.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise errors.Unauthenticated("malformed authorization header: expected 'Bearer <token>'")
        token = token.strip()
        if token_id(token) is None:
            raise errors.Unauthenticated(
                "malformed token: a mabeam token looks like mbt_<12 hex>_<43 characters>"
            )
        found = self.verifier.by_token(token)
        if found is None:
            raise errors.Unauthenticated("unknown or revoked token")
        return found

    def check(self, method: str, rule: Rule, request: Any, context: Any) -> Identity | None:
        """Authenticate, then authorize ``request`` (None for a stream) under ``rule``; set :func:`current`.

        A verifier that is not :attr:`~Verifier.enabled` (an agent that has
        learned no service token digest: its registry runs without auth) lets
        the call through unchecked, and :func:`current` stays None.
        """
        if not self.verifier.enabled:
            return None
        identity = self.identify(context)
        if identity.role not in rule.roles:
            raise self._denied(method, identity, rule.roles)
        if request is not None and identity.role not in (ADMIN, SERVICE):
            for path in rule.elevated:
                if _has(request, path):
                    raise self._denied(method, identity, rule.roles & {ADMIN, SERVICE}, f" with {path} set")
            if rule.scoped:
                _current.set(identity)
                require_agent(str(getattr(request, "agent_id", "")))
        _current.set(identity)
        return identity

    def recheck(self, identity: Identity | None, context: Any) -> None:
        """For a stream the caller opened as ``identity``: UNAUTHENTICATED once its credentials no longer verify.

        :meth:`check` runs once, when a stream opens; the server runs this
        before each message it sends, so a token revoked meanwhile ends the
        streams it opened (a watch, a heartbeat) instead of being served
        for as long as they last. Costs a lookup in memory, like :meth:`check`.
        """
        if identity is None:
            return
        if self.identify(context) != identity:
            raise errors.Unauthenticated(f"the credentials of {identity.name!r} changed during the call")

    @staticmethod
    def _denied(
        method: str, identity: Identity, allowed: Iterable[int], what: str = ""
    ) -> errors.PermissionDenied:
        names = sorted(role_name(r) for r in allowed if r != SERVICE)
        return errors.PermissionDenied(
            f"{role_name(identity.role)} {identity.name!r} may not call {method.rsplit('/', 1)[-1]}{what}: "
            f"needs {' or '.join(names) or 'the mesh itself'}",
            reason=common_pb2.ERROR_REASON_NOT_AUTHORIZED,
            metadata={"method": method, "role": role_name(identity.role), "allowed": ",".join(names)},
        )


# -- the agent side ------------------------------------------------------------------


class ServiceVerifier(Verifier):
    """An agent's check that a call comes from the mesh: the digests of the service tokens.

    The registry hands them to an agent when it registers and on its
    heartbeat stream (``service_token_digests``); :meth:`update` replaces
    them (an empty list changes nothing: once known, checks never switch off).
    With none known (a registry without auth) it is not :attr:`enabled`
    and nothing is checked. Any token whose digest is not among them, an
    admin's included (an agent cannot tell it from garbage), is
    UNAUTHENTICATED.
    """

    def __init__(self, digests: Iterable[str] = ()) -> None:
        self._digests: tuple[bytes, ...] = tuple(d.encode() for d in digests)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def update(self, digests: Iterable[str]) -> None:
        fresh = tuple(d.encode() for d in digests)
        if fresh:
            self._digests = fresh

    def by_token(self, token: str) -> Identity | None:
        mine = digest(token).encode()
        # Compare against every digest (constant time each): no early exit on a match.
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(mine, known)
        if not matched:
            return None
        return Identity(principal_id=token_id(token) or "", name="mesh", role=SERVICE)


__all__ = [
    "ADMIN",
    "ADMIN_TOKEN_FILE",
    "AGENT",
    "OPERATOR",
    "POLICY",
    "READER",
    "SERVICE",
    "SERVICE_TOKEN_FILE",
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "TOKEN_PREFIX",
    "Authorizer",
    "Identity",
    "Rule",
    "ServiceVerifier",
    "Verifier",
    "agent_call_token",
    "call_metadata",
    "client_interceptors",
    "current",
    "default_token",
    "digest",
    "new_token",
    "read_token_file",
    "require_agent",
    "token_id",
    "write_token_file",
]
