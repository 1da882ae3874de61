"""Tokens of the mesh, and what a client needs to present one.

A token is ``mbt_<12 hex: its public id>_<43 characters: 256 random bits>``.
The mesh stores only its SHA-256 digest (:func:`digest`). A client presents
it as ``authorization: Bearer <token>`` on every call
(:func:`client_interceptors`, :func:`call_metadata`); when given none it takes
:func:`default_token`. The mesh's services call agents with a credential
derived from their service token (:func:`agent_call_token`), which the
services themselves refuse. Who may call what is :mod:`mabeam.auth`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mabeam import errors

TOKEN_PREFIX = "mbt_"
_TOKEN = re.compile(r"^mbt_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
# Longer authorization values are refused before any parsing.
# Where a client finds its token when none is given: the variable, then the
# file the variable names, then the admin token `mabeam up` wrote.
TOKEN_ENV = "MABEAM_TOKEN"
TOKEN_FILE_ENV = "MABEAM_TOKEN_FILE"
ADMIN_TOKEN_FILE = "admin.token"
SERVICE_TOKEN_FILE = "service.token"


def new_token() -> tuple[str, str]:
    """A fresh token and its public id: ``("mbt_<id>_<secret>", "<id>")``, 256 random bits of secret."""
    token_id = secrets.token_hex(6)
    return f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}", token_id


def token_id(token: str) -> str | None:
    """The public id of a well-formed token, else None."""
    # fullmatch: ``$`` alone also matches before a final newline, and "<token>\n" is not the token.
    match = _TOKEN.fullmatch(token)
    return match.group(1) if match else None


def digest(token: str) -> str:
    """What the mesh stores and compares for a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def agent_call_token(service_token: str) -> str:
    """The credential the mesh's services present to agents and protocol plugins, derived from the service token.

    ``mbt_<the service token's id>_<HMAC-SHA256(service token, "mabeam agent call")>``:
    an agent checks it against the digests the registry hands out, while the
    services refuse it (its digest is not the service principal's), so an
    endpoint that receives it learns nothing it could use against the mesh.
    Every replica holding the service token derives the same one.
    """
    token_id_ = token_id(service_token)
    if token_id_ is None:
        raise ValueError("not a mabeam token")
    mac = hmac.new(service_token.encode(), b"mabeam agent call", hashlib.sha256).digest()
    return f"{TOKEN_PREFIX}{token_id_}_{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


def default_token(data_dir: Path | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The token a client presents when given none.

    ``$MABEAM_TOKEN``, else the file ``$MABEAM_TOKEN_FILE`` names, else the
    admin token ``mabeam up`` wrote under its data directory
    (``$MABEAM_DATA_DIR``, default ``~/.mabeam/etcd``) when it is readable.
    """
    env = os.environ if env is None else env
    if env.get(TOKEN_ENV):
        return env[TOKEN_ENV].strip()
    path_raw = env.get(TOKEN_FILE_ENV)
    if path_raw:
        return read_token_file(Path(path_raw).expanduser())
    if data_dir is None:
        raw = env.get("MABEAM_DATA_DIR")
        data_dir = Path(raw).expanduser() if raw else Path.home() / ".mabeam" / "etcd"
    path = data_dir / ADMIN_TOKEN_FILE
    try:
        return read_token_file(path)
    except (OSError, errors.MabeamError):
        return None


def read_token_file(path: Path) -> str:
    """The token in ``path`` (one line); a missing or malformed file is a one-line error."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise errors.FailedPrecondition(f"token file {path}: {exc.strerror or exc}") from None
    if token_id(text) is None:
        raise errors.FailedPrecondition(f"token file {path} holds no mabeam token (mbt_...)")
    return text


def write_token_file(path: Path, token: str) -> None:
    """Write ``token`` to ``path``, created with mode 0600 (never readable by others, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    os.replace(tmp, path)


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries ``token`` (nothing when None)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class _TokenInterceptor:
    """Adds ``authorization: Bearer <token>`` to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._pair = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        from grpc import aio

        metadata = aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._pair)
        return details._replace(metadata=metadata)


def client_interceptors(token: str | None) -> list[Any]:
    """Channel interceptors that present ``token`` on every call (none when None)."""
    if not token:
        return []
    from grpc import aio

    base = _TokenInterceptor(token)

    class UU(aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(
            self, continuation: Callable[..., Any], details: Any, request: Any
        ) -> Any:
            return await continuation(base._details(details), request)

    class US(aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(
            self, continuation: Callable[..., Any], details: Any, request: Any
        ) -> Any:
            return await continuation(base._details(details), request)

    class SU(aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(
            self, continuation: Callable[..., Any], details: Any, request_iterator: Any
        ) -> Any:
            return await continuation(base._details(details), request_iterator)

    class SS(aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(
            self, continuation: Callable[..., Any], details: Any, request_iterator: Any
        ) -> Any:
            return await continuation(base._details(details), request_iterator)

    return [UU(), US(), SU(), SS()]
