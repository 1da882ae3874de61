"""Launch specs and restart policies: checked when a request arrives, turned into a process here.

A ``LaunchSpec`` (``StartAgent``, and ``MigrateAgent`` with a launch target)
names a kind of the registry's agent catalog, or (only on a registry started
with ``--allow-argv``) a command or a Python entry point; see
:mod:`.catalog`. :func:`check_launch` refuses first what the OS would refuse
at exec time (INVALID_ARGUMENT naming the field), then what the registry's
:class:`~.catalog.LaunchPolicy` does not allow (PERMISSION_DENIED, or
NOT_FOUND for an unknown kind), so that the supervisor never learns of a bad
spec from a failed start and a refused request writes nothing.
:func:`launch_command` is the one place that says what a supervised process
is given: its argv, a minimal environment (:func:`child_environment`: never
the registry's whole environment), the agent id, the token the supervisor
chose, and the mesh's addresses.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mabeam import errors
from mabeam.config import MeshConfig
from mabeam.runtime import process
from mabeam.services.registry.catalog import LaunchPolicy, check_shape
from mabeam.services.registry.restart_policy import RestartPolicy, Strategy
from mabeam.v1 import registry_pb2

ENTRY_POINT_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")
STRATEGIES = {
    registry_pb2.RESTART_STRATEGY_UNSPECIFIED: Strategy.PERMANENT,
    registry_pb2.RESTART_STRATEGY_PERMANENT: Strategy.PERMANENT,
    registry_pb2.RESTART_STRATEGY_TRANSIENT: Strategy.TRANSIENT,
    registry_pb2.RESTART_STRATEGY_TEMPORARY: Strategy.TEMPORARY,
}
DEFAULT_START_TIMEOUT_S = 10.0


def seconds(d: Any) -> float:
    """A protobuf Duration or Timestamp in seconds."""
    return float(d.seconds + d.nanos / 1e9)


def policy_of(p: registry_pb2.RestartPolicy, present: bool = True) -> RestartPolicy:
    """The pure policy of a proto policy (defaults: permanent, 3 restarts in 5 s)."""
    if not present:
        return RestartPolicy()
    try:
        return RestartPolicy(
            strategy=STRATEGIES.get(p.strategy, Strategy.PERMANENT),
            max_restarts=p.max_restarts if p.HasField("period") or p.max_restarts else 3,
            period_s=seconds(p.period) if p.HasField("period") else 5.0,
            backoff_initial_s=seconds(p.backoff_initial),
            backoff_max_s=seconds(p.backoff_max) if p.HasField("backoff_max") else 5.0,
        )
    except ValueError as exc:
        field, _, message = str(exc).partition(": ")
        raise errors.InvalidArgument(f"restart_policy.{field}", message) from None


def check_launch(launch: registry_pb2.LaunchSpec, policy: LaunchPolicy, name: str = "launch") -> None:
    """A launch spec this registry may start a process from, else the error that refuses it.

    INVALID_ARGUMENT naming the field for what the OS would refuse; then the
    policy's refusals (:meth:`.catalog.LaunchPolicy.resolve`): PERMISSION_DENIED
    for a free-form launch without --allow-argv or an argument the kind does not
    allow, NOT_FOUND for a kind the catalog lacks. Called before any write.
    """
    check_shape_of(launch)
    policy.resolve(launch, name)


def check_shape_of(launch: registry_pb2.LaunchSpec) -> None:
    """A launch spec the OS can start a process from, else INVALID_ARGUMENT naming the field."""
    target = launch.WhichOneof("target")
    if target is None:
        raise errors.InvalidArgument(
            "launch", "give a kind (or, with --allow-argv, a command or a python_entry_point)"
        )
    if target == "command" and not launch.command.argv:
        raise errors.InvalidArgument("launch.command.argv", "must not be empty")
    if target == "python_entry_point" and not ENTRY_POINT_RE.match(launch.python_entry_point):
        raise errors.InvalidArgument("launch.python_entry_point", "must look like 'package.module:callable'")
    # What exec refuses (a NUL byte, a malformed variable name) is refused here, not by the supervisor.
    for i, arg in enumerate(launch.command.argv):
        if "\x00" in arg:
            raise errors.InvalidArgument(f"launch.command.argv[{i}]", "must not contain a NUL character")
    for name, value in launch.env.items():
        if not name or "=" in name or "\x00" in name:
            raise errors.InvalidArgument("launch.env", f"{name[:140]!r} is not an environment variable name")
        if "\x00" in value:
            raise errors.InvalidArgument(f"launch.env[{name}]", "must not contain a NUL character")
    if "\x00" in launch.working_dir:
        raise errors.InvalidArgument("launch.working_dir", "must not contain a NUL character")
    check_shape(launch)


def start_timeout(record: registry_pb2.SupervisedAgent) -> float:
    """How long a started process of ``record`` has to come up."""
    return seconds(record.start_timeout) or DEFAULT_START_TIMEOUT_S


def agent_log(agent_id: str, config: MeshConfig) -> Path:
    """Where a supervised agent's stdout and stderr go: ``<logs>/agents/<agent_id>.log``.

    ``<logs>`` is ``$MABEAM_LOG_DIR`` (``mabeam up`` sets it to its own log
    folder), else ``logs`` beside the data directory (``~/.mabeam/logs``). Never
    a pipe, never the registry's own output; rotated past
    :data:`mabeam.runtime.process.LOG_MAX_BYTES` (``<agent_id>.log.1`` keeps the one before).
    """
    base = os.environ.get("MABEAM_LOG_DIR") or str(config.data_dir.parent / "logs")
    return Path(base).expanduser() / "agents" / f"{agent_id}.log"


@dataclass(frozen=True)
class Launch:
    """A process to start: what ``process.spawn`` takes."""

    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    log: Path  # its stdout and stderr (agent_log)


# What a launched process takes of the registry's own environment: where
# programs are, the user's home, locale and time zone. Nothing else (no
# LD_PRELOAD, PYTHONPATH, credentials or the registry's MABEAM_* settings).
PASSED_ENV = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ")


def child_environment(parent: Mapping[str, str] | None = None) -> dict[str, str]:
    """The part of ``parent`` (default: this process's environment) a launched process gets."""
    parent = os.environ if parent is None else parent
    return {k: v for k, v in parent.items() if k in PASSED_ENV or k.startswith("LC_")}


def launch_command(
    launch: registry_pb2.LaunchSpec,
    agent_id: str,
    token: str,
    registry_address: str,
    config: MeshConfig,
    policy: LaunchPolicy,
    *,
    credential: str | None = None,
    standby: bool = False,
) -> Launch:
    """The process of a supervised agent: its argv, and the environment that ties it to the mesh.

    The spec is resolved through ``policy`` again here (a record written under
    another registry's policy is not run under this one: a MabeamError then).
    The environment is :func:`child_environment`, then the kind's ``env`` (and,
    with --allow-argv, the request's), then the MABEAM_* variables set here,
    which nothing overrides. ``credential``: the bearer token the process
    presents to the mesh (``MABEAM_TOKEN``; with auth on, the supervisor's
    agent-role token for this agent id). ``standby``: a migration target,
    served but not registered until its state is imported (``MABEAM_STANDBY=1``).
    """
    resolved = policy.resolve(launch)
    if resolved.python_entry_point:
        argv = process.python_module_argv("mabeam.run_agent", resolved.python_entry_point, *resolved.args)
    else:
        argv = list(resolved.argv)
    env = {
        **child_environment(),
        **resolved.env,
        "MABEAM_AGENT_ID": agent_id,
        "MABEAM_AGENT_TOKEN": token,
        "MABEAM_REGISTRY": registry_address,
        "MABEAM_ETCD": ",".join(config.etcd_endpoints),
        "MABEAM_PREFIX": config.prefix,
        "PYTHONUNBUFFERED": "1",
    }
    if credential:
        env["MABEAM_TOKEN"] = credential
    if config.advertise_host:
        env["MABEAM_ADVERTISE_HOST"] = config.advertise_host
    # etcd as the registry reaches it: with TLS, the same files (the SDK reads
    # these for discovery, as the services do), else an agent of a mesh on an
    # mTLS etcd could not use MABEAM_ETCD at all.
    if config.etcd_tls is not None:
        for name, value in (
            ("MABEAM_ETCD_CA", config.etcd_tls.ca_file),
            ("MABEAM_ETCD_CERT", config.etcd_tls.cert_file),
            ("MABEAM_ETCD_KEY", config.etcd_tls.key_file),
        ):
            if value:
                env[name] = value
    # Not the registry's own ready file (its parent's): a caller that waits passes its own.
    env.pop(process.READY_FILE_ENV, None)
    if standby:
        env["MABEAM_STANDBY"] = "1"
    return Launch(argv, env, resolved.working_dir, agent_log(agent_id, config))
