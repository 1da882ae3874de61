"""The mesh's principals in etcd: the services' watch-fed book, creation, revocation, bootstrap.

Keys (``P`` is the mesh prefix)::

    P/auth/principals/<id>   JSON {id, name, role, agent_pattern, digest | subject}

A token principal stores the SHA-256 digest of its token, never the token. A
certificate principal stores the certificate subject (common name) it
grants a role to. Every replica of every service follows the prefix with a
:class:`mabeam.runtime.cache.PrefixCache`, so a call is checked from memory
and a revocation reaches every replica as fast as the watch delivers it
(well under 1 s).

:func:`bootstrap` gives a new mesh its first credentials: an admin token
for people and a service token for the services, each written to a file of
mode 0600 and registered here by digest. It is what ``mabeam up`` and
``mabeam auth init`` run; it keeps credentials that are still valid.
"""

from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mabeam import auth, errors
from mabeam.config import MeshConfig
from mabeam.runtime.cache import PrefixCache
from mabeam.runtime.etcd import EtcdClient

log = logging.getLogger("mabeam.runtime.auth")


def principals_prefix(config: MeshConfig) -> bytes:
    return config.key("auth", "principals") + b"/"


@dataclass(frozen=True)
class PrincipalRecord:
    """One principal as stored: who it is, and how to recognise it."""

    identity: auth.Identity
    digest: str = ""
    # For a service token: the digest of the credential derived from it for
    # calls to agents (mabeam.auth.agent_call_token), which agents check.
    agent_call_digest: str = ""

    def encode(self) -> bytes:
        i = self.identity
        doc = {
            "id": i.principal_id,
            "name": i.name,
            "role": auth.role_name(i.role),
            "agent_pattern": i.agent_pattern,
        }
        if self.digest:
            doc["digest"] = self.digest
        if self.agent_call_digest:
            doc["agent_call_digest"] = self.agent_call_digest
        if i.subject:
            doc["subject"] = i.subject
        return json.dumps(doc, sort_keys=True).encode()

    @staticmethod
    def decode(_key: bytes, value: bytes) -> PrincipalRecord:
        doc = json.loads(value)
        role = auth.ROLES_BY_NAME[doc["role"]]
        identity = auth.Identity(
            principal_id=str(doc["id"]),
            name=str(doc["name"]),
            role=role,
            agent_pattern=str(doc.get("agent_pattern", "")),
            subject=str(doc.get("subject", "")),
        )
        return PrincipalRecord(identity, str(doc.get("digest", "")), str(doc.get("agent_call_digest", "")))


def token_record(identity: auth.Identity, token: str) -> PrincipalRecord:
    """What is stored for ``token``: digests only (for a service token, that of its agent-call credential too)."""
    agent_call = auth.digest(auth.agent_call_token(token)) if identity.role == auth.SERVICE else ""
    return PrincipalRecord(identity, auth.digest(token), agent_call)


class PrincipalBook(auth.Verifier):
    """Every principal of the mesh, in memory, fed by a watch: the services' :class:`mabeam.auth.Verifier`."""

    def __init__(self, client: EtcdClient, config: MeshConfig) -> None:
        self.cache: PrefixCache[PrincipalRecord] = PrefixCache(
            client, principals_prefix(config), PrincipalRecord.decode
        )
        self._prefix = principals_prefix(config)
        self._subjects: dict[str, PrincipalRecord] = {}
        # Service principal id -> its agent-call digest, and their sorted list: what the
        # registry hands agents on every heartbeat answer, kept current here, not rebuilt per beat.
        self._service: dict[str, str] = {}
        self._service_digests: list[str] = []
        self.cache.add_listener(self._index)

    def _index(
        self, kind: str, _key: bytes, old: PrincipalRecord | None, new: PrincipalRecord | None, _rev: int
    ) -> None:
        if old is not None and old.identity.subject:
            self._subjects.pop(old.identity.subject, None)
        if new is not None and new.identity.subject:
            self._subjects[new.identity.subject] = new
        changed = False
        if old is not None and old.identity.role == auth.SERVICE:
            changed = self._service.pop(old.identity.principal_id, None) is not None
        if new is not None and new.identity.role == auth.SERVICE and new.agent_call_digest:
            self._service[new.identity.principal_id] = new.agent_call_digest
            changed = True
        if changed:
            self._service_digests = sorted(self._service.values())

    async def start(self) -> None:
        await self.cache.start()

    async def stop(self) -> None:
        await self.cache.stop()

    def by_token(self, token: str) -> auth.Identity | None:
        token_id = auth.token_id(token)
        if token_id is None:
            return None
        record = self.cache.get(self._prefix + token_id.encode())
        if record is None or not record.digest:
            return None
        if not hmac.compare_digest(record.digest.encode(), auth.digest(token).encode()):
            return None
        return record.identity

    def by_subject(self, subject: str) -> auth.Identity | None:
        record = self._subjects.get(subject)
        return record.identity if record is not None else None

    def records(self) -> list[PrincipalRecord]:
        """Every principal, in id order."""
        return sorted((r for _, r in self.cache.items()), key=lambda r: r.identity.principal_id)

    def service_digests(self) -> list[str]:
        """What agents check the mesh's calls against: the digests of the credentials
        derived from the service tokens (:func:`mabeam.auth.agent_call_token`), never
        of a token the services accept. Kept current by the watch; do not modify."""
        return self._service_digests


