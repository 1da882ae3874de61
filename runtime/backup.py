"""``mabeam backup FILE`` / ``mabeam restore FILE``: the mesh's durable state as one JSON file.

Format (``docs/backup.md``)::

    {"format": "mabeam-backup", "version": 2, "prefix": "/mabeam",
     "created_at": "2026-11-24T16:00:00Z", "revision": 1234,
     "counts": {"vars": 3, "bindings": 1, ...}, "left_out": ["agent-tokens", ...],
     "keys": [{"key": "vars/room/temp", "value": "<base64>"},
              {"key": "sessions/s1", "value": "<base64>", "ttl": 86000}, ...]}

Every key under the mesh prefix that is not bound to a lease is kept, except
secrets (:data:`SECRET_KINDS`: token digests of agents and supervised agents,
and everything under ``auth/``, the API tokens): variables and their
bindings, supervised agents' specs, registered protocols,
sessions with their transcripts, goals with their steps and events. Finished
objects of the retained kinds (:data:`RETAINED_KINDS`: sessions, goals,
stopped supervised records) live on expiry leases (:mod:`mabeam.runtime.retention`)
and are kept too, each with its lease's remaining time to live (``ttl``, in
seconds, asked of etcd once per lease); ``restore`` grants one lease per
distinct ``ttl`` and puts those keys on it, so they expire when they would
have. Anything else on a lease (registrations, endpoints, ephemeral
variables, ownerships) belongs to live processes and comes back with them, so
it is left out. Version 1 files (no ``ttl``) are still read. Keys are stored
relative to the prefix; ``restore`` writes them under its own prefix, into a
mesh that holds nothing there yet (``--force`` to overwrite). The file is
created with mode 0600 (it describes the whole mesh), never widened then narrowed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

from mabeam.runtime.etcd import EtcdClient, connect, snapshot

FORMAT = "mabeam-backup"
VERSION = 2
READS = (1, 2)  # the versions restore reads (1: no "ttl" field)
TXN_OPS = 100
# Kinds (first path element under the prefix) never written to a backup: token
# digests, and the API tokens' principals (``auth/``). A restored mesh issues new ones.
SECRET_KINDS = frozenset(
    {"agent-tokens", "agent-tokens-moving", "supervised-tokens", "process-tokens", "auth"}
)
# Kinds whose finished objects live on expiry leases: kept even when leased, with their remaining TTL.
RETAINED_KINDS = frozenset(
    {
        "sessions",
        "session-index",
        "session-rounds",
        "session-chunks",
        "goals",
        "goal-steps",
        "goal-events",
        "goal-order",
        "supervised",
        "supervised-stopped",
        "supervised-stopped-at",
    }
)
NOT_RESTORED = (
    "tokens were not restored: supervised agents get new tokens when they are started, "
    "and clients need new API tokens (mabeam auth create)"
)


class BackupError(ValueError):
    """The backup file or the target is not what restore needs; the message says why."""


async def dump(client: EtcdClient, prefix: str) -> dict[str, Any]:
    """The durable state under ``prefix`` as a backup document."""
    root = prefix.rstrip("/") + "/"
    kvs, revision = await snapshot(client, root.encode())
    keys: list[dict[str, Any]] = []
    counts: collections.Counter[str] = collections.Counter()
    ttls: dict[int, int] = {}  # lease -> remaining seconds (-1: gone), asked once per lease
    for kv in kvs:
        relative = bytes(kv.key)[len(root) :].decode()
        kind = relative.split("/", 1)[0]
        lease = int(kv.lease)
        if kind in SECRET_KINDS or (lease and kind not in RETAINED_KINDS):
            continue
        entry: dict[str, Any] = {"key": relative, "value": base64.b64encode(bytes(kv.value)).decode()}
        if lease:
            if lease not in ttls:
                ttls[lease] = int((await client.get_lease_info(lease, keys=False)).TTL)
            if ttls[lease] <= 0:
                continue  # expiring right now
            entry["ttl"] = ttls[lease]
        counts[kind] += 1
        keys.append(entry)
    return {
        "format": FORMAT,
        "version": VERSION,
        "prefix": prefix,
        "created_at": datetime.datetime.now(datetime.UTC)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z"),
        "revision": revision,
        "counts": dict(sorted(counts.items())),
        "left_out": sorted(SECRET_KINDS),
        "keys": keys,
    }


class Entry(NamedTuple):
    """One key of a backup: relative key, value, and the seconds it has left (None: kept for good)."""

    key: str
    value: bytes
    ttl: int | None = None


def check(doc: Any) -> list[Entry]:
    """The entries of a backup document (version 1 or 2); BackupError when it is not one."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BackupError('not a mabeam backup (no "format": "mabeam-backup")')
    if doc.get("version") not in READS:
        raise BackupError(
            f"backup version {doc.get('version')!r}; this mabeam reads versions {', '.join(map(str, READS))}"
        )
    entries = []
    for i, entry in enumerate(doc.get("keys", [])):
        try:
            key, value = str(entry["key"]), base64.b64decode(entry["value"], validate=True)
            ttl = entry.get("ttl")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise BackupError(f'keys[{i}] is not {{"key": ..., "value": <base64>}}') from None
        if not key or key.startswith("/"):
            raise BackupError(f"keys[{i}]: {key!r} is not a key relative to the prefix")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0):
            raise BackupError(f"keys[{i}]: ttl {ttl!r} is not a positive number of seconds")
        entries.append(Entry(key, value, ttl))
    return entries


