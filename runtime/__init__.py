"""The runtime the four services stand on (import name ``mabeam.runtime``, folder ``runtime/``).

* :mod:`~mabeam.runtime.etcd` — the etcd layer: client, leases, watches, elections;
* :mod:`~mabeam.runtime.cache` — watch-fed caches of an etcd prefix;
* :mod:`~mabeam.runtime.service` — a service's start-up: etcd, endpoint, entry point;
* :mod:`~mabeam.runtime.endpoints` — a replica's endpoint published for discovery;
* :mod:`~mabeam.runtime.exporters` — where spans and metrics go;
* :mod:`~mabeam.runtime.validate` — the input rules every service applies;
* :mod:`~mabeam.runtime.process` — child processes that die with their parent;
* :mod:`~mabeam.runtime.embedded_etcd`, :mod:`~mabeam.runtime.mesh` — etcd and
  the whole mesh on this machine (``mabeam up``, tests, benchmarks);
* :mod:`~mabeam.runtime.backup` — the durable state as one document.

It may import the SDK (:mod:`mabeam`); the SDK never imports it.
"""
