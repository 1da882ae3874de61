"""Typed configuration for every mabeam process: flags over environment over defaults.

One frozen :class:`MeshConfig` describes where the mesh is (etcd, key prefix,
ports, TLS); every service, ``mabeam up`` and the SDK read it the same way:

* defaults below,
* overridden by ``MABEAM_*`` environment variables,
* overridden by command-line flags (:func:`add_mesh_arguments`).

Tests build configs directly with :func:`dataclasses.replace` overrides.

Environment variables (each has the flag in parentheses):

==============================  ==================================================
``MABEAM_ETCD``                 etcd endpoints, comma-separated URLs (``--etcd``)
``MABEAM_PREFIX``               etcd key prefix of this mesh, default ``/mabeam`` (``--prefix``)
``MABEAM_HOST``                 address the services bind, default 127.0.0.1 (``--host``)
``MABEAM_ADVERTISE_HOST``       address published in discovery, default = host
``MABEAM_REGISTRY_PORT``        default 50051 (``--registry-port``)
``MABEAM_ORCHESTRATOR_PORT``    default 50052 (``--orchestrator-port``)
``MABEAM_COORDINATION_PORT``    default 50053 (``--coordination-port``)
``MABEAM_PLANNER_PORT``         default 50054 (``--planner-port``)
``MABEAM_DATA_DIR``             embedded etcd data, default ``~/.mabeam/etcd`` (``--data-dir``)
``MABEAM_TLS_CERT/KEY``         server certificate and key: TLS on (``--tls-cert/--tls-key``)
``MABEAM_TLS_CA``               CA that client certificates must chain to: mutual TLS (``--tls-ca``)
``MABEAM_TLS_SERVER_NAME``      name checked in the peer's certificate instead of the address
                                dialled (pod IPs in Kubernetes), default the address
``MABEAM_ETCD_CA/CERT/KEY``     TLS to etcd (``--etcd-ca/--etcd-cert/--etcd-key``)
``MABEAM_GRACE``                seconds for in-flight calls on shutdown, default 5 (``--grace``)
``MABEAM_SERVICE_TTL``          lease TTL of service endpoint keys, default 5 s
``MABEAM_AUTH``                 ``off`` turns authentication off (``--no-auth``); default on
``MABEAM_TOKEN_FILE``           the token this process presents (``--token-file``);
                                a service's must be a service token
``MABEAM_TOKEN``                the token itself (instead of a file)
``MABEAM_INSECURE``             ``1`` lets a service listen beyond loopback without
                                TLS or auth (``--insecure``); loudly
``MABEAM_HEALTH_PORT``          a second, plaintext listener serving only
                                ``grpc.health.v1.Health`` (Kubernetes' gRPC probes),
                                on the service's host; unset or 0 = none
                                (``--health-port``, on a service's entry point only)
==============================  ==================================================

Authentication is on unless switched off: a process listening beyond
loopback without TLS and auth is refused (:meth:`MeshConfig.check_exposure`).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from mabeam.tls import TLS

SERVICES = ("registry", "orchestrator", "coordination", "planner")
DEFAULT_PORTS: dict[str, int] = {
    "registry": 50051,
    "orchestrator": 50052,
    "coordination": 50053,
    "planner": 50054,
}
SERVICE_NAMES: dict[str, str] = {
    "registry": "mabeam.v1.RegistryService",
    "orchestrator": "mabeam.v1.OrchestratorService",
    "coordination": "mabeam.v1.CoordinationService",
    "planner": "mabeam.v1.PlannerService",
}


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the flag and variable."""


