"""The etcd keyspace of topic subscriptions (MessagingService; under the mesh prefix P).

==============================  ==============================================  =====================
key                             value                                           lease
==============================  ==============================================  =====================
P/subscriptions/<topic>/<id>    empty: agent <id> is subscribed to the topic    the agent's
                                                                                registration lease
P/subscribed/<id>/<topic>       empty: the same subscription, indexed by agent  the agent's
                                                                                registration lease
P/send-picks/<sender>/<msg>     the agent a capability Send of that message     an expiry lease of
                                went to (a resend goes there again)             PICK_MEMORY_S (120 s)
==============================  ==============================================  =====================

The lease is read from the registry's ``P/agents/<id>`` key
(:mod:`mabeam.services.registry.store`), so a subscription vanishes with the
registration it was made on. Each write is one transaction of two puts (or
two deletes) and one compare; reads are single ranges (the subscribers of a
topic: at most the per-topic cap, keys only) or one page of
:func:`mabeam.runtime.paging.scan`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.utils

from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient
from mabeam.runtime.etcd.leases import LeaseNotFound, raise_if_lease_unknown
from mabeam.runtime.paging import range_reply, scan
from mabeam.runtime.retention import ExpiryLeases, Retention

PICK_MEMORY_S = 120  # how long the agent a capability Send picked is remembered


class SubscriptionStore:
    """Topic subscriptions, each under two keys (by topic, by agent) on the agent's registration lease.

    The lease is read from the registry's ``P/agents/<id>`` key and the keys
    are put in one transaction that checks that key is unchanged, so a
    subscription never outlives the registration it was made on: etcd
    deletes it with the agent's lease (lapsed or revoked at deregistration).
    """

    def __init__(self, client: EtcdClient, config: MeshConfig) -> None:
        self.client = client
        self.agents = config.key("agents") + b"/"
        self.by_topic = config.key("subscriptions") + b"/"
        self.by_agent = config.key("subscribed") + b"/"
        self.picks = config.key("send-picks") + b"/"
        # Kept PICK_MEMORY_S (and at most a bucket more): longer than the SDK resends a message.
        self.pick_leases = ExpiryLeases(client, Retention("send-pick", PICK_MEMORY_S, PICK_MEMORY_S // 10))

    def topic_key(self, topic: str, agent_id: str) -> bytes:
        return self.by_topic + f"{topic}/{agent_id}".encode()

    def agent_key(self, agent_id: str, topic: str) -> bytes:
        return self.by_agent + f"{agent_id}/{topic}".encode()

    async def _range(self, start: bytes, *, count_only: bool = False, limit: int = 0) -> Any:
        """The keys under the prefix ``start`` (``limit`` 0: all), or only their count."""
        return await range_reply(
            self.client,
            start,
            aetcd.utils.prefix_range_end(start),
            limit,
            count_only=count_only,
            keys_only=True,
        )

    async def subscribe(self, agent_id: str, topic: str, *, max_per_agent: int, max_per_topic: int) -> str:
        """Subscribe; answers "ok", or why not: "not registered", "no lease", "agent full", "topic full".

        A new subscription must stay within the caps (two count-only ranges);
        subscribing again only puts the keys again (on the current lease).
        """
        c = self.client
        for _ in range(3):  # the registration changed between the read and the write: read again
            got = await c.get(self.agents + agent_id.encode())
            if got is None:
                return "not registered"
            lease = int(got.lease)
            if not lease:
                return "no lease"
            new = await c.get(self.topic_key(topic, agent_id)) is None
            if new:
                full = await self._full(agent_id, topic, max_per_agent, max_per_topic, 0)
                if full:
                    return full
            ok, _ = await c.transaction(
                compare=[c.transactions.mod(self.agents + agent_id.encode()) == int(got.mod_revision)],
                success=[
                    c.transactions.put(self.topic_key(topic, agent_id), b"", lease=lease),
                    c.transactions.put(self.agent_key(agent_id, topic), b"", lease=lease),
                ],
                failure=[],
            )
            if ok:
                # Counted again once written: Subscribes at once may all have passed the first
                # count. Over a cap, this one is undone (and said so): the caps never overflow.
                full = await self._full(agent_id, topic, max_per_agent, max_per_topic, 1) if new else ""
                if full:
                    await self.unsubscribe(agent_id, topic)
                    return full
                return "ok"
        return "not registered"

    async def _full(self, agent_id: str, topic: str, per_agent: int, per_topic: int, mine: int) -> str:
        """ "agent full" or "topic full" when the counts (``mine``: this subscription among them)
        leave no room for it; else ""."""
        have = await self._range(self.by_agent + f"{agent_id}/".encode(), count_only=True)
        if int(have.count) - mine >= per_agent:
            return "agent full"
        theirs = await self._range(self.by_topic + f"{topic}/".encode(), count_only=True)
        if int(theirs.count) - mine >= per_topic:
            return "topic full"
        return ""

    async def pick_once(self, sender_id: str, message_id: str, agent_id: str) -> str:
        """The agent a capability Send of ``(sender_id, message_id)`` goes to: ``agent_id``, recorded
        now (create-only, for PICK_MEMORY_S), unless an earlier attempt of the same message recorded
        another — a resend then reaches the agent that may have it already, whose dedupe drops it."""
        c = self.client
        key = self.picks + f"{sender_id}/{message_id}".encode()
        for attempt in range(2):
            lease = await self.pick_leases.lease()
            try:
                ok, replies = await c.transaction(
                    compare=[c.transactions.create(key) == 0],
                    success=[c.transactions.put(key, agent_id.encode(), lease=lease)],
                    failure=[c.transactions.get(key)],
                )
            except aetcd.exceptions.ClientError as exc:
                try:
                    raise_if_lease_unknown(exc, lease)
                except LeaseNotFound:
                    if attempt:
                        raise
                    self.pick_leases.forget()
                    continue
                raise
            if ok:
                return agent_id
            got = replies[0] if replies else []
            return bytes(got[0][0]).decode() if got else agent_id
        return agent_id

    async def repick(self, sender_id: str, message_id: str, agent_id: str) -> None:
        """Record ``agent_id`` for the message in place of an agent that is gone."""
        lease = await self.pick_leases.lease()
        await self.client.put(
            self.picks + f"{sender_id}/{message_id}".encode(), agent_id.encode(), lease=lease
        )

    async def unsubscribe(self, agent_id: str, topic: str) -> bool:
        """Delete both keys of a subscription (one transaction); False when there was none."""
        c = self.client
        key = self.topic_key(topic, agent_id)
        ok, _ = await c.transaction(
            compare=[c.transactions.create(key) > 0],
            success=[c.transactions.delete(key), c.transactions.delete(self.agent_key(agent_id, topic))],
            failure=[c.transactions.delete(self.agent_key(agent_id, topic))],
        )
        return bool(ok)

    async def subscribers(self, topic: str, limit: int) -> list[str]:
        """The agent ids subscribed to ``topic`` (at most ``limit``; one keys-only range)."""
        prefix = self.by_topic + f"{topic}/".encode()
        reply = await self._range(prefix, limit=limit)
        return [bytes(kv.key[len(prefix) :]).decode() for kv in reply.kvs]

    async def list_page(
        self, topic: str, agent_id: str, after: str | None, size: int
    ) -> tuple[list[tuple[str, str]], str | None]:
        """One page of (topic, agent_id), by topic then agent; and the position the next page
        starts after (None: the last page). By agent alone, the agent's index is read."""
        if agent_id and not topic:
            kvs, following = await scan(self.client, self.by_agent, after, size, narrow=f"{agent_id}/")
            pairs = [bytes(kv.key[len(self.by_agent) :]).decode().split("/", 1) for kv in kvs]
            return [(t, a) for a, t in pairs], following
        exact = self.topic_key(topic, agent_id) if agent_id else b""
        keep: Callable[[Any], bool] | None = (lambda kv: bytes(kv.key) == exact) if agent_id else None
        kvs, following = await scan(
            self.client, self.by_topic, after, size, narrow=f"{topic}/" if topic else "", keep=keep
        )
        pairs = [bytes(kv.key[len(self.by_topic) :]).decode().split("/", 1) for kv in kvs]
        return [(t, a) for t, a in pairs], following
