"""The `mabeam` command against a mesh on TLS: --tls-ca/--tls-cert/--tls-key (and their variables),
--etcd-ca/--etcd-cert/--etcd-key for discovery, one-line failures without TLS or with a wrong CA,
and `mabeam status` listing every replica discovery knows of."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from harness.certs import make_certs
from harness.cli import mabeam
from harness.sample_agents import SecureBidder
from harness.wait import eventually
from mabeam.agent import AgentHost
from mabeam.config import SERVICES, MeshConfig
from mabeam.runtime.embedded_etcd import EmbeddedEtcd
from mabeam.runtime.mesh import LocalMesh
from mabeam.server import MeshServer
from mabeam.tls import TLS

pytestmark = pytest.mark.timeout(120)


def the_error(err: str) -> str:
    """The command's own message on stderr (grpc may log handshake failures there too): one line, no traceback."""
    assert "Traceback" not in err, err
    ours = [line for line in err.splitlines() if line.startswith("mabeam")]
    assert len(ours) == 1, err
    return ours[0]


@pytest.fixture
async def tls_mesh(
    tmp_path: Path, mesh_config: MeshConfig, service: Callable[..., Awaitable[MeshServer]]
) -> AsyncIterator[tuple[MeshConfig, dict[str, str], list[str]]]:
    """The four services on mutual TLS (auth on: $MABEAM_TOKEN is the admin's), two bidders on TLS;
    yields the config, the PEM files and the services' address flags."""
    pem = make_certs(tmp_path)
    tls = TLS(cert_file=pem["server"], key_file=pem["server-key"], ca_file=pem["ca"])
    config = replace(mesh_config, tls=tls)
    servers = {kind: await service(kind, config) for kind in SERVICES}
    host = AgentHost(
        [SecureBidder("s1", 3), SecureBidder("s2", 8)],
        registry=servers["registry"].address,
        tls=tls,
        client_tls=config.client_tls(),
    )
    await host.start()
    try:
        yield config, pem, [arg for kind, s in servers.items() for arg in (f"--{kind}", s.address)]
    finally:
        await host.stop()