@dataclass(frozen=True)
class MeshConfig:
    """Where the mesh is and how its processes listen."""

    etcd_endpoints: tuple[str, ...] = ()
    etcd_tls: TLS | None = None
    prefix: str = "/mabeam"
    host: str = "127.0.0.1"
    advertise_host: str | None = None
    ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    data_dir: Path = field(default_factory=lambda: Path.home() / ".mabeam" / "etcd")
    tls: TLS | None = None
    grace: float = 5.0
    service_ttl: int = 5
    # Every call authenticated and authorized (docs/security.md). A service
    # needs ``token``, a service token, for the calls it makes.
    auth: bool = True
    token: str | None = field(default=None, repr=False)
    # Listen beyond loopback without TLS or auth (refused otherwise).
    insecure: bool = False
    # A second listener serving only grpc.health.v1.Health, plaintext, no auth,
    # on ``host`` (Kubernetes' gRPC probes speak no TLS); 0 = none. It reveals
    # only SERVING/NOT_SERVING per name, so it is allowed beyond loopback.
    health_port: int = 0

    def client_tls(self) -> TLS | None:
        """TLS for the calls a service makes (to other services and agents) when TLS is on.

        The same settings serve both ways: the CA that verifies clients (mutual
        TLS) is trusted for servers too, and the service presents its own
        certificate: one CA per mesh.
        """
        return self.tls

    def agent_credential(self) -> str | None:
        """What this service presents to agents and plugins: the agent-call token derived from its
        service token (:func:`mabeam.credentials.agent_call_token`); None without a token."""
        from mabeam.credentials import agent_call_token

        return agent_call_token(self.token) if self.token else None

    @property
    def loopback_only(self) -> bool:
        """True when the bind address is a loopback address (nothing beyond this host can connect)."""
        host = self.host.strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def check_exposure(self, what: str) -> None:
        """ConfigError unless listening here is safe: loopback, or TLS and auth on, or ``insecure``."""
        if self.loopback_only:
            return
        missing = [name for name, on in (("TLS", self.tls is not None), ("auth", self.auth)) if not on]
        if not missing or self.insecure:
            return
        raise ConfigError(
            f"{what} would listen on {self.host} beyond loopback without {' and '.join(missing)}: "
            + ("set --tls-cert/--tls-key (MABEAM_TLS_CERT/KEY)" if "TLS" in missing else "")
            + (" and " if len(missing) == 2 else "")
            + ("drop --no-auth (MABEAM_AUTH)" if "auth" in missing else "")
            + ", bind --host 127.0.0.1, or accept the risk with --insecure (MABEAM_INSECURE=1)"
        )

    def port(self, service: str) -> int:
        """The configured port of ``service`` (0 = any free port)."""
        return int(self.ports[service])

    def with_port(self, service: str, port: int) -> MeshConfig:
        """A copy with one service's port changed."""
        ports = dict(self.ports)
        ports[service] = port
        return replace(self, ports=ports)

    @property
    def published_host(self) -> str:
        """The host other processes use to reach services started with this config."""
        if self.advertise_host:
            return self.advertise_host
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    def key(self, *parts: str) -> bytes:
        """Key under the prefix: ``key("agents", "a1")`` -> ``b"/mabeam/agents/a1"``."""
        return "/".join((self.prefix.rstrip("/"), *parts)).encode()


