"""mabeam: a multi-agent coordination mesh.

The SDK: clients (:mod:`mabeam.client`), the agent base class
(:mod:`mabeam.agent`), generated contracts (:mod:`mabeam.v1`), and the pieces
every service shares (server bootstrap, etcd primitives, configuration).
"""

import os as _os

# The mesh starts child processes (etcd, services, supervised agents) from
# processes that already run gRPC threads; grpc's fork handlers only log noise
# there, and the children exec at once.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
