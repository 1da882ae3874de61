"""A service replica's endpoint in etcd, for discovery: published under a lease.

Each replica puts ``<prefix>/services/<kind>/<instance_id>`` -> JSON
``{"address": ..., "instance_id": ..., "pid": ...}`` bound to a lease it keeps
alive; the key vanishes when the replica dies (within the TTL) or stops (at
once). Clients find the live ones with :class:`mabeam.discovery.EndpointResolver`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import stamina

from mabeam.discovery import endpoints_prefix
from mabeam.runtime.etcd import EtcdClient, LeaseKeeper
from mabeam.server import MeshServer

log = logging.getLogger("mabeam.runtime.endpoints")


class EndpointPublisher:
    """Keeps one replica's endpoint key alive; re-publishes after a lost lease.

    A lease is lost when etcd was unreachable for longer than the TTL (e.g. an
    etcd restart); the replica is still alive, so it grants a new lease and
    puts its key again, retrying with back-off until etcd answers.
    """

    def __init__(self, client: EtcdClient, key: bytes, value: bytes, ttl: int) -> None:
        self._client = client
        self._key = key
        self._value = value
        self._ttl = ttl
        self._keeper: LeaseKeeper | None = None
        self._stopped = False

    async def publish(self) -> None:
        """Grant a lease and put the key on it."""
        keeper = LeaseKeeper(self._client, self._ttl)
        await keeper.start()
        try:
            await self._client.put(self._key, self._value, lease=keeper.lease_id)
        except BaseException:
            await keeper.stop()
            raise
        self._keeper = keeper

    async def run(self) -> None:
        """Re-publish whenever the lease is lost, until withdrawn."""
        while not self._stopped:
            if self._keeper is not None:
                await self._keeper.wait_lost()
                if self._stopped:
                    return
                log.warning("endpoint lease of %s lost; publishing again", self._key.decode())
                with contextlib.suppress(Exception):
                    await self._keeper.stop()
                self._keeper = None
            async for attempt in stamina.retry_context(
                on=Exception, attempts=None, timeout=None, wait_initial=0.1, wait_max=2.0, wait_jitter=0.0
            ):
                with attempt:
                    await self._publish_again()

    async def _publish_again(self) -> None:
        if self._stopped:
            return  # withdrawn while waiting to retry
        try:
            await self.publish()
        except Exception as exc:
            log.info("publishing %s failed (%s); retrying", self._key.decode(), exc)
            raise

    async def withdraw(self) -> None:
        """Remove the key at once (revoke the lease); safe to call twice."""
        self._stopped = True
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            with contextlib.suppress(Exception):
                await keeper.revoke()
            with contextlib.suppress(Exception):
                await keeper.stop()


async def publish(server: MeshServer, client: EtcdClient) -> EndpointPublisher:
    """Publish ``server``'s address for discovery; withdrawn when it stops."""
    kind = server.kind
    key = endpoints_prefix(server.config.prefix, kind) + server.instance_id.encode()
    value = json.dumps(
        {
            "address": server.address,
            "instance_id": server.instance_id,
            "pid": os.getpid(),
            "started_at": time.time(),
            "tls": server.config.tls is not None,
        }
    ).encode()
    publisher = EndpointPublisher(client, key, value, server.config.service_ttl)
    await publisher.publish()
    server.spawn(publisher.run(), "endpoint-publisher")
    # Withdrawn before the grace period, not after it: clients stop picking this
    # replica while its calls in flight drain (MeshServer.stop).
    server.on_withdraw(publisher.withdraw)
    return publisher
