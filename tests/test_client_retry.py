"""Which calls the SDK sends again to another replica: reads, and writes that carry a request_id.

A replica process is killed while it holds a call. A read is answered by the
live replica. A write carries a request_id (the SDK sets one): sent again to
the live replica, it is applied once, whether the dead replica had applied it
(here it forwarded the write to the live one before holding it: the resend is
answered from the record) or not. A call without a request_id that may have
reached a server is not sent again (``retry_is_safe``). A replica that
refuses connections never saw the call: a write goes to the live replica.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from harness.ports import closed_port
from harness.wait import eventually
from mabeam.client import MeshClient, retry_is_safe
from mabeam.runtime import process
from mabeam.server import MeshServer
from mabeam.v1 import common_pb2, orchestrator_pb2

pytestmark = pytest.mark.timeout(60)

# A stand-in replica: every OrchestratorService call is held until the process dies; given
# a live replica's address, it first applies a SetVariable there (the write lands, the
# answer never comes).
HOLDING_REPLICA = r"""
import asyncio, os, sys
import grpc
from grpc import aio

APPLY_AT = sys.argv[1] if len(sys.argv) > 1 else ""

def holding(method):
    async def hold(request, context):
        if APPLY_AT and method == "SetVariable":
            async with aio.insecure_channel(APPLY_AT) as channel:
                token = (("authorization", "Bearer " + os.environ["MABEAM_TOKEN"]),)
                await channel.unary_unary("/mabeam.v1.OrchestratorService/SetVariable")(request, metadata=token)
        print("holding", flush=True)
        await asyncio.sleep(3600)
    return grpc.unary_unary_rpc_method_handler(hold)

async def main():
    server = aio.server()
    handlers = {m: holding(m) for m in ("SetVariable", "GetVariable")}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("mabeam.v1.OrchestratorService", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


async def cut_off_mid_way(
    live: str, call: Callable[[MeshClient], Awaitable[Any]], *, applied: bool = False
) -> Any:
    """``call`` through a client of [holding replica, ``live``]; the holder is killed while it holds it
    (``applied``: after applying a SetVariable at ``live``).

    Round robin starts with the first address, so the holding replica gets the call.
    """
    argv = [sys.executable, "-c", HOLDING_REPLICA, *([live] if applied else [])]
    holder = process.spawn(argv, stdout=subprocess.PIPE)
    assert holder.stdout is not None
    try:
        port = int(await asyncio.to_thread(holder.stdout.readline))
        client = await MeshClient.connect(orchestrator=[f"127.0.0.1:{port}", live])
        try:
            pending = asyncio.ensure_future(call(client))
            assert (await asyncio.to_thread(holder.stdout.readline)).strip() == b"holding"
            holder.send_signal(signal.SIGKILL)
            return await asyncio.wait_for(pending, 20)
        finally:
            await client.close()
    finally:
        await process.terminate(holder, 1)
        holder.stdout.close()


def num(x: float) -> common_pb2.Value:
    return common_pb2.Value(number_value=x)


async def test_a_write_cut_off_mid_call_is_sent_again_and_applied_once_and_a_read_is_too(
    service: Callable[..., Awaitable[MeshServer]],
) -> None:
    await service("registry")
    live = await service("orchestrator")
    async with await MeshClient.connect(orchestrator=live.address) as direct:
        await direct.orchestrator.SetVariable(orchestrator_pb2.SetVariableRequest(name="count", value=num(1)))

        def increment(
            expected: int,
        ) -> Callable[[MeshClient], Awaitable[orchestrator_pb2.SetVariableResponse]]:
            async def write(client: MeshClient) -> orchestrator_pb2.SetVariableResponse:
                return await client.orchestrator.SetVariable(
                    orchestrator_pb2.SetVariableRequest(
                        name="count", value=num(expected + 1), expected_version=expected
                    )
                )

            return write

        # The dying replica never applied it: the live one does, once.
        reply = await cut_off_mid_way(live.address, increment(1))
        assert reply.variable.version == 2 and reply.variable.value.number_value == 2
        # The dying replica applied it: the live one answers from the record (a blind resend
        # would be ABORTED, the version having moved), and applies nothing.
        reply = await cut_off_mid_way(live.address, increment(2), applied=True)
        assert reply.variable.version == 3 and reply.variable.value.number_value == 3
        got = await direct.orchestrator.GetVariable(orchestrator_pb2.GetVariableRequest(name="count"))
        assert got.variable.version == 3 and got.variable.mod_revision == reply.variable.mod_revision

        async def read(client: MeshClient) -> orchestrator_pb2.GetVariableResponse:
            return await client.orchestrator.GetVariable(orchestrator_pb2.GetVariableRequest(name="count"))

        reply = await cut_off_mid_way(live.address, read)
        assert reply.variable.value.number_value == 3


def test_a_call_without_request_id_cut_off_mid_way_is_not_sent_again() -> None:
    class CutOff(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "Socket closed"

    assert not retry_is_safe("Coordinate", CutOff())  # may have been applied: the caller decides
    assert retry_is_safe("Coordinate", CutOff(), request_id=True)
    assert retry_is_safe("GetAgent", CutOff())


async def test_a_write_to_a_replica_that_refuses_connections_goes_to_another(
    service: Callable[..., Awaitable[MeshServer]],
) -> None:
    await service("registry")
    live = await service("orchestrator")
    refused = f"127.0.0.1:{closed_port()}"  # nothing listens there
    async with await MeshClient.connect(orchestrator=[refused, live.address]) as client:
        for i in range(4):  # round robin: half of them go to the refusing address first
            reply = await client.orchestrator.SetVariable(
                orchestrator_pb2.SetVariableRequest(name="n", value=num(i))
            )
            assert reply.variable.value.number_value == i

        async def version() -> int:
            got = await client.orchestrator.GetVariable(orchestrator_pb2.GetVariableRequest(name="n"))
            return int(got.variable.version)

        assert await eventually(version) == 4  # each write applied once
