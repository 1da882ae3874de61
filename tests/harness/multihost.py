"""A mesh across the hosts of a :class:`harness.netns.NetworkLab` (:class:`MultiHostMesh`).

Each host ``h<i>`` (its own network namespace and address) runs:

* one member of a three-member etcd cluster, its client and peer URLs on the
  host's address (``:2379`` / ``:2380``), with ``mabeam up``'s upkeep flags
  (:func:`mabeam.runtime.embedded_etcd.upkeep_args`);
* one replica of each service (``python -m mabeam.services.<kind> --host
  ADDRESS --etcd <every member>``) on its default port, bound to and
  advertising the host's address, with TLS (mutual, one CA per mesh; the
  certificate names every host's address) and auth on (the service token of
  ``mabeam auth init``), the registry's node named after the host;
* an AgentHost (``harness/multihost_agents.py``) with ``agents`` agents
  ``h<i>-a<n>``, bound to the host's address, registered through the host's
  own registry with an agent-role token.

Nothing runs in the ``client`` namespace but what the test starts there:
``mabeam auth init``, ``mabeam status`` and the clients of
``harness/multihost_client.py``. Every process logs to ``<workdir>/logs``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.certs import make_certs
from harness.netns import CLIENT, NetworkLab
from harness.wait import eventually
from mabeam.config import DEFAULT_PORTS, SERVICES
from mabeam.runtime.embedded_etcd import etcd_binary, upkeep_args

HARNESS = Path(__file__).resolve().parent
CLIENT_SCRIPT = HARNESS / "multihost_client.py"
AGENT_SCRIPT = HARNESS / "multihost_agents.py"
SERVICE_TTL = 2  # seconds: a replica cut off leaves discovery quickly
AGENT_TTL = 5.0  # the agents' lease TTL (the SDK's default)
START_TIMEOUT = 180.0  # 2 cores shared: twelve service processes start slowly


@dataclass
class MultiHostMesh:
    """The mesh of the module docstring on ``lab``; ``await start()``, then the lab's exit ends it."""

    lab: NetworkLab
    workdir: Path
    agents: int = 3
    prefix: str = "/mabeam"
    certs: dict[str, str] = field(default_factory=dict)
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    # -- where things are ------------------------------------------------------------------

    @property
    def hosts(self) -> list[str]:
        return self.lab.host_names

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def credentials(self) -> Path:
        return self.workdir / "credentials"

    def etcd_url(self, host: str) -> str:
        return f"http://{self.lab.address(host)}:2379"

    @property
    def etcd_urls(self) -> str:
        return ",".join(self.etcd_url(h) for h in self.hosts)

    def address(self, host: str, kind: str) -> str:
        """Where ``host``'s replica of service ``kind`` listens (and says it does)."""
        return f"{self.lab.address(host)}:{DEFAULT_PORTS[kind]}"

    def agent_ids(self, host: str) -> list[str]:
        return [f"{host}-a{n}" for n in range(self.agents)]

    # -- environments ----------------------------------------------------------------------

    def _env(self, **extra: str) -> dict[str, str]:
        # Not the test process's own MABEAM_* (its token, its --allow-argv, its log folder).
        base = {k: v for k, v in os.environ.items() if not k.startswith("MABEAM_")}
        return {**base, "MABEAM_PREFIX": self.prefix, **extra}

    def service_env(self, host: str) -> dict[str, str]:
        return self._env(
            MABEAM_TLS_CERT=self.certs["server"],
            MABEAM_TLS_KEY=self.certs["server-key"],
            MABEAM_TLS_CA=self.certs["ca"],
            MABEAM_TOKEN_FILE=str(self.credentials / "service.token"),
            MABEAM_SERVICE_TTL=str(SERVICE_TTL),
            MABEAM_GRACE="0.5",
            MABEAM_LOG_DIR=str(self.logs / host),
            MABEAM_NODE_NAME=host,
        )

    def agent_env(self) -> dict[str, str]:
        return self._env(
            MABEAM_TLS_CERT=self.certs["server"],
            MABEAM_TLS_KEY=self.certs["server-key"],
            MABEAM_TLS_CA=self.certs["ca"],
            MABEAM_TOKEN_FILE=str(self.credentials / "agent.token"),
        )

    def client_env(self) -> dict[str, str]:
        """A client of the mesh: the client certificate and the admin token."""
        return self._env(
            MABEAM_TLS_CERT=self.certs["client"],
            MABEAM_TLS_KEY=self.certs["client-key"],
            MABEAM_TLS_CA=self.certs["ca"],
            # The `mabeam` CLI's names for the same (docs/decisions.md: client TLS settings).
            MABEAM_CLIENT_TLS_CERT=self.certs["client"],
            MABEAM_CLIENT_TLS_KEY=self.certs["client-key"],
            MABEAM_CLIENT_TLS_CA=self.certs["ca"],
            MABEAM_TOKEN_FILE=str(self.credentials / "admin.token"),
        )

    # -- starting --------------------------------------------------------------------------

    async def start(self) -> None:
        (self.workdir / "certs").mkdir(parents=True, exist_ok=True)
        addresses = [self.lab.address(h) for h in [*self.hosts, CLIENT]]
        self.certs = make_certs(self.workdir / "certs", addresses)
        for host in self.hosts:
            await self._start_etcd(host)
        await self.wait_etcd_healthy(timeout=60)
        init = ["auth", "init", "--etcd", self.etcd_urls, "--dir", str(self.credentials), "--agent-token"]
        code, out, err = await self.lab.output(
            CLIENT, [sys.executable, "-m", "mabeam.cli", *init], env=self._env()
        )
        assert code == 0, f"mabeam auth init: {out}{err}"
        for host in self.hosts:
            for kind in SERVICES:
                await self._start_service(host, kind)
        for host in self.hosts:
            for kind in SERVICES:
                await self._wait_log(f"{host}/{kind}", f"mabeam {kind} serving on {self.address(host, kind)}")
        for host in self.hosts:
            await self.start_agents(host)
        for host in self.hosts:
            await self._wait_log(f"{host}/agents", f"agents ready on {self.lab.address(host)}:")

    async def _start_etcd(self, host: str) -> None:
        address = self.lab.address(host)
        cluster = ",".join(f"{h}=http://{self.lab.address(h)}:2380" for h in self.hosts)
        argv = [
            etcd_binary(),
            "--name", host,
            "--data-dir", str(self.workdir / f"etcd-{host}"),
            "--listen-client-urls", f"http://{address}:2379",
            "--advertise-client-urls", f"http://{address}:2379",
            "--listen-peer-urls", f"http://{address}:2380",
            "--initial-advertise-peer-urls", f"http://{address}:2380",
            "--initial-cluster", cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"mbl-{self.lab.net}",
            "--log-level", "warn",
            "--unsafe-no-fsync",
            *upkeep_args(),
        ]  # fmt: skip
        self.processes[f"{host}/etcd"] = await self.lab.run(
            host, argv, env=self._env(), log=self.logs / host / "etcd.log"
        )

    async def _start_service(self, host: str, kind: str) -> None:
        argv = [sys.executable, "-m", f"mabeam.services.{kind}", "--host", self.lab.address(host)]
        argv += ["--etcd", self.etcd_urls]
        self.processes[f"{host}/{kind}"] = await self.lab.run(
            host, argv, env=self.service_env(host), log=self.logs / host / f"{kind}.log"
        )

    async def start_agents(self, host: str) -> None:
        argv = [sys.executable, str(AGENT_SCRIPT), "--host", host, "--bind", self.lab.address(host)]
        argv += ["--registry", self.address(host, "registry"), "--count", str(self.agents)]
        argv += ["--lease-ttl", str(AGENT_TTL), "--hosts", ",".join(self.hosts)]
        self.processes[f"{host}/agents"] = await self.lab.run(
            host, argv, env=self.agent_env(), log=self.logs / host / "agents.log"
        )

    def log_of(self, name: str) -> Path:
        host, what = name.split("/")
        return self.logs / host / f"{what}.log"

    async def _wait_log(self, name: str, text: str, timeout: float = START_TIMEOUT) -> None:
        proc = self.processes[name]
        path = self.log_of(name)

        def logged() -> bool:
            content = path.read_text(errors="replace") if path.exists() else ""
            if text not in content and proc.returncode is not None:
                raise AssertionError(f"{name} ended ({proc.returncode}) before {text!r}:\n{content[-3000:]}")
            return text in content

        await eventually(logged, timeout=timeout, interval=0.2, what=f"{name}: {text!r} in {path}")

    # -- looking -----------------------------------------------------------------------------

    async def etcd_status(self, host: str = CLIENT) -> dict[str, Any]:
        """``mabeam status --etcd <every member> --json`` run in ``host``'s namespace, parsed."""
        code, out, err = await self.lab.output(
            host,
            [sys.executable, "-m", "mabeam.cli", "status", "--etcd", self.etcd_urls, "--json"],
            env=self.client_env(),
        )
        try:
            doc: dict[str, Any] = json.loads(out)
        except ValueError:
            raise AssertionError(f"mabeam status ({code}): {out}{err}") from None
        return doc

    async def wait_etcd_healthy(self, timeout: float) -> None:
        etcdctl = str(Path(etcd_binary()).with_name("etcdctl"))

        async def healthy() -> bool:
            code, _, _ = await self.lab.output(
                CLIENT, [etcdctl, "--endpoints", self.etcd_urls, "endpoint", "health"], env=self._env()
            )
            return code == 0

        await eventually(healthy, timeout=timeout, interval=0.5, what=f"etcd healthy ({self.etcd_urls})")

    async def leader(self) -> str:
        """The host whose etcd member leads, as ``mabeam status`` shows it."""
        members = (await self.etcd_status())["etcd"]["members"]
        for member in members:
            if member.get("leader"):
                return next(h for h in self.hosts if self.etcd_url(h) == member["endpoint"])
        raise AssertionError(f"no etcd leader: {members}")

    async def client(self, *args: str, host: str = CLIENT, timeout: float = 90) -> dict[str, Any]:
        """One command of ``harness/multihost_client.py`` in ``host``'s namespace: its JSON answer."""
        code, out, err = await self.lab.output(
            host, [sys.executable, str(CLIENT_SCRIPT), *args], env=self.client_env(), timeout=timeout
        )
        assert code == 0, f"multihost_client {' '.join(args)} in {host} ({code}): {out}{err[-3000:]}"
        doc: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return doc

    async def spawn_client(self, name: str, *args: str, host: str = CLIENT) -> asyncio.subprocess.Process:
        """A long-running client command (``cas``, ``listing``) in ``host``'s namespace."""
        proc = await self.lab.run(
            host,
            [sys.executable, str(CLIENT_SCRIPT), *args],
            env=self.client_env(),
            log=self.logs / "clients" / f"{name}.log",
        )
        self.processes[f"clients/{name}"] = proc
        return proc