def _env_int(env: Mapping[str, str], name: str, flag: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number (flag {flag})") from None


def _check_port(port: int, flag: str) -> int:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{flag} {port}: a port is 0 to 65535")
    return port


def add_mesh_arguments(parser: argparse.ArgumentParser, *, services: tuple[str, ...] = SERVICES) -> None:
    """Add the shared flags; every default is None so the environment can fill it.

    A parser for one service (its entry point) also gets ``--health-port``: one
    process, one health listener (``mabeam up`` runs several services).
    """
    g = parser.add_argument_group("mesh")
    g.add_argument("--etcd", help="etcd endpoints, comma-separated URLs (env MABEAM_ETCD)")
    g.add_argument("--prefix", help="etcd key prefix of this mesh (env MABEAM_PREFIX, default /mabeam)")
    g.add_argument("--host", help="address to bind (env MABEAM_HOST, default 127.0.0.1)")
    g.add_argument("--advertise-host", help="address published for discovery (env MABEAM_ADVERTISE_HOST)")
    for svc in services:
        g.add_argument(
            f"--{svc}-port",
            type=int,
            help=f"{svc} port (env MABEAM_{svc.upper()}_PORT, default {DEFAULT_PORTS[svc]})",
        )
    g.add_argument("--data-dir", help="embedded etcd data directory (env MABEAM_DATA_DIR)")
    g.add_argument("--tls-cert", help="server certificate, switches TLS on (env MABEAM_TLS_CERT)")
    g.add_argument("--tls-key", help="server private key (env MABEAM_TLS_KEY)")
    g.add_argument("--tls-ca", help="CA for client certificates: mutual TLS (env MABEAM_TLS_CA)")
    g.add_argument("--etcd-ca", help="CA of etcd's certificate (env MABEAM_ETCD_CA)")
    g.add_argument("--etcd-cert", help="client certificate for etcd (env MABEAM_ETCD_CERT)")
    g.add_argument("--etcd-key", help="client key for etcd (env MABEAM_ETCD_KEY)")
    g.add_argument("--grace", type=float, help="shutdown grace in seconds (env MABEAM_GRACE, default 5)")
    g.add_argument(
        "--no-auth",
        action="store_true",
        default=None,
        help="accept calls without credentials (env MABEAM_AUTH=off); loopback only unless --insecure",
    )
    g.add_argument(
        "--token-file", help="file holding the token this process presents (env MABEAM_TOKEN_FILE)"
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow listening beyond loopback without TLS or auth (env MABEAM_INSECURE=1)",
    )
    if len(services) == 1:
        g.add_argument(
            "--health-port",
            type=int,
            metavar="PORT",
            help="also serve grpc.health.v1.Health alone, in plaintext (even with TLS on) and without "
            "auth, on this port of --host: for Kubernetes' gRPC probes (env MABEAM_HEALTH_PORT; "
            "default 0 = none)",
        )


def load(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> MeshConfig:
    """Build the config from flags (``args``), then environment, then defaults."""
    env = os.environ if env is None else env

    def pick(attr: str, var: str) -> str | None:
        value = getattr(args, attr, None) if args is not None else None
        if value is not None:
            return str(value)
        raw = env.get(var)
        return raw if raw else None

    etcd_raw = pick("etcd", "MABEAM_ETCD")
    endpoints = tuple(_normalise_endpoint(e) for e in etcd_raw.split(",") if e.strip()) if etcd_raw else ()

    ports = dict(DEFAULT_PORTS)
    for svc in SERVICES:
        flag = f"--{svc}-port"
        value = getattr(args, f"{svc}_port", None) if args is not None else None
        if value is None:
            value = _env_int(env, f"MABEAM_{svc.upper()}_PORT", flag)
        if value is not None:
            ports[svc] = _check_port(int(value), flag)

    cert, key, ca = (
        pick("tls_cert", "MABEAM_TLS_CERT"),
        pick("tls_key", "MABEAM_TLS_KEY"),
        pick("tls_ca", "MABEAM_TLS_CA"),
    )
    tls: TLS | None = None
    if cert or key:
        if not (cert and key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key (MABEAM_TLS_CERT, MABEAM_TLS_KEY)")
        for path, flag in ((cert, "--tls-cert"), (key, "--tls-key"), (ca, "--tls-ca")):
            if path and not Path(path).is_file():
                raise ConfigError(f"{flag} {path}: no such file")
        tls = TLS(
            cert_file=cert, key_file=key, ca_file=ca, server_name=env.get("MABEAM_TLS_SERVER_NAME") or None
        )
    elif ca:
        raise ConfigError("--tls-ca (MABEAM_TLS_CA) needs --tls-cert and --tls-key")

    e_ca, e_cert, e_key = (
        pick("etcd_ca", "MABEAM_ETCD_CA"),
        pick("etcd_cert", "MABEAM_ETCD_CERT"),
        pick("etcd_key", "MABEAM_ETCD_KEY"),
    )
    etcd_tls = TLS(ca_file=e_ca, cert_file=e_cert, key_file=e_key) if (e_ca or e_cert or e_key) else None

    grace_raw = pick("grace", "MABEAM_GRACE")
    try:
        grace = float(grace_raw) if grace_raw is not None else 5.0
    except ValueError:
        raise ConfigError(f"--grace / MABEAM_GRACE {grace_raw!r} is not a number") from None
    ttl = _env_int(env, "MABEAM_SERVICE_TTL", "MABEAM_SERVICE_TTL") or 5
    health_port = getattr(args, "health_port", None) if args is not None else None
    if health_port is None:
        health_port = _env_int(env, "MABEAM_HEALTH_PORT", "--health-port")
    health_port = _check_port(int(health_port or 0), "--health-port (MABEAM_HEALTH_PORT)")

    auth_off = bool(getattr(args, "no_auth", None)) or env.get("MABEAM_AUTH", "").lower() in _OFF
    insecure = bool(getattr(args, "insecure", None)) or env.get("MABEAM_INSECURE", "").lower() in _ON
    token_file = pick("token_file", "MABEAM_TOKEN_FILE")
    token = (env.get("MABEAM_TOKEN") or "").strip() or None
    if token_file:
        try:
            token = Path(token_file).expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {token_file}: {exc.strerror or exc}") from None

    prefix = pick("prefix", "MABEAM_PREFIX") or "/mabeam"
    if not prefix.startswith("/"):
        raise ConfigError(f"--prefix {prefix!r}: an etcd key prefix starts with '/'")
    data_dir = pick("data_dir", "MABEAM_DATA_DIR")
    return MeshConfig(
        etcd_endpoints=endpoints,
        etcd_tls=etcd_tls,
        prefix=prefix.rstrip("/") or "/mabeam",
        host=pick("host", "MABEAM_HOST") or "127.0.0.1",
        advertise_host=pick("advertise_host", "MABEAM_ADVERTISE_HOST"),
        ports=ports,
        data_dir=Path(data_dir).expanduser() if data_dir else Path.home() / ".mabeam" / "etcd",
        tls=tls,
        grace=grace,
        service_ttl=ttl,
        auth=not auth_off,
        token=token,
        insecure=insecure,
        health_port=health_port,
    )


_OFF = ("off", "0", "false", "no")
_ON = ("1", "true", "yes", "on")


def _normalise_endpoint(raw: str) -> str:
    raw = raw.strip()
    if "://" not in raw:
        raw = "http://" + raw
    return raw.rstrip("/")


def where_from_env(
    registry: str | Sequence[str] | None, etcd: Sequence[str] | None, etcd_tls: TLS | None
) -> tuple[str | Sequence[str] | None, Sequence[str] | None, TLS | None]:
    """The mesh a host registers with: what it was given, else ``MABEAM_REGISTRY`` / ``MABEAM_ETCD``
    (comma-separated), and TLS to etcd for discovery from ``MABEAM_ETCD_CA/CERT/KEY`` (a
    supervised agent gets the registry's there: the variables the services read too). ValueError
    when neither a registry nor etcd is known."""
    if registry is None and os.environ.get("MABEAM_REGISTRY"):
        registry = [r for r in os.environ["MABEAM_REGISTRY"].split(",") if r]
    if etcd is None and os.environ.get("MABEAM_ETCD"):
        etcd = [e for e in os.environ["MABEAM_ETCD"].split(",") if e]
    if not registry and not etcd:
        raise ValueError("where is the mesh? give registry= or etcd= (or MABEAM_REGISTRY / MABEAM_ETCD)")
    if etcd_tls is None and any(os.environ.get(f"MABEAM_ETCD_{v}") for v in ("CA", "CERT", "KEY")):
        etcd_tls = TLS(
            ca_file=os.environ.get("MABEAM_ETCD_CA") or None,
            cert_file=os.environ.get("MABEAM_ETCD_CERT") or None,
            key_file=os.environ.get("MABEAM_ETCD_KEY") or None,
        )
    return registry, etcd, etcd_tls