class PrincipalStore:
    """Writes of principals (the book only reads)."""

    def __init__(self, client: EtcdClient, config: MeshConfig) -> None:
        self.client = client
        self.config = config

    def key(self, principal_id: str) -> bytes:
        return principals_prefix(self.config) + principal_id.encode()

    async def create(self, record: PrincipalRecord, lease: int | None = None) -> bool:
        """Store ``record`` unless its id exists (False when it does); with ``lease``, it dies with it."""
        c = self.client
        key = self.key(record.identity.principal_id)
        ok, _ = await c.transaction(
            compare=[c.transactions.create(key) == 0],
            success=[c.transactions.put(key, record.encode(), lease=lease)],
            failure=[],
        )
        return bool(ok)

    async def get(self, principal_id: str) -> PrincipalRecord | None:
        got = await self.client.get(self.key(principal_id))
        return PrincipalRecord.decode(b"", bytes(got.value)) if got is not None else None

    async def delete(self, principal_id: str) -> PrincipalRecord | None:
        """Remove a principal; returns what was removed (None when it was not there)."""
        c = self.client
        key = self.key(principal_id)
        ok, responses = await c.transaction(
            compare=[c.transactions.create(key) != 0],
            success=[c.transactions.get(key), c.transactions.delete(key)],
            failure=[],
        )
        if not ok:
            return None
        kvs = responses[0]
        if not kvs:
            return None
        return PrincipalRecord.decode(b"", bytes(kvs[0][0]))  # (value, metadata) pairs

    async def mint(
        self, name: str, role: int, agent_pattern: str = "", *, lease: int | None = None
    ) -> tuple[PrincipalRecord, str]:
        """A new token principal: ``(record, token)``; the token exists only in the answer.

        With ``lease`` the principal dies with that lease (the credential a
        replica hands its own child processes ends with the replica).
        """
        for _ in range(5):
            token, token_id = auth.new_token()
            identity = auth.Identity(
                principal_id=token_id,
                name=name,
                role=role,
                agent_pattern=(agent_pattern or "*") if role == auth.AGENT else "",
            )
            record = token_record(identity, token)
            if await self.create(record, lease):
                return record, token
        raise errors.Internal("could not choose a free token id in 5 tries")

    async def grant_subject(
        self, name: str, role: int, subject: str, agent_pattern: str = ""
    ) -> PrincipalRecord:
        """Give ``role`` to the client certificate ``subject``; ALREADY_EXISTS when it has one."""
        identity = auth.Identity(
            principal_id=auth.certificate_principal_id(subject),
            name=name,
            role=role,
            agent_pattern=(agent_pattern or "*") if role == auth.AGENT else "",
            subject=subject,
        )
        record = PrincipalRecord(identity)
        if not await self.create(record):
            raise errors.AlreadyExists(f"certificate subject {subject!r} has a role already: revoke it first")
        return record


async def enroll(client: EtcdClient, config: MeshConfig, token: str, role: int, name: str) -> PrincipalRecord:
    """Register a token made elsewhere (a compose or Kubernetes secret) under ``role``; idempotent.

    ALREADY_EXISTS when its id is taken by another token.
    """
    token_id = auth.token_id(token)
    if token_id is None:
        raise errors.InvalidArgument("token", "not a mabeam token (mbt_<12 hex>_<43 characters>)")
    store = PrincipalStore(client, config)
    identity = auth.Identity(
        principal_id=token_id, name=name, role=role, agent_pattern="*" if role == auth.AGENT else ""
    )
    record = token_record(identity, token)
    if await store.create(record):
        return record
    found = await store.get(token_id)
    if found is not None and found.identity.role == role and hmac.compare_digest(found.digest, record.digest):
        return found
    raise errors.AlreadyExists(f"token id {token_id} is taken by another principal")


@dataclass(frozen=True)
class Credentials:
    """The files :func:`bootstrap` leaves: the admin token (people) and the service token (services)."""

    admin_file: Path
    service_file: Path
    created: tuple[str, ...]  # which of "admin", "service" were minted now


async def _still_valid(store: PrincipalStore, path: Path, role: int) -> bool:
    try:
        token = auth.read_token_file(path)
    except errors.MabeamError:
        return False
    token_id = auth.token_id(token)
    record = await store.get(token_id or "")
    return (
        record is not None
        and record.identity.role == role
        and hmac.compare_digest(record.digest.encode(), auth.digest(token).encode())
    )


async def bootstrap(client: EtcdClient, config: MeshConfig, directory: Path) -> Credentials:
    """Make sure ``directory`` holds a valid admin and service token (mode 0600), minting what is missing.

    A file whose token etcd does not know (a fresh etcd, a revoked token) is
    replaced. Tokens are never logged.
    """
    store = PrincipalStore(client, config)
    created: list[str] = []
    files = {"admin": directory / auth.ADMIN_TOKEN_FILE, "service": directory / auth.SERVICE_TOKEN_FILE}
    roles = {"admin": auth.ADMIN, "service": auth.SERVICE}
    for what, path in files.items():
        if await _still_valid(store, path, roles[what]):
            continue
        _, token = await store.mint(f"{what}-bootstrap", roles[what])
        auth.write_token_file(path, token)
        created.append(what)
    return Credentials(files["admin"], files["service"], tuple(created))
