"""Nodes: where registry replicas run, and on which node a supervised agent runs.

A *node* is a name and labels that a registry replica declares it runs on
(``--node-name`` / ``MABEAM_NODE_NAME``, default the host name;
``--node-label zone=a`` / ``MABEAM_NODE_LABELS=zone=a,rack=3``). Each replica
publishes its node with its capacity (logical cores, physical memory) under
``P/registry-nodes/<replica>`` on the replica's lease (:mod:`.store`), so a
node is listed while one of its replicas lives (ListNodes).

Placement (StartAgent's ``placement``): the replica serving StartAgent picks
the least-loaded eligible live node (:func:`choose`: least memory in use
against its capacity, then fewest active supervised agents, then name) and
records it in ``SupervisedAgent.node``. Only a replica of that node takes
the agent (:func:`may_run`); when no replica of that node lives any more, any
replica of an eligible node may, and it records its own node when it starts
the process. Nothing here touches etcd; the supervisor feeds it its caches.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from mabeam import errors
from mabeam.config import ConfigError
from mabeam.runtime import validate
from mabeam.v1 import common_pb2, registry_pb2

NODE_NAME_ENV = "MABEAM_NODE_NAME"
NODE_LABELS_ENV = "MABEAM_NODE_LABELS"
# Limits of a placement's node selector (and of a node's labels).
MAX_SELECTOR = 16
MAX_LABEL_LEN = 128
# ListNodes answers at most this many nodes.
MAX_NODES = 1000


def _default_name() -> str:
    """The host name, cut to an identifier (characters outside [A-Za-z0-9._:-] become '-')."""
    name = "".join(c if c.isalnum() or c in "._:-" else "-" for c in socket.gethostname())[:128]
    return name or "localhost"


def parse_labels(items: Iterable[str], where: str) -> dict[str, str]:
    """``key=value`` items as a dict (ConfigError naming ``where`` for a malformed one)."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or len(key) > MAX_LABEL_LEN or len(value) > MAX_LABEL_LEN:
            raise ConfigError(f"{where}: {item!r} is not key=value (each 1-{MAX_LABEL_LEN} characters)")
        labels[key] = value
    if len(labels) > MAX_SELECTOR:
        raise ConfigError(f"{where}: at most {MAX_SELECTOR} labels")
    return labels


@dataclass(frozen=True)
class NodeSpec:
    """The node this replica runs on."""

    name: str = field(default_factory=_default_name)
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def load(
        cls, env: Mapping[str, str], name: str | None = None, labels: Sequence[str] | None = None
    ) -> NodeSpec:
        """Flags over the environment over the host name (ConfigError naming the flag and variable)."""
        chosen = name or env.get(NODE_NAME_ENV) or _default_name()
        if not validate.ID_RE.match(chosen):
            raise ConfigError(
                f"--node-name / {NODE_NAME_ENV}: {chosen[:140]!r} must be 1-128 characters of [A-Za-z0-9._:-]"
            )
        if labels:
            parsed = parse_labels(labels, "--node-label")
        else:
            raw = env.get(NODE_LABELS_ENV, "")
            parsed = parse_labels([i for i in raw.split(",") if i.strip()], NODE_LABELS_ENV)
        return cls(chosen, parsed)


def capacity() -> common_pb2.Resources:
    """What this machine has: logical cores and physical memory (0 where it cannot tell)."""
    cores = os.cpu_count() or 0
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return common_pb2.Resources(cpu=float(cores), memory_bytes=max(0, int(memory)))


def published(spec: NodeSpec, replica_id: str) -> registry_pb2.Node:
    """What a replica publishes of its node."""
    return registry_pb2.Node(
        name=spec.name, labels=dict(spec.labels), replica_ids=[replica_id], capacity=capacity()
    )


