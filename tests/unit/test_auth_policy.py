"""The pure logic of mabeam.auth: the policy covers every RPC, tokens, scopes, and the Authorizer's verdicts."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from mabeam import auth, errors
from mabeam.v1 import (
    agent_pb2,
    auth_pb2,
    common_pb2,
    coordination_pb2,
    messaging_pb2,
    orchestrator_pb2,
    planner_pb2,
    protocol_plugin_pb2,
    registry_pb2,
)

MODULES = (
    agent_pb2,
    auth_pb2,
    coordination_pb2,
    messaging_pb2,
    orchestrator_pb2,
    planner_pb2,
    protocol_plugin_pb2,
    registry_pb2,
)
SERVICES = {
    "RegistryService",
    "OrchestratorService",
    "CoordinationService",
    "MessagingService",
    "PlannerService",
    "AuthService",
    "AgentService",
    "ProtocolPluginService",
}


def services() -> dict[str, ServiceDescriptor]:
    found: dict[str, ServiceDescriptor] = {}
    for module in MODULES:
        for name, descriptor in module.DESCRIPTOR.services_by_name.items():
            found[name] = descriptor
    return found


def methods() -> dict[str, MethodDescriptor]:
    return {f"/{m.containing_service.full_name}/{m.name}": m for s in services().values() for m in s.methods}


# -- the policy covers the contracts exactly -------------------------------------------


def test_the_descriptors_hold_the_services_the_policy_is_written_for() -> None:
    assert set(services()) == SERVICES


def test_every_rpc_has_a_rule() -> None:
    missing = sorted(set(methods()) - set(auth.POLICY))
    assert not missing, f"RPCs without a rule in mabeam.auth.POLICY (they would be refused to all): {missing}"


def test_every_rule_names_an_rpc_that_exists() -> None:
    stale = sorted(set(auth.POLICY) - set(methods()))
    assert not stale, f"POLICY rules for RPCs the contracts do not have: {stale}"


def test_rules_are_well_formed() -> None:
    known = set(auth.ROLE_NAMES)
    for method, rule in auth.POLICY.items():
        descriptor = methods()[method]
        assert rule.roles, method
        assert rule.roles <= known, method
        # The mesh's own services may call anything they are allowed to at all: nothing is admin-only
        # except AuthService (the services never mint tokens).
        if not method.startswith("/mabeam.v1.AuthService/"):
            assert auth.SERVICE in rule.roles, method
        if rule.scoped or rule.elevated:
            # Scopes and elevated fields are checked on the request message: a client stream has none
            # before the handler, so such a rule there would check nothing.
            assert not descriptor.client_streaming, method
        if rule.scoped:
            assert "agent_id" in descriptor.input_type.fields_by_name, method
        for path in rule.elevated:
            message: Any = descriptor.input_type
            *parents, last = path.split(".")
            for name in parents:
                message = message.fields_by_name[name].message_type
                assert message is not None, (method, path)
            assert last in message.fields_by_name, (method, path)


def test_the_served_services_are_never_open_to_everyone_for_writes() -> None:
    # Spot checks of the table's intent: what launches processes or hands out credentials is the admin's.
    admin_only = {auth.ADMIN, auth.SERVICE}
    for method in (
        "/mabeam.v1.RegistryService/StartAgent",
        "/mabeam.v1.CoordinationService/RegisterProtocol",
        "/mabeam.v1.CoordinationService/UnregisterProtocol",
    ):
        assert auth.POLICY[method].roles == admin_only, method
    for method in ("CreateToken", "ListTokens", "RevokeToken"):
        assert auth.POLICY[f"/mabeam.v1.AuthService/{method}"].roles == {auth.ADMIN}
    for service in ("AgentService", "ProtocolPluginService"):
        for method, rule in auth.POLICY.items():
            if method.startswith(f"/mabeam.v1.{service}/"):
                assert rule.roles == {auth.SERVICE}, method


READS = ("Get", "List", "Watch", "Describe")


def test_only_reads_are_open_to_readers() -> None:
    # A reader (and any role granted everything READ grants) may look, never change: every rule that admits
    # the reader role is on a method that only reads.
    for method, rule in auth.POLICY.items():
        name = method.rsplit("/", 1)[1]
        if auth.READER in rule.roles:
            assert name.startswith(READS) or name == "WhoAmI", f"{method} admits readers but is not a read"
            assert rule.roles == frozenset(auth.ROLE_NAMES), method  # a read is open to every role
        elif name.startswith(("Get", "List", "Watch")) and not method.startswith("/mabeam.v1.AuthService/"):
            raise AssertionError(f"{method} is a read but readers may not call it")


# -- tokens ----------------------------------------------------------------------------


def test_token_format_id_and_digest() -> None:
    token, token_id = auth.new_token()
    assert re.fullmatch(r"mbt_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", token)
    assert auth.token_id(token) == token_id
    assert token.startswith(f"mbt_{token_id}_")
    assert auth.digest(token) == hashlib.sha256(token.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", auth.digest(token))
    assert auth.digest(token) not in token
    other, other_id = auth.new_token()
    assert other != token and other_id != token_id and auth.digest(other) != auth.digest(token)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "mbt_",
        "mbt_0123456789ab",
        "mbt_0123456789ab_" + "a" * 42,
        "mbt_0123456789ab_" + "a" * 44,
        "mbt_0123456789AB_" + "a" * 43,  # the id is lower-case hex
        "mbt_0123456789ab_" + "a" * 42 + "!",
        "xyz_0123456789ab_" + "a" * 43,
        " mbt_0123456789ab_" + "a" * 43,
        "mbt_0123456789ab_" + "a" * 43 + "\n",
    ],
)
def test_malformed_tokens_have_no_id(bad: str) -> None:
    assert auth.token_id(bad) is None


def test_names_and_patterns() -> None:
    assert auth.check_name("ci-bot@team.example") == "ci-bot@team.example"
    for bad in ("", "a b", "x" * 129, "name/with/slash", "é", "admin\n", "admin\nforged log line"):
        with pytest.raises(errors.InvalidArgument):
            auth.check_name(bad)
    assert auth.check_pattern("w-*") == "w-*"
    for bad in ("", "w/*", "[abc]", "x" * 129, "w-*\n"):
        with pytest.raises(errors.InvalidArgument):
            auth.check_pattern(bad)


# -- identities ------------------------------------------------------------------------


def identity(role: int, pattern: str = "", name: str = "t") -> auth.Identity:
    return auth.Identity(principal_id=f"id-{name}", name=name, role=role, agent_pattern=pattern)


@pytest.mark.parametrize(
    ("pattern", "agent_id", "allowed"),
    [
        ("w-*", "w-1", True),
        ("w-*", "w-", True),
        ("w-*", "x-1", False),
        ("w-*", "W-1", False),  # case-sensitive on every platform
        ("w-*", "xw-1", False),
        ("w-?", "w-1", True),
        ("w-?", "w-12", False),
        ("exact", "exact", True),
        ("exact", "exact2", False),
        ("*", "anything", True),
        ("", "anything", True),  # an agent token without a pattern acts for any id
    ],
)
def test_agent_may_act_for_the_ids_its_glob_matches(pattern: str, agent_id: str, allowed: bool) -> None:
    assert identity(auth.AGENT, pattern).may_act_for(agent_id) is allowed


def test_only_agents_admins_and_services_act_for_agents() -> None:
    assert identity(auth.ADMIN).may_act_for("x-1")
    assert identity(auth.SERVICE).may_act_for("x-1")
    assert not identity(auth.OPERATOR).may_act_for("x-1")
    assert not identity(auth.READER).may_act_for("x-1")
    assert not identity(auth_pb2.ROLE_UNSPECIFIED).may_act_for("x-1")


# -- the Authorizer --------------------------------------------------------------------


class FakeVerifier(auth.Verifier):
    def __init__(
        self, tokens: dict[str, auth.Identity], subjects: dict[str, auth.Identity] | None = None
    ) -> None:
        self.tokens = tokens
        self.subjects = subjects or {}
        self.asked: list[str] = []

    def by_token(self, token: str) -> auth.Identity | None:
        self.asked.append(token)
        return self.tokens.get(token)

    def by_subject(self, subject: str) -> auth.Identity | None:
        return self.subjects.get(subject)


class FakeContext:
    def __init__(self, metadata: tuple[tuple[str, Any], ...] = (), subject: str = "") -> None:
        self._metadata = metadata
        self._subject = subject

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_common_name": [self._subject.encode()]} if self._subject else {}


TOKENS = {
    role: auth.new_token()[0] for role in (auth.ADMIN, auth.OPERATOR, auth.AGENT, auth.READER, auth.SERVICE)
}
IDENTITIES = {
    TOKENS[role]: identity(role, "w-*" if role == auth.AGENT else "", auth.role_name(role)) for role in TOKENS
}
REGISTER = "/mabeam.v1.RegistryService/RegisterAgent"
MIGRATE = "/mabeam.v1.RegistryService/MigrateAgent"
BIND = "/mabeam.v1.OrchestratorService/BindVariable"
SET = "/mabeam.v1.OrchestratorService/SetVariable"
LIST = "/mabeam.v1.RegistryService/ListAgents"


def bearer(token: str) -> FakeContext:
    return FakeContext((("authorization", f"Bearer {token}"),))


@pytest.fixture(autouse=True)
def _no_caller_leaks() -> Iterator[None]:
    """check() sets the caller of the current context: put it back after each test."""
    token = auth._current.set(None)
    yield
    auth._current.reset(token)


@pytest.fixture
def authorizer() -> auth.Authorizer:
    return auth.Authorizer(FakeVerifier(dict(IDENTITIES)))


def check(
    authorizer: auth.Authorizer, method: str, context: FakeContext, request: Any = None
) -> auth.Identity | None:
    rule = authorizer.rule(method)
    assert rule is not None
    return authorizer.check(method, rule, request, context)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "no credentials"),
        ((("authorization", "Bearer " + "a" * auth.MAX_AUTHORIZATION),), "longer than"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "malformed authorization"),
        ((("authorization", "Bearer"),), "malformed authorization"),
        ((("authorization", "Bearer    "),), "malformed authorization"),
        ((("authorization", "Token " + TOKENS[auth.ADMIN]),), "malformed authorization"),
        ((("authorization", TOKENS[auth.ADMIN]),), "malformed authorization"),
        ((("authorization", "Bearer mbt_nothex______" + "a" * 43),), "malformed token"),
        ((("authorization", "Bearer " + auth.new_token()[0]),), "unknown or revoked"),
        ((("authorization", b"Bearer " + auth.new_token()[0].encode()),), "unknown or revoked"),
    ],
)
def test_bad_credentials_are_unauthenticated(
    authorizer: auth.Authorizer, metadata: tuple[tuple[str, Any], ...], message: str
) -> None:
    with pytest.raises(errors.Unauthenticated, match=message):
        check(authorizer, LIST, FakeContext(metadata), registry_pb2.ListAgentsRequest())


def test_an_oversized_header_is_refused_before_any_lookup() -> None:
    verifier = FakeVerifier(dict(IDENTITIES))
    authorizer = auth.Authorizer(verifier)
    padded = "Bearer " + TOKENS[auth.ADMIN] + " " * (auth.MAX_AUTHORIZATION)
    assert len(padded) > auth.MAX_AUTHORIZATION
    with pytest.raises(errors.Unauthenticated, match=f"longer than {auth.MAX_AUTHORIZATION}"):
        check(authorizer, LIST, FakeContext((("authorization", padded),)), registry_pb2.ListAgentsRequest())
    assert verifier.asked == []
    # At the limit, the same token is accepted (whitespace around it is tolerated).
    fits = "Bearer " + TOKENS[auth.ADMIN]
    fits += " " * (auth.MAX_AUTHORIZATION - len(fits))
    assert len(fits) == auth.MAX_AUTHORIZATION
    got = check(authorizer, LIST, FakeContext((("authorization", fits),)), registry_pb2.ListAgentsRequest())
    assert got is not None and got.role == auth.ADMIN


def test_the_scheme_is_case_insensitive(authorizer: auth.Authorizer) -> None:
    context = FakeContext((("authorization", f"bearer {TOKENS[auth.READER]}"),))
    got = check(authorizer, LIST, context, registry_pb2.ListAgentsRequest())
    assert got is not None and got.role == auth.READER


def test_every_role_reads(authorizer: auth.Authorizer) -> None:
    for token, who in IDENTITIES.items():
        assert check(authorizer, LIST, bearer(token), registry_pb2.ListAgentsRequest()) == who


@pytest.mark.parametrize(
    ("method", "role"),
    [
        (SET, auth.READER),
        (SET, auth.AGENT),
        (REGISTER, auth.READER),
        (REGISTER, auth.OPERATOR),
        ("/mabeam.v1.RegistryService/StartAgent", auth.OPERATOR),
        ("/mabeam.v1.AuthService/CreateToken", auth.SERVICE),
        ("/mabeam.v1.AuthService/CreateToken", auth.OPERATOR),
        ("/mabeam.v1.AgentService/ExportState", auth.ADMIN),
        ("/mabeam.v1.ProtocolPluginService/Advance", auth.OPERATOR),
    ],
)
def test_a_role_outside_the_rule_is_permission_denied(
    authorizer: auth.Authorizer, method: str, role: int
) -> None:
    with pytest.raises(errors.PermissionDenied) as caught:
        check(authorizer, method, bearer(TOKENS[role]), None)
    err = caught.value
    assert err.reason_value == common_pb2.ERROR_REASON_NOT_AUTHORIZED
    assert err.metadata["method"] == method
    assert err.metadata["role"] == auth.role_name(role)
    assert auth.role_name(role) not in err.metadata["allowed"].split(",")


def test_elevated_fields_need_an_admin(authorizer: auth.Authorizer) -> None:
    pool = orchestrator_pb2.BindVariableRequest(
        binding=orchestrator_pb2.OrchestrationBinding(
            variable="v", worker_pool=orchestrator_pb2.WorkerPool(agent_id_prefix="w-")
        )
    )
    plain = orchestrator_pb2.BindVariableRequest(binding=orchestrator_pb2.OrchestrationBinding(variable="v"))
    with pytest.raises(errors.PermissionDenied, match=r"binding\.worker_pool") as caught:
        check(authorizer, BIND, bearer(TOKENS[auth.OPERATOR]), pool)
    assert caught.value.reason_value == common_pb2.ERROR_REASON_NOT_AUTHORIZED
    assert caught.value.metadata["allowed"] == "admin"
    assert check(authorizer, BIND, bearer(TOKENS[auth.OPERATOR]), plain) is not None
    # An empty (default) worker_pool message that is set still counts as set.
    empty_pool = orchestrator_pb2.BindVariableRequest(
        binding=orchestrator_pb2.OrchestrationBinding(variable="v", worker_pool=orchestrator_pb2.WorkerPool())
    )
    with pytest.raises(errors.PermissionDenied):
        check(authorizer, BIND, bearer(TOKENS[auth.OPERATOR]), empty_pool)
    assert check(authorizer, BIND, bearer(TOKENS[auth.ADMIN]), pool) is not None
    assert check(authorizer, BIND, bearer(TOKENS[auth.SERVICE]), pool) is not None


def test_a_launch_spec_in_a_migration_needs_an_admin(authorizer: auth.Authorizer) -> None:
    launch = registry_pb2.MigrateAgentRequest(
        agent_id="w-1", launch=registry_pb2.LaunchSpec(python_entry_point="m:f")
    )
    endpoint = registry_pb2.MigrateAgentRequest(agent_id="w-1", target_endpoint="127.0.0.1:9")
    with pytest.raises(errors.PermissionDenied, match="launch"):
        check(authorizer, MIGRATE, bearer(TOKENS[auth.AGENT]), launch)
    assert check(authorizer, MIGRATE, bearer(TOKENS[auth.AGENT]), endpoint) is not None
    assert check(authorizer, MIGRATE, bearer(TOKENS[auth.ADMIN]), launch) is not None
    with pytest.raises(errors.PermissionDenied):
        check(authorizer, MIGRATE, bearer(TOKENS[auth.OPERATOR]), endpoint)


def test_scoped_rules_hold_an_agent_to_its_pattern(authorizer: auth.Authorizer) -> None:
    agent = bearer(TOKENS[auth.AGENT])  # w-*
    ok = registry_pb2.RegisterAgentRequest(agent_id="w-1", endpoint="127.0.0.1:1")
    assert check(authorizer, REGISTER, agent, ok) == IDENTITIES[TOKENS[auth.AGENT]]
    assert auth.current() == IDENTITIES[TOKENS[auth.AGENT]]
    for method, request in (
        (REGISTER, registry_pb2.RegisterAgentRequest(agent_id="x-1", endpoint="127.0.0.1:1")),
        ("/mabeam.v1.RegistryService/DeregisterAgent", registry_pb2.DeregisterAgentRequest(agent_id="x-1")),
        (MIGRATE, registry_pb2.MigrateAgentRequest(agent_id="x-1", target_endpoint="127.0.0.1:9")),
        (REGISTER, registry_pb2.RegisterAgentRequest(agent_id="", endpoint="127.0.0.1:1")),
    ):
        with pytest.raises(errors.PermissionDenied) as caught:
            check(authorizer, method, agent, request)
        assert caught.value.reason_value == common_pb2.ERROR_REASON_NOT_AUTHORIZED
        assert caught.value.metadata["agent_id"] == request.agent_id
    # Admins and the mesh act for any id.
    other = registry_pb2.RegisterAgentRequest(agent_id="x-1", endpoint="127.0.0.1:1")
    assert check(authorizer, REGISTER, bearer(TOKENS[auth.ADMIN]), other) is not None
    assert check(authorizer, REGISTER, bearer(TOKENS[auth.SERVICE]), other) is not None


def test_require_agent_follows_the_current_caller(authorizer: auth.Authorizer) -> None:
    heartbeat = "/mabeam.v1.RegistryService/Heartbeat"
    check(authorizer, heartbeat, bearer(TOKENS[auth.AGENT]), None)  # a stream: no request to scope yet
    auth.require_agent("w-7")
    with pytest.raises(errors.PermissionDenied, match="x-1"):
        auth.require_agent("x-1")


def test_unknown_methods_are_refused_and_health_and_reflection_are_open(authorizer: auth.Authorizer) -> None:
    assert authorizer.rule("/grpc.health.v1.Health/Check") is None
    assert authorizer.rule("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None
    assert authorizer.rule("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo") is None
    rule = authorizer.rule("/mabeam.v1.RegistryService/NoSuchMethod")
    assert rule is not None and not rule.roles
    with pytest.raises(errors.PermissionDenied):
        check(authorizer, "/mabeam.v1.RegistryService/NoSuchMethod", bearer(TOKENS[auth.ADMIN]), None)
    # A look-alike of the open prefixes is not open.
    assert authorizer.rule("/grpc.healthy.Evil/Check") is not None


def test_a_certificate_subject_is_a_principal_only_when_granted() -> None:
    granted = identity(auth.OPERATOR, name="cert-op")
    authorizer = auth.Authorizer(FakeVerifier({}, {"op.example": granted}))
    assert (
        check(authorizer, SET, FakeContext(subject="op.example"), orchestrator_pb2.SetVariableRequest())
        == granted
    )
    with pytest.raises(errors.Unauthenticated, match="holds no role"):
        check(authorizer, SET, FakeContext(subject="stranger.example"), orchestrator_pb2.SetVariableRequest())


def test_the_service_verifier_knows_only_service_tokens() -> None:
    service, other = auth.new_token()[0], auth.new_token()[0]
    verifier = auth.ServiceVerifier([auth.digest(service)])
    found = verifier.by_token(service)
    assert found is not None and found.role == auth.SERVICE
    assert verifier.by_token(other) is None
    verifier.update([])  # an empty update never switches checks off
    assert verifier.by_token(service) is not None
    verifier.update([auth.digest(other)])
    assert verifier.by_token(service) is None and verifier.by_token(other) is not None


def test_recheck_ends_a_stream_whose_token_was_revoked() -> None:
    verifier = FakeVerifier(dict(IDENTITIES))
    authorizer = auth.Authorizer(verifier)
    token = TOKENS[auth.READER]
    caller = check(authorizer, "/mabeam.v1.RegistryService/WatchAgents", bearer(token), None)
    authorizer.recheck(caller, bearer(token))  # still valid: nothing happens
    authorizer.recheck(None, FakeContext())  # a call made without auth: nothing to recheck
    del verifier.tokens[token]  # revoked
    with pytest.raises(errors.Unauthenticated, match="revoked"):
        authorizer.recheck(caller, bearer(token))
    # A principal that came back as someone else (a certificate subject granted another role) is not the caller.
    verifier.tokens[token] = identity(auth.ADMIN, name="reader")
    with pytest.raises(errors.Unauthenticated, match="changed"):
        authorizer.recheck(caller, bearer(token))
