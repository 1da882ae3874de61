"""Registered protocols: a session driven by its plugin's ``ProtocolPluginService.Advance``, round by round."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format

from mabeam import errors
from mabeam.client import ChannelPool
from mabeam.services.coordination.engine import Session, struct
from mabeam.v1 import agent_pb2, coordination_pb2, protocol_plugin_pb2, protocol_plugin_pb2_grpc


async def run_plugin(
    pool: ChannelPool, session: Session, plugin: coordination_pb2.ProtocolInfo, params: dict[str, Any]
) -> coordination_pb2.Outcome:
    """Run a session of a registered protocol: the plugin says each round, the engine runs it, until an outcome."""
    stub = protocol_plugin_pb2_grpc.ProtocolPluginServiceStub(pool.get(plugin.endpoint))
    replies: list[protocol_plugin_pb2.PluginReply] = []
    state = None
    round_number = 0
    while True:
        request = protocol_plugin_pb2.AdvanceRequest(
            session_id=session.session_id,
            parameters=struct(params),
            participants=[a for a in session.proto.participants if a not in session.excluded_ids],
            round=round_number,
            replies=replies,
        )
        if state is not None:
            request.state.CopyFrom(state)
        if session.proto.HasField("context"):
            request.context.CopyFrom(session.proto.context)
        try:
            step = await stub.Advance(request, timeout=max(session.remaining(), 0.01))
        except grpc.RpcError as exc:
            raise errors.FailedPrecondition(
                f"protocol plugin at {plugin.endpoint} failed: {exc.details()}"
            ) from None
        if step.WhichOneof("next") == "outcome":
            return step.outcome
        if step.WhichOneof("next") != "round":
            raise errors.FailedPrecondition(
                f"protocol plugin at {plugin.endpoint} answered neither a round nor an outcome"
            )
        if session.remaining() <= 0:
            return coordination_pb2.Outcome(
                decided=False, reason=f"session deadline reached after {round_number} rounds"
            )
        state = step.round.state
        known = set(session.proto.participants)
        requests = []
        for req in step.round.requests:
            if req.agent_id in known and req.agent_id not in session.excluded_ids:
                copy = agent_pb2.CoordinationRequest()
                copy.CopyFrom(req)
                requests.append((req.agent_id, copy))
        announced = (
            json_format.MessageToDict(step.round.announced) if step.round.HasField("announced") else None
        )
        got = await session.round(requests, announced=announced)
        round_number = session.proto.round_count
        replies = []
        for r in got:
            reply = protocol_plugin_pb2.PluginReply(agent_id=r.agent_id)
            if r.response is not None and r.exclusion is None:
                reply.response.CopyFrom(r.response)
            if r.exclusion is not None:
                reply.exclusion.CopyFrom(r.exclusion)
            replies.append(reply)
