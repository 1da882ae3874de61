"""What a registry may launch: the operator's agent catalog, and the one gate every launch goes through.

Launching is not arbitrary. A ``LaunchSpec`` names a *kind* of the catalog the
registry was started with (``--agent-catalog FILE``, env
``MABEAM_AGENT_CATALOG``), and the process run is the catalog's argv (or
Python entry point) with the extra arguments the kind allows. A free-form
``command`` argv or ``python_entry_point``, and a request's own ``env`` or
``working_dir``, are refused (PERMISSION_DENIED) unless the registry was
started with ``--allow-argv`` (env ``MABEAM_ALLOW_ARGV=1``), a development
switch it warns about loudly.

The catalog is a YAML mapping of kind names to specs::

    echo:                               # the kind's name: 1-64 of [A-Za-z0-9._-]
      argv: [/usr/bin/python3, /srv/agents/echo.py]   # or python_entry_point
      working_dir: /srv/agents          # optional; default: the registry's
      env: {ECHO_MODE: loud}            # optional; given to the process
      allowed_args: [--verbose, --bid=] # optional; default: no extra arguments
    planner-worker:
      python_entry_point: "agents.planner:make"   # run by mabeam.run_agent

``allowed_args`` decides the request's ``LaunchSpec.args``: each argument must
equal an entry, or, for an entry that ends in ``=`` (``--bid=``), start with
it (the value after the ``=`` is free, e.g. ``--bid=12``). The arguments are
appended to the kind's argv in the request's order (for an entry point, they
are the callable's arguments); no shell ever sees them. Anything else is
PERMISSION_DENIED naming the argument.

:meth:`LaunchPolicy.resolve` is the one gate: the request handlers
(StartAgent, MigrateAgent with a launch spec, StartAgent's ``validate_only``
that the orchestrator uses when a worker pool is bound) call it before any
write, and the supervisor calls it again each time it starts a process (so a
record written under another policy is not run under this one).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mabeam import errors
from mabeam.config import ConfigError
from mabeam.v1 import common_pb2, registry_pb2

CATALOG_ENV = "MABEAM_AGENT_CATALOG"
ALLOW_ARGV_ENV = "MABEAM_ALLOW_ARGV"
KIND_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
ENTRY_POINT_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
MAX_ARGS = 64
MAX_ARG_CHARS = 4096
FIELDS = frozenset({"argv", "python_entry_point", "working_dir", "env", "allowed_args"})
# A refused launch is an authorization refusal (PERMISSION_DENIED), not a token mismatch.
NOT_AUTHORIZED = common_pb2.ERROR_REASON_NOT_AUTHORIZED
NO_CATALOG = f"no catalog: start the registry with --agent-catalog FILE (env {CATALOG_ENV})"


@dataclass(frozen=True)
class Kind:
    """One kind of the catalog: what its processes run, where, with what environment."""

    name: str
    argv: tuple[str, ...] = ()
    python_entry_point: str = ""
    working_dir: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    allowed_args: tuple[str, ...] = ()

    def allows(self, arg: str) -> bool:
        """``arg`` equals an allowed entry, or starts with an entry ending in ``=``."""
        return any(arg == a or (a.endswith("=") and arg.startswith(a)) for a in self.allowed_args)


@dataclass(frozen=True)
class Resolved:
    """What a launch spec comes to under a policy: the process's target, extra env and directory."""

    argv: tuple[str, ...]  # a command's argv; empty with an entry point
    python_entry_point: str  # "pkg.mod:fn", or "" for a command
    args: tuple[str, ...]  # an entry point's arguments (a command's are in argv)
    env: dict[str, str]
    working_dir: str | None


