"""Stored sessions stay within etcd's request limits, and lists read one bounded page.

The coordination store cuts a round's transcript into chunks and writes them
in transactions of bounded operations and bytes (checked by counting every
transaction, and against an etcd started with tight ``--max-txn-ops`` /
``--max-request-bytes``); ListSessions reads a page of its time-ordered index,
not the whole prefix; a sealed-bid auction among 10,000 agents is stored and
read back whole.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from harness.mesh_fixtures import enrolled
from harness.wait import eventually
from mabeam import errors
from mabeam.client import MeshClient, list_all
from mabeam.config import MeshConfig
from mabeam.runtime import process
from mabeam.runtime.embedded_etcd import EmbeddedEtcd
from mabeam.runtime.etcd import EtcdClient, connect
from mabeam.server import MeshServer
from mabeam.services.coordination.store import SessionStore, split_round
from mabeam.v1 import common_pb2, coordination_pb2
from mabeam.v1.registry_pb2 import ListAgentsRequest

HOST_SCRIPT = str(Path(__file__).resolve().parent / "harness" / "load_host.py")


def transcript(agents: int, number: int = 1) -> coordination_pb2.Round:
    """A sealed-bid round as the engine records it: one request, bid and latency per agent."""
    record = coordination_pb2.Round(number=number)
    record.state.update({"item": "slot", "price": 3.5})
    record.started_at.GetCurrentTime()
    for n in range(agents):
        entry = record.entries.add(agent_id=f"agent-{n:05d}")
        entry.request.session_id = "s"
        entry.request.agent_id = entry.agent_id
        entry.request.protocol = "first_price"
        entry.request.round = number
        entry.request.bid_request.item = "slot"
        entry.response.agent_id = entry.agent_id
        entry.response.bid.amount = float(n % 1009)
        entry.latency.nanos = 1_000_000 + n
    record.finished_at.GetCurrentTime()
    return record


def spawn_host(registry: str, agents: int, log: Path) -> subprocess.Popen[bytes]:
    """``agents`` light bidders (capability ``load``) on one AgentHost process with 60 s leases."""
    argv = [sys.executable, HOST_SCRIPT, "--registry", registry, "--count", str(agents)]
    with open(log, "wb") as err:
        return process.spawn(
            [*argv, "--prefix", "big-", "--groups", "1", "--lease-ttl", "60"],
            env={**os.environ, "MABEAM_LOG_LEVEL": "WARNING"},
            stdout=subprocess.PIPE,
            stderr=err,
        )


def summary(session_id: str, protocol: str, started_ns: int) -> coordination_pb2.Session:
    session = coordination_pb2.Session(
        session_id=session_id, protocol=protocol, state=coordination_pb2.SESSION_STATE_DECIDED
    )
    session.started_at.FromNanoseconds(started_ns)
    return session


class Counted(SessionStore):
    """A store that records every transaction it sends: (operations, bytes of keys and values)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.txns: list[tuple[int, int]] = []
        self.ranges: list[int] = []  # the limit of each range read
        self.fail_final = False

    async def _txn_puts(
        self, puts: Sequence[tuple[bytes, bytes]], lease: int | None = None, guard: Sequence[Any] = ()
    ) -> bool:
        self.txns.append((len(puts), sum(len(k) + len(v) for k, v in puts)))
        if self.fail_final and any(k.endswith(b"~end") for k, _ in puts):
            raise errors.Unavailable("etcd went away before the session's record")
        return await super()._txn_puts(puts, lease, guard)

    async def _range(self, start: bytes, end: bytes, limit: int = 0, **kw: Any) -> Any:
        self.ranges.append(limit)
        return await super()._range(start, end, limit, **kw)


async def keys_under(client: EtcdClient, prefix: bytes) -> list[bytes]:
    return [kv.key for kv in await client.get_prefix(prefix)]


def test_split_round_cuts_between_entries_and_concatenates_back() -> None:
    record = transcript(500)
    data = record.SerializeToString()
    pieces = split_round(data, 4096)
    assert len(pieces) > 5 and b"".join(pieces) == data
    assert all(len(p) <= 4096 for p in pieces)
    assert all(coordination_pb2.Round.FromString(p) for p in pieces)  # each piece parses on its own
    assert coordination_pb2.Round.FromString(b"".join(pieces)) == record
    # An entry larger than the budget is a piece of its own.
    big = coordination_pb2.Round(number=1)
    big.entries.add(agent_id="x" * 10_000)
    big.entries.add(agent_id="y")
    sizes = [len(p) for p in split_round(big.SerializeToString(), 1000)]
    assert len(sizes) == 3 and sizes[1] > 10_000 and sizes[0] + sizes[2] < 1000  # number | x... | y


