"""Which calls the SDK sends again to another replica: reads always, writes only if never sent.

A replica process is killed while it holds a call: a write must come back as
UNAVAILABLE and not be applied by the other replica behind the caller's back
(it may have been applied by the dead one), while a read is answered by the
live replica. A replica that refuses connections never saw the call: a write
goes to the live replica.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from harness.ports import closed_port
from harness.wait import eventually
from mabeam import errors
from mabeam.client import MeshClient
from mabeam.runtime import process
from mabeam.server import MeshServer
from mabeam.v1 import common_pb2, orchestrator_pb2

pytestmark = pytest.mark.timeout(60)

# A stand-in replica: every OrchestratorService call is held until the process dies.
HOLDING_REPLICA = r"""
import asyncio, sys
import grpc
from grpc import aio

async def hold(request, context):
    print("holding", flush=True)
    await asyncio.sleep(3600)

async def main():
    server = aio.server()
    handlers = {m: grpc.unary_unary_rpc_method_handler(hold) for m in ("SetVariable", "GetVariable")}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("mabeam.v1.OrchestratorService", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


async def cut_off_mid_way(live: str, call: Callable[[MeshClient], Awaitable[Any]]) -> Any:
    """``call`` through a client of [holding replica, ``live``]; the holder is killed while it holds it.

    Round robin starts with the first address, so the holding replica gets the call.
    """
    holder = process.spawn([sys.executable, "-c", HOLDING_REPLICA], stdout=subprocess.PIPE)
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


async def test_a_write_cut_off_mid_call_is_not_sent_again_but_a_read_is(
    service: Callable[..., Awaitable[MeshServer]],
) -> None:
    await service("registry")
    live = await service("orchestrator")
    async with await MeshClient.connect(orchestrator=live.address) as direct:
        await direct.orchestrator.SetVariable(orchestrator_pb2.SetVariableRequest(name="count", value=num(1)))

        async def write(client: MeshClient) -> orchestrator_pb2.SetVariableResponse:
            return await client.orchestrator.SetVariable(
                orchestrator_pb2.SetVariableRequest(name="count", value=num(2), expected_version=1)
            )

        with pytest.raises(errors.Unavailable):
            await cut_off_mid_way(live.address, write)
        # Not resent: the live replica never applied it.
        got = await direct.orchestrator.GetVariable(orchestrator_pb2.GetVariableRequest(name="count"))
        assert got.variable.version == 1 and got.variable.value.number_value == 1

        async def read(client: MeshClient) -> orchestrator_pb2.GetVariableResponse:
            return await client.orchestrator.GetVariable(orchestrator_pb2.GetVariableRequest(name="count"))

        reply = await cut_off_mid_way(live.address, read)
        assert reply.variable.value.number_value == 1


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
