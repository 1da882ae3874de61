"""Input checks shared by every service: each failure names the field (INVALID_ARGUMENT).

Also AIP-158 paging: page sizes and opaque page tokens bound to the filter
they were issued for.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
import math
import re
from collections.abc import Sequence
from typing import Any

from google.protobuf import duration_pb2

from mabeam.errors import InvalidArgument

ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")  # \Z: "$" would let a trailing newline in
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def identifier(value: str, field: str) -> str:
    """An id: 1-128 characters of ``[A-Za-z0-9._:-]``."""
    if not value:
        raise InvalidArgument(field, "is required")
    if not ID_RE.match(value):
        raise InvalidArgument(field, f"{value[:140]!r} must be 1-128 characters of [A-Za-z0-9._:-]")
    return value


def endpoint(value: str, field: str) -> str:
    """A ``host:port`` gRPC endpoint."""
    if not value:
        raise InvalidArgument(field, "is required (host:port)")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(field, f"{value[:140]!r} is not host:port with a port 1-65535")
    return value


def strings(values: Sequence[str], field: str, *, max_len: int = 128) -> list[str]:
    """A list of non-empty strings of at most ``max_len`` characters."""
    out = []
    for i, value in enumerate(values):
        if not value or len(value) > max_len:
            raise InvalidArgument(f"{field}[{i}]", f"must be 1-{max_len} characters")
        out.append(value)
    return out


def finite(value: float, field: str, *, minimum: float | None = None) -> float:
    """A finite number, optionally at least ``minimum``."""
    if math.isnan(value) or math.isinf(value):
        raise InvalidArgument(field, "must be a finite number")
    if minimum is not None and value < minimum:
        raise InvalidArgument(field, f"must be >= {minimum} (got {value})")
    return value


def seconds(
    value: duration_pb2.Duration,
    field: str,
    *,
    default: float,
    minimum: float = 0.0,
    maximum: float = math.inf,
    present: bool = True,
) -> float:
    """A Duration in seconds; the default when unset (zero); bounds checked."""
    if not present or (value.seconds == 0 and value.nanos == 0):
        return default
    s = value.seconds + value.nanos / 1e9
    if s < minimum or s > maximum:
        raise InvalidArgument(field, f"must be between {minimum:g} s and {maximum:g} s (got {s:g} s)")
    return s


def page_size(value: int, field: str = "page_size") -> int:
    """AIP-158: 0 means the default, negative is an error, large is capped."""
    if value < 0:
        raise InvalidArgument(field, f"must not be negative (got {value})")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _fingerprint(filters: Any) -> str:
    return hashlib.sha256(json.dumps(filters, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_page_token(after: str, filters: Any) -> str:
    """An opaque token: continue after ``after`` with the same ``filters``."""
    raw = json.dumps({"a": after, "f": _fingerprint(filters)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, filters: Any, field: str = "page_token") -> str | None:
    """The position a token continues after (None for no token)."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        doc = json.loads(base64.urlsafe_b64decode(padded.encode()))
        after, fingerprint = doc["a"], doc["f"]
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument(field, "is not a token this service issued") from None
    if fingerprint != _fingerprint(filters):
        raise InvalidArgument(field, "was issued for a different filter; start again without a token")
    return str(after)


def page(items: Sequence[Any], key: Any, size: int, token: str, filters: Any) -> tuple[list[Any], str]:
    """One page of ``items`` (sorted by ``key``) and the next token ('' on the last page)."""
    after = decode_page_token(token, filters)
    start = 0
    if after is not None:
        start = bisect.bisect_right(items, after, key=lambda item: str(key(item)))  # items are sorted
    chunk = list(items[start : start + size])
    more = start + size < len(items)
    return chunk, encode_page_token(str(key(chunk[-1])), filters) if more and chunk else ""