async def test_a_large_transcript_is_written_in_bounded_transactions_and_read_whole(
    etcd_client: EtcdClient, key_prefix: bytes
) -> None:
    config = MeshConfig(prefix=key_prefix.decode().rstrip("/"))
    store = Counted(etcd_client, config, txn_max_ops=8, txn_max_bytes=64 * 1024, chunk_bytes=16 * 1024)
    session = summary("big", "first_price", time.time_ns())
    record = transcript(3000)
    size = record.ByteSize()
    await store.finish(session, [record])
    assert size > 8 * 64 * 1024 / 2, size  # more than fits one bounded transaction several times over
    assert len(store.txns) > 3
    assert all(ops <= 8 and nbytes <= 64 * 1024 for ops, nbytes in store.txns), store.txns
    got = await store.get("big", full=True)
    assert got is not None and got.state == coordination_pb2.SESSION_STATE_DECIDED
    assert list(got.rounds) == [record]
    # Past what one answer carries (48 MiB; here 100 KB): refused, pointing at WatchSession.
    with pytest.raises(errors.FailedPrecondition, match="WatchSession"):
        await store.get_rounds("big", [100_000])
    # A one-shot session that fits one transaction is one transaction, as before.
    store.txns.clear()
    await store.finish(summary("small", "first_price", time.time_ns()), [transcript(20)])
    assert len(store.txns) == 1


async def test_a_write_that_fails_after_its_chunks_leaves_no_chunks_and_no_transcript(
    etcd_client: EtcdClient, key_prefix: bytes
) -> None:
    config = MeshConfig(prefix=key_prefix.decode().rstrip("/"))
    store = Counted(etcd_client, config, txn_max_ops=4, txn_max_bytes=32 * 1024, chunk_bytes=8 * 1024)
    store.fail_final = True
    with pytest.raises(errors.Unavailable):
        await store.finish(summary("lost", "first_price", time.time_ns()), [transcript(1000)])
    assert len(store.txns) > 2  # chunks were written before the record failed

    async def no_chunks() -> bool:
        return not await keys_under(etcd_client, store.chunks_prefix("lost"))

    # Deleted in the background by the failed write.
    await eventually(no_chunks, timeout=5, interval=0.02, what="unreferenced chunks deleted")
    assert await store.get("lost", full=True) is None


async def test_chunked_writes_pass_an_etcd_with_tight_request_limits(tmp_path: Path) -> None:
    """etcd itself refuses over 16 operations or 64 KiB per request: the chunked writes pass."""
    server = EmbeddedEtcd(
        unsafe_no_fsync=True,
        data_dir=tmp_path / "etcd",
        extra_args=["--max-txn-ops=16", "--max-request-bytes=65536"],
    )
    await server.start()
    client = await connect([server.endpoint], timeout=10)
    try:
        config = MeshConfig(prefix="/tight")
        loose = SessionStore(client, config, txn_max_ops=1000, txn_max_bytes=1 << 30, chunk_bytes=1 << 30)
        record = transcript(2000)
        with pytest.raises(Exception, match="request is too large"):  # all in one request: refused
            await loose.finish(summary("one-txn", "first_price", time.time_ns()), [record])
        # Small chunks: the operations per transaction are what binds (16 of ~2 KiB < 48 KiB).
        store = SessionStore(client, config, txn_max_ops=16, txn_max_bytes=48 * 1024, chunk_bytes=2 * 1024)
        await store.finish(summary("chunked", "first_price", time.time_ns()), [record])
        for n in range(2, 4):  # an iterative session: round by round, then its record
            await store.put_round("chunked-rounds", transcript(2000, n))
        await store.finish(summary("chunked-rounds", "english", time.time_ns()), [])
        got = await store.get("chunked", full=True)
        assert got is not None and list(got.rounds) == [record]
        rounds, finished, _ = await store.rounds_so_far("chunked-rounds")
        assert finished and [r.number for r in rounds] == [2, 3] and len(rounds[1].entries) == 2000
        chunks = await keys_under(client, store.chunks_prefix("chunked"))
        assert len(chunks) > 4 * 16, len(chunks)  # more than four transactions' worth of operations
        # A page of 40 summaries is read in transactions of at most 16 reads.
        base = time.time_ns()
        for n in range(40):
            await store.finish(summary(f"many-{n:02d}", "consensus", base + n * 1000), [])
        page, following = await store.list_page(size=40, after=None, protocol="consensus")
        assert [s.session_id for s in page] == [f"many-{n:02d}" for n in range(39, -1, -1)]
        assert following is None
    finally:
        await client.close()
        await server.stop()
        server.cleanup()


