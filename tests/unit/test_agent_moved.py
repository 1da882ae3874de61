"""AgentMoved's input is checked up front: a host:port of bounded length."""

from __future__ import annotations

import pytest

from mabeam import errors
from mabeam._agent_service import MAX_ENDPOINT
from mabeam.agent import Agent, AgentHost
from mabeam.v1 import agent_pb2


@pytest.mark.parametrize("endpoint", ["", "no-port", "h" * MAX_ENDPOINT + ":1"])
async def test_a_bad_new_endpoint_is_invalid_argument_naming_the_limit(endpoint: str) -> None:
    host = AgentHost([Agent("a1")], registry="127.0.0.1:1")
    request = agent_pb2.AgentMovedRequest(agent_id="a1", new_endpoint=endpoint)
    with pytest.raises(errors.InvalidArgument) as info:
        await host.servicer.AgentMoved(request, None)
    assert info.value.field == "new_endpoint" and str(MAX_ENDPOINT) in info.value.message