def check_placement(placement: registry_pb2.Placement, field_name: str = "placement") -> None:
    """INVALID_ARGUMENT naming the field of a malformed placement."""
    need = placement.resources
    if not (math.isfinite(need.cpu) and need.cpu >= 0):
        raise errors.InvalidArgument(f"{field_name}.resources.cpu", f"{need.cpu}: a finite number >= 0")
    if placement.node:
        validate.identifier(placement.node, f"{field_name}.node")
    if len(placement.node_selector) > MAX_SELECTOR:
        raise errors.InvalidArgument(f"{field_name}.node_selector", f"at most {MAX_SELECTOR} entries")
    for key, value in placement.node_selector.items():
        if not key or len(key) > MAX_LABEL_LEN or len(value) > MAX_LABEL_LEN:
            raise errors.InvalidArgument(
                f"{field_name}.node_selector",
                f"{key[:140]!r}: keys 1-{MAX_LABEL_LEN}, values 0-{MAX_LABEL_LEN} characters",
            )


def describe(placement: registry_pb2.Placement) -> str:
    """The placement for people: 'node "a", zone=b, room for 2 cpu' or 'any node'."""
    parts = [f"node {placement.node!r}"] if placement.node else []
    parts += [f"{k}={v}" for k, v in sorted(placement.node_selector.items())]
    need = placement.resources
    room = [f"{need.cpu:g} cpu"] if need.cpu else []
    room += [f"{need.memory_bytes} bytes of memory"] if need.memory_bytes else []
    if room:
        parts.append("room for " + " and ".join(room))
    return ", ".join(parts) or "any node"


def eligible(placement: registry_pb2.Placement, name: str, labels: Mapping[str, str]) -> bool:
    """Whether a node of this name and labels satisfies the placement."""
    if placement.node and placement.node != name:
        return False
    return all(labels.get(k) == v for k, v in placement.node_selector.items())


def aggregate(
    replicas: Iterable[registry_pb2.Node],
    records: Iterable[registry_pb2.SupervisedAgent],
    memory_of: Mapping[str, int],
) -> list[registry_pb2.Node]:
    """One Node per name from the replicas' published nodes, with what runs there (by name)."""
    nodes: dict[str, registry_pb2.Node] = {}
    for replica in sorted(replicas, key=lambda r: tuple(r.replica_ids)):
        node = nodes.get(replica.name)
        if node is None:
            node = registry_pb2.Node()
            node.CopyFrom(replica)
            nodes[replica.name] = node
        else:
            node.replica_ids.extend(replica.replica_ids)
    for record in records:
        node = nodes.get(record.node)
        if node is not None:
            node.supervised_agents += 1
            node.memory_bytes += memory_of.get(record.agent_id, 0)
            node.reserved.cpu += record.placement.resources.cpu
            node.reserved.memory_bytes += record.placement.resources.memory_bytes
    return [nodes[name] for name in sorted(nodes)]


def load_of(node: registry_pb2.Node) -> tuple[float, int, str]:
    """How loaded a node is, smallest first: memory (measured, or reserved if more) against
    capacity, agents, name."""
    used = max(node.memory_bytes, node.reserved.memory_bytes)
    memory = used / node.capacity.memory_bytes if node.capacity.memory_bytes else 0.0
    return (memory, node.supervised_agents, node.name)


def has_room(node: registry_pb2.Node, need: common_pb2.Resources) -> bool:
    """Whether the node's capacity less what is reserved there holds ``need`` (cpu, memory);
    a capacity the node did not declare (0) holds anything."""
    cap, taken = node.capacity, node.reserved
    if need.cpu and cap.cpu and taken.cpu + need.cpu > cap.cpu + 1e-9:
        return False
    return not (
        need.memory_bytes and cap.memory_bytes and taken.memory_bytes + need.memory_bytes > cap.memory_bytes
    )


def choose(nodes: Iterable[registry_pb2.Node], placement: registry_pb2.Placement) -> registry_pb2.Node | None:
    """The least-loaded live node the placement allows and that has room for what it reserves
    (None: none does)."""
    fitting = [n for n in nodes if eligible(placement, n.name, n.labels) and has_room(n, placement.resources)]
    return min(fitting, key=load_of) if fitting else None


def may_run(record: registry_pb2.SupervisedAgent, here: NodeSpec, live_nodes: set[str]) -> bool:
    """Whether a replica on ``here`` may take the agent: its placement allows this node, and it was
    placed here, nowhere yet, or on a node with no live replica left."""
    if not eligible(record.placement, here.name, here.labels):
        return False
    return not record.node or record.node == here.name or record.node not in live_nodes
