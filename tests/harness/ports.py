"""Ports for tests without the race of "pick a free port now, bind it later".

A port picked free and bound only later (by etcd, a service, a subprocess) may
be taken meanwhile by any other process on the machine (other test sessions
run at the same time). So:

* :func:`closed_port` is a loopback port that refuses connections for the rest
  of the session: a socket stays bound there (never listening), so nothing else
  can take it and start answering. For "a dead endpoint".
* Where a separate process must bind a port picked here, the test retries with
  another port when the process reports the port taken
  (:class:`mabeam.runtime.embedded_etcd.EmbeddedEtcd` does so for its own).
"""

from __future__ import annotations

import contextlib
import socket

_held: list[socket.socket] = []  # closed ports, held until the session ends


def closed_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that refuses connections until the session ends (bound, not listening).

    ``localhost`` holds the port on 127.0.0.1 and, where there is IPv6, on ::1 too
    (a name may resolve to either).
    """
    hosts = ("127.0.0.1", "::1") if host == "localhost" else (host,)
    family = socket.AF_INET6 if ":" in hosts[0] else socket.AF_INET
    first = socket.socket(family)
    first.bind((hosts[0], 0))
    _held.append(first)
    port = int(first.getsockname()[1])
    for other in hosts[1:]:
        with contextlib.suppress(OSError):  # no IPv6 here, or ::1 taken: 127.0.0.1 is held all the same
            extra = socket.socket(socket.AF_INET6)
            try:
                extra.bind((other, port))
            except OSError:
                extra.close()
                raise
            _held.append(extra)
    return port
