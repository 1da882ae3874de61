"""Raw channels for tests that call a service's stub directly, presenting the test's token."""

from __future__ import annotations

import os
from typing import Any

from grpc import aio

from mabeam import auth


def mesh_channel(address: str, **kwargs: Any) -> aio.Channel:
    """``aio.insecure_channel(address)`` whose calls carry ``$MABEAM_TOKEN`` (the test mesh's admin token)."""
    return aio.insecure_channel(
        address, interceptors=auth.client_interceptors(os.environ.get(auth.TOKEN_ENV)), **kwargs
    )


# The test mesh's service token (set by the mesh_config fixture).
SERVICE_TOKEN_ENV = "MABEAM_TEST_SERVICE_TOKEN"


def agent_channel(address: str, **kwargs: Any) -> aio.Channel:
    """A channel to an agent whose calls carry the credential the services present to agents.

    That is the agent-call token derived from the test mesh's service token
    (:func:`mabeam.auth.agent_call_token`). Agents serve AgentService only to
    the mesh (docs/decisions.md, "Agents accept only the mesh"): an admin
    token, or the service token itself, is refused there.
    """
    service_token = os.environ.get(SERVICE_TOKEN_ENV)
    token = auth.agent_call_token(service_token) if service_token else None
    return aio.insecure_channel(address, interceptors=auth.client_interceptors(token), **kwargs)
