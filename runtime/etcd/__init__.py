"""The etcd layer of the mesh: the client, and the three primitives aetcd lacks.

One module per job, all re-exported here (``from mabeam.runtime.etcd import X``):

* :mod:`.client` — :func:`connect` / :class:`EtcdClient`: aetcd's client over
  several endpoints (one member at a time; a dead or stuck one is given up
  for the next, see :mod:`.members`) and TLS; :data:`UNREACHABLE` and
  :func:`to_mabeam_error`. Its docstring says how etcd's failures surface.
* :mod:`.leases` — :class:`LeaseKeeper`: a lease kept alive by a background
  task; it says when the lease is lost instead of silently granting another
  (the owner decides what to redo). :class:`KeepAliveStream`: many leases
  refreshed over a few shared streams.
* :mod:`.watch` — :class:`ResumingWatch`: a prefix watch that survives
  connection loss and etcd restarts, resuming from the last revision seen + 1,
  so no event is missed or repeated; a compacted revision raises
  :class:`WatchCompacted`. :func:`snapshot` and :func:`snapshot_and_watch` are
  the list-then-watch pattern of every watch-fed cache.
* :mod:`.election` — :class:`Election`, :func:`while_leading`,
  :func:`try_acquire` and :func:`release`: leadership by lease + lowest create
  revision, and exclusive ownership of a key bound to a lease.

* :mod:`.maintenance` — :class:`AlarmWatch` (etcd's NOSPACE alarm, followed by
  every service replica) and the upkeep behind ``mabeam maintenance``.

The modules depend on each other in that order only (election on leases and
watch, both on client; client and leases on :mod:`.members`, which depends on
none of them).
"""

from mabeam.etcd_target import grpc_target
from mabeam.runtime.etcd.client import UNREACHABLE, ClientClosedError, EtcdClient, connect, to_mabeam_error
from mabeam.runtime.etcd.election import Election, ElectionLost, release, try_acquire

# The services import while_leading from here, though it never was in __all__:
# re-exported explicitly (the redundant alias), __all__ kept as it was.
from mabeam.runtime.etcd.election import while_leading as while_leading
from mabeam.runtime.etcd.leases import KeepAliveStream, LeaseKeeper
from mabeam.runtime.etcd.maintenance import AlarmWatch as AlarmWatch
from mabeam.runtime.etcd.watch import ResumingWatch, WatchCompacted, WatchEvent, snapshot, snapshot_and_watch

__all__ = [
    "UNREACHABLE",
    "ClientClosedError",
    "Election",
    "ElectionLost",
    "EtcdClient",
    "KeepAliveStream",
    "LeaseKeeper",
    "ResumingWatch",
    "WatchCompacted",
    "WatchEvent",
    "connect",
    "grpc_target",
    "release",
    "snapshot",
    "snapshot_and_watch",
    "to_mabeam_error",
    "try_acquire",
]
