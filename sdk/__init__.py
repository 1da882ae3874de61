"""mabeam: a multi-agent coordination mesh.

This package is the SDK: what an agent author or a client imports.

* :mod:`mabeam.client` — clients of the four services (``MeshClient``);
* :mod:`mabeam.agent` — the agent base class and the ``AgentHost``;
* :mod:`mabeam.errors` — the one error table (exception, status, reason);
* :mod:`mabeam.config`, :mod:`mabeam.tls` — where the mesh is, and TLS;
* :mod:`mabeam.discovery` — the live endpoints of a service, read from etcd;
* :mod:`mabeam.server` — the server bootstrap agents and services share;
* :mod:`mabeam.v1` — the generated contracts.

The runtime the services stand on (the etcd layer, the embedded etcd,
``mabeam up``) is :mod:`mabeam.runtime`; the services are
:mod:`mabeam.services`, the ``mabeam`` command :mod:`mabeam.cli`. None of
them is imported by the SDK (``tests/test_layers.py`` checks it).
"""
