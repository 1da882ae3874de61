"""Client-side discovery: the live endpoints of a service, read from etcd.

Python gRPC has no pluggable name resolver, so discovery is client-side. Each
service replica publishes ``<prefix>/services/<kind>/<instance_id>`` -> JSON
``{"address": ..., "instance_id": ...}`` under a lease it keeps alive
(:mod:`mabeam.runtime.endpoints`): the key vanishes when the replica stops or
dies. :class:`EndpointResolver` lists those keys once, then follows a watch
from the next revision (listing again after any break), and
:class:`mabeam.client.Balancer` balances over the addresses it holds.

This is the one place the SDK talks to etcd, and only to read: etcd's client
stubs are imported when a resolver starts, so a program that passes explicit
addresses never loads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import stamina
from grpc import aio

from mabeam.etcd_target import open_channel
from mabeam.tls import TLS

log = logging.getLogger("mabeam.discovery")

# Ask etcd to end the watch when its member loses the leader (clientv3's
# WithRequireLeader): a watch on a partitioned member would go silent.
_REQUIRE_LEADER = (("hasleader", "true"),)
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
)
_LIST_TIMEOUT_S = 5.0


def endpoints_prefix(prefix: str, kind: str) -> bytes:
    """The etcd prefix under which replicas of ``kind`` publish themselves."""
    return f"{prefix.rstrip('/')}/services/{kind}/".encode()


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _decode_endpoint(value: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(value)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("address"), str) else None


class _WatchBroken(Exception):
    """The watch stream ended or etcd cancelled it: list again and follow anew."""


class EndpointResolver:
    """The live addresses of one service kind, fed by an etcd watch.

    Example::

        resolver = EndpointResolver(["http://127.0.0.1:2379"], "/mabeam", "registry")
        await resolver.start()
        resolver.addresses()  # ['127.0.0.1:50051', '127.0.0.1:50151']
        await resolver.stop()
    """

    def __init__(self, etcd: Sequence[str], prefix: str, kind: str, *, tls: TLS | None = None) -> None:
        if not etcd:
            raise ValueError("EndpointResolver needs etcd endpoints")
        self.kind = kind
        self._etcd = list(etcd)
        self._tls = tls
        self._prefix = endpoints_prefix(prefix, kind)
        self._endpoints: dict[bytes, dict[str, Any]] = {}
        self._revision = 0
        self._channel: aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """List the current endpoints (etcd must answer), then follow changes."""
        from aetcd import rpc  # etcd's stubs: loaded only by a program that discovers

        self._channel = await open_channel(self._etcd, self._tls, _CHANNEL_OPTIONS)
        self._kv = rpc.KVStub(self._channel)
        self._watch = rpc.WatchStub(self._channel)
        self._rpc = rpc
        try:
            await self._list()
        except BaseException:
            await self.stop()
            raise
        self._task = asyncio.create_task(self._follow(), name=f"discovery:{self.kind}")

    async def _list(self) -> None:
        reply = await self._kv.Range(
            self._rpc.RangeRequest(key=self._prefix, range_end=_prefix_end(self._prefix)),
            timeout=_LIST_TIMEOUT_S,
        )
        found = {}
        for kv in reply.kvs:
            doc = _decode_endpoint(kv.value)
            if doc is not None:
                found[bytes(kv.key)] = doc
        self._endpoints = found
        self._revision = reply.header.revision

    async def _requests(self, ended: asyncio.Event) -> AsyncIterator[Any]:
        create = self._rpc.WatchCreateRequest(
            key=self._prefix, range_end=_prefix_end(self._prefix), start_revision=self._revision + 1
        )
        yield self._rpc.WatchRequest(create_request=create)
        # Keep the request side open while the watch runs, and end with it: grpc's
        # task reading this iterator outlives a cancelled call otherwise (one per
        # broken watch, for good).
        await ended.wait()

    async def _watch_once(self) -> None:
        ended = asyncio.Event()
        call = self._watch.Watch(self._requests(ended), metadata=_REQUIRE_LEADER)
        try:
            async for reply in call:
                if reply.compact_revision or reply.canceled:
                    raise _WatchBroken(f"watch cancelled (compacted to {reply.compact_revision})")
                for event in reply.events:
                    key = bytes(event.kv.key)
                    doc = _decode_endpoint(event.kv.value) if event.type == 0 else None
                    if doc is None:
                        self._endpoints.pop(key, None)
                    else:
                        self._endpoints[key] = doc
                if reply.header.revision:
                    self._revision = max(self._revision, reply.header.revision)
        finally:
            ended.set()
            call.cancel()
        raise _WatchBroken("etcd ended the watch")

    async def _follow(self) -> None:
        broken = False
        async for attempt in stamina.retry_context(
            on=Exception, attempts=None, timeout=None, wait_initial=0.1, wait_max=2.0
        ):
            with attempt:
                if broken:
                    # Whatever happened while the watch was down is in a fresh list.
                    await self._list()
                broken = True
                await self._watch_once()

    def address_of(self, instance_id: str) -> str | None:
        """The address of one replica, by its instance id (None when it is not live)."""
        for doc in self._endpoints.values():
            if doc.get("instance_id") == instance_id:
                return str(doc["address"])
        return None

    def addresses(self) -> list[str]:
        """The live replicas' addresses, in instance order."""
        return [doc["address"] for _, doc in sorted(self._endpoints.items())]

    async def stop(self) -> None:
        """Stop following and close the channel; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(None)
