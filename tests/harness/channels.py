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