@dataclass(frozen=True)
class LaunchPolicy:
    """The catalog this registry runs, and whether free-form launches are allowed."""

    kinds: Mapping[str, Kind] = field(default_factory=dict)
    allow_argv: bool = False
    source: str = ""  # the catalog's file, for messages

    def resolve(self, launch: registry_pb2.LaunchSpec, name: str = "launch") -> Resolved:
        """What ``launch`` runs here, or the error that refuses it (nothing has been written yet).

        NOT_FOUND for a kind the catalog lacks; PERMISSION_DENIED for a
        free-form target, a request's env or working_dir without
        --allow-argv, or an argument the kind does not allow. ``name`` is the
        spec's field in the request (``launch``, ``binding.worker_pool.launch``).
        """
        target = launch.WhichOneof("target")
        if target != "kind":
            if not self.allow_argv:
                raise errors.PermissionDenied(
                    f"{name}.{target}: this registry runs only the agent kinds of its catalog "
                    f"({self.where()}); free-form launches need a registry started with --allow-argv "
                    f"({ALLOW_ARGV_ENV}=1)",
                    reason=NOT_AUTHORIZED,
                )
            return Resolved(
                tuple(launch.command.argv) if target == "command" else (),
                launch.python_entry_point if target == "python_entry_point" else "",
                (),
                dict(launch.env),
                launch.working_dir or None,
            )
        kind = self.kinds.get(launch.kind)
        if kind is None:
            raise errors.NotFound(
                f"{name}.kind: no agent kind {launch.kind[:140]!r} in this registry's catalog ({self.where()})"
            )
        if not self.allow_argv:
            if launch.env:
                raise errors.PermissionDenied(
                    f"{name}.env: a kind's environment is the catalog's; a request's env needs --allow-argv",
                    reason=NOT_AUTHORIZED,
                )
            if launch.working_dir:
                raise errors.PermissionDenied(
                    f"{name}.working_dir: a kind's working directory is the catalog's; "
                    "a request's needs --allow-argv",
                    reason=NOT_AUTHORIZED,
                )
        for i, arg in enumerate(launch.args):
            if not kind.allows(arg):
                allowed = ", ".join(kind.allowed_args) or "none"
                raise errors.PermissionDenied(
                    f"{name}.args[{i}]: {arg[:140]!r} is not allowed for kind {kind.name!r} "
                    f"(allowed: {allowed})",
                    reason=NOT_AUTHORIZED,
                )
        args = tuple(launch.args)
        return Resolved(
            kind.argv + args if kind.argv else (),
            kind.python_entry_point,
            () if kind.argv else args,
            {**kind.env, **dict(launch.env)},
            launch.working_dir or kind.working_dir,
        )

    def where(self) -> str:
        """Where this registry's catalog comes from, for messages."""
        if not self.source:
            return NO_CATALOG
        names = ", ".join(sorted(self.kinds)) or "none"
        return f"--agent-catalog {self.source}, kinds: {names}"


def check_shape(launch: registry_pb2.LaunchSpec, name: str = "launch") -> None:
    """The fields of a kind launch that are malformed whatever the catalog (INVALID_ARGUMENT)."""
    if launch.WhichOneof("target") == "kind":
        if not KIND_RE.match(launch.kind):
            raise errors.InvalidArgument(f"{name}.kind", "must be 1-64 characters of [A-Za-z0-9._-]")
    elif launch.args:
        raise errors.InvalidArgument(f"{name}.args", "extra arguments are only for a kind")
    if len(launch.args) > MAX_ARGS:
        raise errors.InvalidArgument(f"{name}.args", f"at most {MAX_ARGS} arguments")
    for i, arg in enumerate(launch.args):
        if len(arg) > MAX_ARG_CHARS or "\x00" in arg:
            raise errors.InvalidArgument(
                f"{name}.args[{i}]", f"must be at most {MAX_ARG_CHARS} characters, without NUL"
            )


# -- the catalog file ---------------------------------------------------------