async def load(client: EtcdClient, prefix: str, entries: list[Entry], force: bool = False) -> int:
    """Write ``entries`` under ``prefix``; refuses a prefix that holds data unless ``force``.

    Entries with a ``ttl`` go on a lease granted for it (one per distinct ttl), so they expire
    when they would have in the saved mesh. Secrets (:data:`SECRET_KINDS`) an older backup may
    hold are not written.
    """
    entries = [e for e in entries if e.key.split("/", 1)[0] not in SECRET_KINDS]
    root = prefix.rstrip("/") + "/"
    existing, _ = await snapshot(client, root.encode())
    if existing and not force:
        raise BackupError(
            f"{prefix} already holds {len(existing)} keys: restore into an empty mesh (or --force)"
        )
    leases: dict[int, int] = {}
    for ttl in sorted({e.ttl for e in entries if e.ttl is not None}):
        leases[ttl] = int((await client.lease(ttl)).id)
    for i in range(0, len(entries), TXN_OPS):
        ops = [
            client.transactions.put(
                (root + e.key).encode(), e.value, lease=leases[e.ttl] if e.ttl is not None else None
            )
            for e in entries[i : i + TXN_OPS]
        ]
        await client.transaction(compare=[], success=ops, failure=[])
    return len(entries)


def write_private(path: Path, text: str) -> None:
    """Write ``path`` as a file created with mode 0600 (a temporary one beside it, then renamed over)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def add_backup_parsers(sub: Any) -> None:
    """``mabeam backup`` and ``mabeam restore``."""
    for name, help_text in (
        ("backup", "write the mesh's durable state to FILE"),
        ("restore", "load FILE into an empty mesh"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("file", type=Path)
        p.add_argument(
            "--etcd",
            default=os.environ.get("MABEAM_ETCD", "http://127.0.0.1:2379"),
            help="etcd endpoints (env MABEAM_ETCD)",
        )
        p.add_argument(
            "--prefix", default=os.environ.get("MABEAM_PREFIX", "/mabeam"), help="the mesh's key prefix"
        )
        if name == "restore":
            p.add_argument("--force", action="store_true", help="write even if the prefix holds data")
        p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    async def run() -> int:
        client = await connect(args.etcd.split(","), timeout=10)
        try:
            if args.command == "backup":
                doc = await dump(client, args.prefix)
                write_private(args.file, json.dumps(doc, indent=1))
                print(f"backup of {args.prefix}: {len(doc['keys'])} keys {doc['counts']} -> {args.file}")
            else:
                pairs = check(json.loads(args.file.read_text()))
                written = await load(client, args.prefix, pairs, args.force)
                print(f"restored {written} keys into {args.prefix}")
                print(NOT_RESTORED)
        finally:
            await client.close()
        return 0

    try:
        return asyncio.run(run())
    except (BackupError, OSError, ValueError) as exc:
        print(f"mabeam {args.command}: {exc}", file=sys.stderr)
        return 2