async def test_list_sessions_reads_one_page_and_a_filter_examines_a_bounded_number_of_keys(
    etcd_client: EtcdClient, key_prefix: bytes
) -> None:
    config = MeshConfig(prefix=key_prefix.decode().rstrip("/"))
    store = Counted(etcd_client, config, list_max_examined=6)
    base = time.time_ns()
    # 30 sessions, one a millisecond; every fifth is a vote.
    for n in range(30):
        protocol = "consensus" if n % 5 == 0 else "first_price"
        await store.finish(summary(f"s{n:02d}", protocol, base + n * 1_000_000), [])
    store.ranges.clear()
    page, following = await store.list_page(size=4, after=None)
    assert [s.session_id for s in page] == ["s29", "s28", "s27", "s26"]  # newest first
    assert store.ranges == [5] and following is not None  # one range read of page_size + 1
    page, following = await store.list_page(size=4, after=following)
    assert [s.session_id for s in page] == ["s25", "s24", "s23", "s22"]
    # Time filters are the key range: started in [s10, s20).
    page, following = await store.list_page(
        size=100, after=None, started_after_ns=base + 10_000_000, started_before_ns=base + 20_000_000
    )
    assert [s.session_id for s in page] == [f"s{n:02d}" for n in range(19, 9, -1)] and following is None
    # A protocol filter examines at most 6 keys a call: short pages, and every match once.
    seen: list[str] = []
    after: str | None = None
    calls = 0
    while True:
        store.ranges.clear()
        page, after = await store.list_page(size=3, after=after, protocol="consensus")
        calls += 1
        assert sum(store.ranges) <= 6, store.ranges
        seen += [s.session_id for s in page]
        if after is None:
            break
    assert seen == ["s25", "s20", "s15", "s10", "s05", "s00"] and calls >= 5