def parse(data: Any, source: str) -> dict[str, Kind]:
    """The kinds of a parsed catalog; ConfigError (one line: file, kind, problem) if it is wrong."""

    def bad(problem: str, kind: str | None = None) -> ConfigError:
        where = f"agent catalog {source}" + (f": kind {kind!r}" if kind is not None else "")
        return ConfigError(f"{where}: {problem}")

    if data is None:
        return {}
    if not isinstance(data, dict):
        raise bad("must be a mapping of kind names to specs")
    kinds: dict[str, Kind] = {}
    for name, spec in data.items():
        if not isinstance(name, str) or not KIND_RE.match(name):
            raise bad(f"kind name {name!r} must be 1-64 characters of [A-Za-z0-9._-]")
        if not isinstance(spec, dict):
            raise bad("must be a mapping with argv or python_entry_point", name)
        unknown = sorted(str(k) for k in spec if k not in FIELDS)
        if unknown:
            raise bad(f"unknown field {unknown[0]!r} (fields: {', '.join(sorted(FIELDS))})", name)
        if ("argv" in spec) == ("python_entry_point" in spec):
            raise bad("give exactly one of argv and python_entry_point", name)
        argv: tuple[str, ...] = ()
        entry = ""
        if "argv" in spec:
            argv = _strings(spec["argv"], "argv", bad, name)
            if not argv:
                raise bad("argv must not be empty", name)
        else:
            entry = spec["python_entry_point"]
            if not isinstance(entry, str) or not ENTRY_POINT_RE.match(entry):
                raise bad("python_entry_point must look like 'package.module:callable'", name)
        working_dir = spec.get("working_dir")
        if working_dir is not None and (
            not isinstance(working_dir, str) or not working_dir or "\x00" in working_dir
        ):
            raise bad("working_dir must be a non-empty path", name)
        env = spec.get("env") or {}
        if not isinstance(env, dict):
            raise bad("env must be a mapping of variable names to strings", name)
        for var, value in env.items():
            if not isinstance(var, str) or not ENV_NAME_RE.match(var):
                raise bad(f"env: {var!r} is not an environment variable name", name)
            if not isinstance(value, (str, int, float)) or isinstance(value, bool) or "\x00" in str(value):
                raise bad(f"env[{var}] must be a string", name)
        allowed = _strings(spec.get("allowed_args") or [], "allowed_args", bad, name)
        if any(not a for a in allowed):
            raise bad("allowed_args entries must not be empty", name)
        kinds[name] = Kind(
            name=name,
            argv=argv,
            python_entry_point=entry,
            working_dir=working_dir,
            env={str(k): str(v) for k, v in env.items()},
            allowed_args=allowed,
        )
    return kinds


def _strings(value: Any, what: str, bad: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad(f"{what} must be a list of strings", name)
    if any("\x00" in v for v in value):
        raise bad(f"{what} must not contain a NUL character", name)
    return tuple(value)


def load(path: str | Path) -> dict[str, Kind]:
    """The kinds of the catalog file ``path``; ConfigError naming the file if it cannot be used."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"agent catalog {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise ConfigError(f"agent catalog {path}: not valid YAML: {first}") from None
    return parse(data, str(path))


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def policy(catalog_file: str | None, allow_argv: bool) -> LaunchPolicy:
    """The policy of a registry started with these settings (the catalog read and checked now)."""
    if not catalog_file:
        return LaunchPolicy(allow_argv=allow_argv)
    return LaunchPolicy(load(catalog_file), allow_argv, str(catalog_file))


def policy_from_env(env: Mapping[str, str] | None = None) -> LaunchPolicy:
    """The policy from ``MABEAM_AGENT_CATALOG`` and ``MABEAM_ALLOW_ARGV``."""
    env = os.environ if env is None else env
    return policy(env.get(CATALOG_ENV) or None, truthy(env.get(ALLOW_ARGV_ENV)))


__all__ = [
    "ALLOW_ARGV_ENV",
    "CATALOG_ENV",
    "Kind",
    "LaunchPolicy",
    "Resolved",
    "check_shape",
    "load",
    "parse",
    "policy",
    "policy_from_env",
]