async def test_every_command_speaks_tls_with_tls_ca(
    tls_mesh: tuple[MeshConfig, dict[str, str], list[str]], etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    config, pem, where = tls_mesh
    tls = ["--tls-ca", pem["ca"], "--tls-cert", pem["client"], "--tls-key", pem["client-key"]]

    code, out, err = await mabeam("status", *where, *tls)
    assert code == 0 and out.count("SERVING") == 4 and "agents=2" in out, out + err
    # Through discovery (the services publish their addresses in etcd), the table as JSON.
    code, out, err = await mabeam(
        "status", "--etcd", etcd.endpoint, "--prefix", config.prefix, *tls, "--json"
    )
    doc = json.loads(out)
    assert code == 0 and doc["discovery"] == "etcd" and doc["counts"]["agents"] == 2, out + err
    assert all(len(rows) == 1 and rows[0]["serving"] for rows in doc["replicas"].values()), doc

    # An etcd that does not answer: status still reports (exit 1, saying why), the others fail in one line.
    code, out, err = await mabeam("status", "--etcd", "http://127.0.0.1:9", *tls, "--json")
    doc = json.loads(out)
    assert code == 1 and "did not list the services" in doc["discovery_error"], out + err
    code, _, err = await mabeam("agents", "--etcd", "http://127.0.0.1:9", *tls)
    assert code == 1 and "check --etcd" in the_error(err), err

    code, out, err = await mabeam("agents", *where, *tls, "--capability", "secure")
    assert code == 0 and "s1" in out and "s2" in out, out + err
    code, out, err = await mabeam("vars", *where, *tls, "set", "room/temp", "21.5")
    assert code == 0 and "room/temp = 21.5 (version 1)" in out, out + err
    code, out, err = await mabeam("auction", "lamp", *where, *tls, "--capability", "secure")
    assert code == 0 and "winner s2" in out and "DECIDED" in out, out + err
    code, out, err = await mabeam("auth", "whoami", *where, *tls)
    assert code == 0 and " admin" in out, out + err
    code, out, err = await mabeam("goal", "status", "no-such-goal", *where, *tls)
    assert code == 1 and "NOT_FOUND" in the_error(err), err  # the planner answered, over TLS

    # The client's variables (not the services' MABEAM_TLS_*), and the flags anywhere on the line.
    env = {
        "MABEAM_CLIENT_TLS_CA": pem["ca"],
        "MABEAM_CLIENT_TLS_CERT": pem["client"],
        "MABEAM_CLIENT_TLS_KEY": pem["client-key"],
        "MABEAM_CLIENT_TLS_SERVER_NAME": "localhost",  # the certificate names localhost and 127.0.0.1
    }
    code, out, err = await mabeam("vars", "get", "room/temp", *where, env=env)
    assert code == 0 and "room/temp = 21.5" in out, out + err
    code, out, err = await mabeam(*tls[:2], "vars", *tls[2:4], "get", "room/temp", *tls[4:], *where)
    assert code == 0 and "room/temp = 21.5" in out, out + err
    code, _, err = await mabeam("vars", "get", "room/temp", *where, *tls, "--tls-server-name", "elsewhere")
    assert code == 1 and "TLS failed" in the_error(err), err

    # Plaintext to a TLS mesh: one line saying to pass --tls-ca.
    code, _, err = await mabeam("agents", *where)
    line = the_error(err)
    assert code == 1 and "UNAVAILABLE" in line and "pass --tls-ca" in line, err
    code, out, _ = await mabeam("status", *where)
    assert code == 1 and out.count("DOWN") == 4 and out.count("pass --tls-ca") == 4, out
    # TLS, but no client certificate where the services require one.
    code, _, err = await mabeam("vars", "get", "room/temp", *where, "--tls-ca", pem["ca"])
    assert code == 1 and "--tls-cert/--tls-key" in the_error(err), err
    # A CA the services' certificates do not chain to.
    (tmp_path / "other").mkdir()
    other = make_certs(tmp_path / "other")
    code, _, err = await mabeam(
        "agents",
        *where,
        "--tls-ca",
        other["ca"],
        "--tls-cert",
        other["client"],
        "--tls-key",
        other["client-key"],
    )
    line = the_error(err)
    assert code == 1 and "TLS failed" in line and "--tls-ca" in line, err
    # A file that is not there, and a certificate without its key: named, before any call.
    code, _, err = await mabeam("agents", *where, "--tls-ca", str(tmp_path / "missing.pem"))
    assert code == 1 and "--tls-ca" in the_error(err) and "missing.pem" in the_error(err), err
    code, _, err = await mabeam("agents", *where, "--tls-ca", pem["ca"], "--tls-cert", pem["client"])
    assert code == 1 and "--tls-key" in the_error(err), err


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_status_lists_every_replica_and_says_degraded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutual TLS on etcd and on the services, two registry replicas: `mabeam status --etcd` shows both;
    one killed shows DOWN (exit 3, degraded) until its lease runs out, then it is gone (exit 0)."""
    pem = make_certs(tmp_path)
    etcd = EmbeddedEtcd(
        unsafe_no_fsync=True, cert_file=pem["server"], key_file=pem["server-key"], trusted_ca_file=pem["ca"]
    )
    tls = TLS(cert_file=pem["server"], key_file=pem["server-key"], ca_file=pem["ca"])
    client_pem = (pem["client"], pem["client-key"])
    async with etcd:
        config = MeshConfig(
            etcd_endpoints=(etcd.endpoint,),
            prefix="/cli-tls",
            ports={s: 0 for s in SERVICES},
            grace=0.5,
            service_ttl=15,  # a killed replica stays listed this long: long enough to be seen DOWN
            tls=tls,
            etcd_tls=TLS(ca_file=pem["ca"], cert_file=client_pem[0], key_file=client_pem[1]),
            data_dir=tmp_path / "data",
        )
        mesh = LocalMesh(config, log_dir=tmp_path / "logs")
        await mesh.start(timeout=60)
        try:
            monkeypatch.setenv("MABEAM_TOKEN", mesh.admin_token or "")
            await mesh.start_replica("registry", timeout=60)
            first, second = mesh.replicas_of("registry")
            flags = [
                *("--etcd", etcd.endpoint, "--prefix", config.prefix),
                *("--etcd-ca", pem["ca"], "--etcd-cert", client_pem[0], "--etcd-key", client_pem[1]),
                *("--tls-ca", pem["ca"], "--tls-cert", client_pem[0], "--tls-key", client_pem[1]),
            ]

            code, out, err = await mabeam("status", *flags, "--json")
            doc = json.loads(out)
            assert code == 0, out + err
            assert sorted(r["address"] for r in doc["replicas"]["registry"]) == sorted(
                [first.address, second.address]
            )
            assert all(r["serving"] for rows in doc["replicas"].values() for r in rows), doc
            code, out, err = await mabeam("status", *flags)
            assert code == 0 and out.count("SERVING") == 5, out + err
            assert first.address in out and second.address in out

            # A crash: the replica's endpoint key stays until its lease expires.
            second.proc.kill()
            second.proc.wait()
            code, out, err = await mabeam("status", *flags, "--json")
            doc = json.loads(out)
            assert code == 3, out + err  # degraded: the registry is still served by the first
            rows = {r["address"]: r for r in doc["replicas"]["registry"]}
            assert rows[first.address]["serving"] and not rows[second.address]["serving"], rows
            assert doc["services"]["registry"] == {
                "address": first.address,
                "serving": True,
                "store_writable": True,
            }
            code, out, _ = await mabeam("status", *flags)
            assert code == 3 and f"{second.address}" in out and "DOWN" in out, out

            async def gone() -> bool:
                code, out, _ = await mabeam("status", *flags, "--json")
                listed = [r["address"] for r in json.loads(out)["replicas"]["registry"]]
                return code == 0 and listed == [first.address]

            await eventually(gone, timeout=40, what="the killed replica gone from discovery, status 0")
        finally:
            await mesh.stop()