async def test_a_participant_filter_reads_a_bounded_number_of_summaries(
    etcd_client: EtcdClient, key_prefix: bytes
) -> None:
    """An agent's history: sessions it took part in (or was excluded from), at most
    ``participant_max_examined`` summaries read a call; short pages, every match once."""
    config = MeshConfig(prefix=key_prefix.decode().rstrip("/"))
    store = Counted(etcd_client, config, participant_max_examined=5)
    base = time.time_ns()
    for n in range(20):  # a7 takes part in every fourth, and is excluded from s10
        session = summary(f"s{n:02d}", "first_price", base + n * 1_000_000)
        session.participants.extend(["a1", "a7"] if n % 4 == 0 else ["a1", "a2"])
        if n == 10:
            session.excluded.add(agent_id="a7", reason=coordination_pb2.EXCLUSION_REASON_TIMEOUT)
        await store.finish(session, [])
    seen: list[str] = []
    after: str | None = None
    while True:
        store.ranges.clear()
        page, after = await store.list_page(size=2, after=after, participant="a7")
        assert sum(store.ranges) <= 5, store.ranges  # index keys read, hence summaries read
        seen += [s.session_id for s in page]
        if after is None:
            break
    assert seen == ["s16", "s12", "s10", "s08", "s04", "s00"]


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_sealed_bid_auction_among_ten_thousand_agents_is_stored_and_readable(
    mesh_config: MeshConfig,
    service: Callable[..., Awaitable[MeshServer]],
    etcd_client: EtcdClient,
    tmp_path: Path,
) -> None:
    agents = 10_000
    config = await enrolled(mesh_config)
    registry = await service("registry", config)
    coordination = await service("coordination", config)
    log = tmp_path / "host.log"
    host = spawn_host(f"127.0.0.1:{registry.port}", agents, log)
    client = await MeshClient.connect(
        registry=f"127.0.0.1:{registry.port}", coordination=f"127.0.0.1:{coordination.port}"
    )
    try:
        assert host.stdout is not None
        started = time.monotonic()
        line = (await asyncio.to_thread(host.stdout.readline)).decode(errors="replace")
        assert line.startswith("agents ready on "), log.read_text(errors="replace")[-2000:]
        # The registry's lookups are fed by a watch: wait until they list every agent.
        request_all = ListAgentsRequest(capability="load")

        async def all_listed() -> bool:
            return len(await list_all(client.registry.ListAgents, request_all, "agents")) >= agents

        await eventually(all_listed, timeout=60, interval=0.2, what=f"the registry lists all {agents} agents")
        registered = time.monotonic() - started
        request = coordination_pb2.RunAuctionRequest(
            settings=coordination_pb2.SessionSettings(
                participants=common_pb2.AgentSelector(capability="load"),
                view=coordination_pb2.SESSION_VIEW_BASIC,
            ),
            type=coordination_pb2.AUCTION_TYPE_FIRST_PRICE,
            item="slot",
        )
        request.settings.round_timeout.FromSeconds(20)
        request.settings.deadline.FromSeconds(60)
        started = time.monotonic()
        ran = (await client.coordination.RunAuction(request)).session
        auction = time.monotonic() - started
        assert ran.state == coordination_pb2.SESSION_STATE_DECIDED, ran.outcome.reason
        assert len(ran.participants) == agents and not ran.excluded and not ran.rounds
        started = time.monotonic()
        got = (
            await client.coordination.GetSession(
                coordination_pb2.GetSessionRequest(
                    session_id=ran.session_id, view=coordination_pb2.SESSION_VIEW_FULL
                )
            )
        ).session
        read = time.monotonic() - started
        # Agent n bids (n * 7919) % 1009: the best bid is 1008 (several agents bid it; one wins).
        assert got.outcome == ran.outcome and got.outcome.price == 1008 and len(got.outcome.winners) == 1
        assert got.round_count == 1 and len(got.rounds) == 1
        entries = got.rounds[0].entries
        assert len(entries) == agents and {e.agent_id for e in entries} == set(ran.participants)
        assert all(e.response.WhichOneof("answer") == "bid" for e in entries)
        # More than one etcd request holds: the transcript was stored in chunks.
        chunks = await keys_under(etcd_client, config.key("session-chunks", ran.session_id) + b"/")
        stored = got.rounds[0].ByteSize()
        print(
            f"\n10,000 agents: registered in {registered:.1f} s, auction {auction:.2f} s, "
            f"GetSession FULL {read:.2f} s; round {stored / 1e6:.2f} MB in {len(chunks)} chunks"
        )
        assert stored > 1024 * 1024 and len(chunks) >= 3
        listed = await client.coordination.ListSessions(coordination_pb2.ListSessionsRequest(page_size=1))
        assert [s.session_id for s in listed.sessions] == [ran.session_id] and not listed.sessions[0].rounds
    finally:
        await client.close()
        if host.poll() is None:
            host.terminate()
        await asyncio.to_thread(host.communicate)
        await process.terminate(host, 15)


async def test_sessions_stored_before_the_index_and_chunks_are_listed_and_read(
    etcd_client: EtcdClient, key_prefix: bytes
) -> None:
    """The old layout (no index key, a round stored whole) after one backfill: listed, read whole."""
    config = MeshConfig(prefix=key_prefix.decode().rstrip("/"))
    store = SessionStore(etcd_client, config)
    old = summary("old", "vickrey", time.time_ns() - 1_000_000)
    record = transcript(50)
    await etcd_client.put(store.session_key("old"), old.SerializeToString())
    await etcd_client.put(store.round_key("old", 1), record.SerializeToString())
    await etcd_client.put(store.rounds_prefix("old") + b"~end", b"")
    await store.finish(summary("new", "vickrey", time.time_ns()), [transcript(5)])
    page, _ = await store.list_page(size=10, after=None)
    assert [s.session_id for s in page] == ["new"]
    assert await store.backfill_index() == 2 and await store.backfill_index() == 0  # once per mesh
    page, _ = await store.list_page(size=10, after=None, protocol="vickrey")
    assert [s.session_id for s in page] == ["new", "old"]
    got = await store.get("old", full=True)
    assert got is not None and list(got.rounds) == [record]
