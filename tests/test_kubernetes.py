"""deploy/kubernetes/: every manifest valid for a pinned Kubernetes, and every container command runs.

No cluster runs here, so the manifests are checked offline against the
OpenAPI schemas of Kubernetes 1.30 (``kubernetes-validate``, strict: an
unknown field fails), what users rely on is asserted on the parsed objects,
and each container's command and environment are started as local processes
against the test etcd (as tests/test_compose.py does for compose.yaml): the
in-cluster addresses point at this machine, the pod IP is 127.0.0.1, and the
Secrets' files (made here as docs/kubernetes.md makes them) sit at local
paths in place of the mount points.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.local_commands import local_command
from harness.wait import eventually
from mabeam.client import MeshClient
from mabeam.config import SERVICE_NAMES, SERVICES
from mabeam.credentials import read_token_file
from mabeam.health_check import check
from mabeam.runtime.embedded_etcd import EmbeddedEtcd, free_port
from mabeam.server import port_is_free
from mabeam.tls import TLS
from mabeam.v1 import common_pb2, coordination_pb2, registry_pb2

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"
# The Secrets the manifests mount: name -> {key: file of `mabeam auth init`'s folder or of the certificates}.
SECRETS = {
    "mabeam-tls": {"ca.crt": "ca.crt", "tls.crt": "tls.crt", "tls.key": "tls.key"},
    "mabeam-service-token": {"service.token": "service.token"},
    "mabeam-agent-token": {"agent.token": "agent.token"},
}
pytestmark = pytest.mark.timeout(120)


def manifests() -> dict[str, list[dict[str, Any]]]:
    """Each YAML file of the folder but kustomization.yaml -> its objects."""
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(FOLDER.glob("*.yaml"))
        if path.name != "kustomization.yaml"
    }


def objects(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for docs in manifests().values() for o in docs if o["kind"] == kind}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def compose_etcd_upkeep() -> list[str]:
    """compose.yaml's etcd flags that are not about where it listens or who its peers are."""
    from test_compose import compose_config

    command = compose_config()["services"]["etcd"]["command"]
    return [
        f for f in command if f.startswith(("--auto-compaction", "--quota", "--experimental", "--snapshot"))
    ]


def test_every_manifest_is_valid_for_kubernetes_1_30() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    found = manifests()
    assert found, "no manifests in deploy/kubernetes"
    for name, docs in found.items():
        for doc in docs:
            assert doc["metadata"].get("namespace", "mabeam") == "mabeam", (name, doc["metadata"])
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at {exc.path}")
    kustomization = yaml.safe_load((FOLDER / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert sorted(listed) == sorted(found) and len(listed) == len(set(listed)), (
        "kustomization.yaml's resources"
    )
    text = "\n".join(p.read_text() for p in FOLDER.glob("*.yaml"))
    assert "MABEAM_INSECURE" not in text and "mbt_" not in text and "PRIVATE KEY" not in text
    assert not objects("Secret"), "Secrets are made by hand (docs/kubernetes.md), never kept in a manifest"


def test_the_services_are_replicated_probed_bounded_and_on_tls() -> None:
    deployments = objects("Deployment")
    budgets = objects("PodDisruptionBudget")
    for name in SERVICES:
        deployment = deployments[name]
        assert deployment["spec"]["replicas"] >= 2, name
        pod = deployment["spec"]["template"]["spec"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["mabeam.io/role"] == "service"
        (container,) = pod["containers"]
        env = env_of(container)
        health = int(env["MABEAM_HEALTH_PORT"])
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": health, "service": SERVICE_NAMES[name]}, (name, probe)
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(
            resources["limits"]
        )
        assert env["MABEAM_ADVERTISE_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert env["MABEAM_HOST"] == "0.0.0.0"
        assert "MABEAM_INSECURE" not in env and "MABEAM_AUTH" not in env
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        for variable in ("MABEAM_TLS_CERT", "MABEAM_TLS_KEY", "MABEAM_TLS_CA", "MABEAM_TOKEN_FILE"):
            mount = mounts[str(Path(env[variable]).parent)]
            assert mount["readOnly"], (name, variable)
            secret = volumes[mount["name"]]["secret"]["secretName"]
            assert Path(env[variable]).name in SECRETS[secret], (name, variable, secret)
        assert volumes[mounts["/etc/mabeam/token"]["name"]]["secret"]["secretName"] == "mabeam-service-token"
        budget = budgets[name]["spec"]
        assert budget["minAvailable"] == 1 and budget["selector"]["matchLabels"].items() <= labels.items()
        service = objects("Service")[name]["spec"]
        assert service["selector"].items() <= labels.items()
        assert [p["port"] for p in service["ports"]] == [int(container["command"][-1])]


def test_etcd_has_three_members_apart_on_volumes_with_composes_upkeep() -> None:
    etcd = objects("StatefulSet")["etcd"]["spec"]
    assert etcd["replicas"] == 3 and etcd["serviceName"] == "etcd"
    pod = etcd["template"]["spec"]
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    assert anti[0]["labelSelector"]["matchLabels"].items() <= etcd["template"]["metadata"]["labels"].items()
    assert etcd["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    (container,) = pod["containers"]
    assert container["image"] == "quay.io/coreos/etcd:v3.5.17"
    assert {m["name"] for m in container["volumeMounts"]} == {"data"}
    # The same upkeep as compose.yaml's etcd: they cannot drift apart.
    upkeep = [
        f for f in container["command"] if f.split("=")[0] in {u.split("=")[0] for u in compose_etcd_upkeep()}
    ]
    assert upkeep == compose_etcd_upkeep()
    assert objects("PodDisruptionBudget")["etcd"]["spec"]["maxUnavailable"] == 1
    members = [f"etcd-{i}=http://etcd-{i}.etcd.mabeam.svc:2380" for i in range(3)]
    assert f"--initial-cluster={','.join(members)}" in container["command"]
    for name in SERVICES:
        (service,) = objects("Deployment")[name]["spec"]["template"]["spec"]["containers"]
        assert env_of(service)["MABEAM_ETCD"] == ",".join(f"http://etcd-{i}.etcd:2379" for i in range(3))


def test_every_workload_has_a_disruption_budget_and_the_policy_denies_by_default() -> None:
    budgets = objects("PodDisruptionBudget")
    for kind in ("Deployment", "StatefulSet"):
        for name, workload in objects(kind).items():
            selector = workload["spec"]["selector"]["matchLabels"]
            assert any(b["spec"]["selector"]["matchLabels"] == selector for b in budgets.values()), name
    policies = objects("NetworkPolicy")
    deny = policies["default-deny-ingress"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    ports = {
        name: [(r.get("from"), [p["port"] for p in r["ports"]]) for r in policy["spec"]["ingress"]]
        for name, policy in policies.items()
        if "ingress" in policy["spec"]
    }
    role = lambda r: {"podSelector": {"matchLabels": {"mabeam.io/role": r}}}  # noqa: E731
    assert ports["etcd"] == [([role("service")], [2379]), ([role("etcd")], [2380]), (None, [2381])]
    assert ports["services"] == [
        ([role("service"), role("agent")], [50051, 50052, 50053, 50054]),
        (None, [8081]),
    ]
    assert ports["agents"] == [([role("service")], [7001])]


def make_mesh_certificate(directory: Path, name: str) -> None:
    """ca.crt, and tls.crt / tls.key valid for the DNS name ``name`` only (not 127.0.0.1)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def issue(cn: str, signer: Any, issuer: Any, ca: bool) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer or subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            ).add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        return key, builder.sign(signer or key, hashes.SHA256())

    ca_key, ca_cert = issue("mabeam-ca", None, None, True)
    key, cert = issue(name, ca_key, ca_cert.subject, False)
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def test_the_docs_make_the_secrets_the_manifests_mount() -> None:
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    assert "mabeam auth init --etcd http://127.0.0.1:2379 --dir mabeam-credentials --agent-token" in docs
    for secret, files in SECRETS.items():
        made = re.search(
            rf"kubectl -n mabeam create secret generic {secret}((?: \\\n)?(?: +--from-file=\S+)+)", docs
        )
        assert made, f"docs/kubernetes.md does not make the Secret {secret}"
        assert sorted(re.findall(r"--from-file=([^=\s]+)=", made.group(1))) == sorted(files), secret
    assert "admin.token" not in " ".join(re.findall(r"create secret generic .*", docs))


def local_pod(
    container: dict[str, Any],
    pod: dict[str, Any],
    secrets: dict[str, Path],
    scratch: Path,
    args: dict[str, str],
    values: dict[str, str],
    pod_name: str,
) -> tuple[list[str], dict[str, str]]:
    """A container's command and environment as a local process: its volumes' files at local paths,
    the downward API's pod IP as 127.0.0.1 and its name as ``pod_name``."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "secret" in volume:
            mounts[mount["mountPath"]] = str(secrets[volume["secret"]["secretName"]])
        else:
            assert "emptyDir" in volume, volume
            mounts[mount["mountPath"]] = str(scratch / mount["name"])
    downward = {"status.podIP": "127.0.0.1", "metadata.name": pod_name}
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            env[entry["name"]] = downward[entry["valueFrom"]["fieldRef"]["fieldPath"]]
    return local_command(container["command"], env, args, values, mounts)


async def test_every_container_command_runs_against_a_real_etcd(etcd: EmbeddedEtcd, tmp_path: Path) -> None:
    deployments = objects("Deployment")
    prefix = f"/kubernetes-{os.getpid()}"
    started: list[asyncio.subprocess.Process] = []
    # The Secrets, made as docs/kubernetes.md says: `mabeam auth init` through a port-forward to etcd
    # (here: the test etcd), then one folder per Secret holding its keys.
    (tmp_path / "certs").mkdir()
    server_name = env_of(deployments["registry"]["spec"]["template"]["spec"]["containers"][0])[
        "MABEAM_TLS_SERVER_NAME"
    ]
    make_mesh_certificate(tmp_path / "certs", server_name)
    credentials = tmp_path / "mabeam-credentials"
    argv, env = local_command(
        ["mabeam", "auth", "init", "--etcd", etcd.endpoint, "--dir", str(credentials), "--agent-token"],
        {},
        {},
    )
    env["MABEAM_PREFIX"] = prefix
    made = await asyncio.create_subprocess_exec(*argv, env=env, cwd=ROOT, stdout=subprocess.PIPE)
    out, _ = await asyncio.wait_for(made.communicate(), 60)
    assert made.returncode == 0, out
    secrets: dict[str, Path] = {}
    for secret, files in SECRETS.items():
        folder = secrets[secret] = tmp_path / "secrets" / secret
        folder.mkdir(parents=True)
        for key, source in files.items():
            origin = (tmp_path / "certs" / source) if secret == "mabeam-tls" else credentials / source
            (folder / key).write_bytes(origin.read_bytes())
    etcd_members = {",".join(f"http://etcd-{i}.etcd:2379" for i in range(3)): etcd.endpoint}
    addresses: dict[str, str] = {}
    health: dict[str, str] = {}
    try:
        for name in SERVICES:
            pod = deployments[name]["spec"]["template"]["spec"]
            (container,) = pod["containers"]
            declared = container["command"][-1]
            probe_port = str(container["readinessProbe"]["grpc"]["port"])
            # The ports are picked here and bound by the service: another process may take one in
            # between, and the service then exits: try other ones.
            for _ in range(3):
                port, health_port = str(free_port()), str(free_port())
                values = {**etcd_members, "0.0.0.0": "127.0.0.1", probe_port: health_port}
                argv, env = local_pod(
                    container, pod, secrets, tmp_path / name, {declared: port}, values, f"{name}-0"
                )
                env["MABEAM_PREFIX"] = prefix
                proc = await asyncio.create_subprocess_exec(
                    *argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT
                )
                started.append(proc)
                assert proc.stdout is not None
                line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
                if line or (
                    port_is_free("127.0.0.1", int(port)) and port_is_free("127.0.0.1", int(health_port))
                ):
                    break
                await proc.wait()  # it ended without a word, a port taken: again, on others
            assert f"mabeam {name} serving on 127.0.0.1:{port}" in line, line
            addresses[name], health[name] = f"127.0.0.1:{port}", f"127.0.0.1:{health_port}"
        # The example agent: the registry's Service name points at the registry started here.
        agent = deployments["bidder"]["spec"]["template"]["spec"]
        (container,) = agent["containers"]
        declared = container["command"][container["command"].index("--port") + 1]
        values = {"registry:50051": addresses["registry"], "0.0.0.0": "127.0.0.1"}
        argv, env = local_pod(
            container, agent, secrets, tmp_path / "bidder", {declared: "0"}, values, "bidder-0"
        )
        env["MABEAM_PREFIX"] = prefix
        started.append(
            await asyncio.create_subprocess_exec(*argv, env=env, stdout=subprocess.DEVNULL, cwd=ROOT)
        )
        # The operator's client: mutual TLS, checking the mesh's name (the certificate names no address).
        tls = TLS(
            ca_file=str(secrets["mabeam-tls"] / "ca.crt"),
            cert_file=str(secrets["mabeam-tls"] / "tls.crt"),
            key_file=str(secrets["mabeam-tls"] / "tls.key"),
            server_name=server_name,
        )
        client = await MeshClient.connect(
            registry=addresses["registry"],
            coordination=addresses["coordination"],
            tls=tls,
            token=read_token_file(credentials / "admin.token"),
        )
        try:

            async def registered() -> bool:
                page = await client.registry.ListAgents(registry_pb2.ListAgentsRequest(capability="bid"))
                return [(a.agent_id, a.status) for a in page.agents] == [
                    ("bidder-0", registry_pb2.AGENT_STATUS_SERVING)
                ]

            await eventually(registered, timeout=30, what="the example agent registered, serving")
            # Coordination dials the agent at its advertised address over TLS: the bid comes back.
            session = (
                await client.coordination.RunAuction(
                    coordination_pb2.RunAuctionRequest(
                        settings=coordination_pb2.SessionSettings(
                            participants=common_pb2.AgentSelector(capability="bid")
                        ),
                        type=coordination_pb2.AUCTION_TYPE_SECOND_PRICE,
                        item="k8s",
                    )
                )
            ).session
            assert list(session.outcome.winners) == ["bidder-0"] and not session.excluded, session
        finally:
            await client.close()
        # The kubelet's probes: plaintext gRPC health on the health port, naming the service.
        for name in SERVICES:
            assert await check(health[name], SERVICE_NAMES[name]), f"{name} is not SERVING on its health port"
    finally:
        for proc in started:
            with contextlib.suppress(ProcessLookupError):  # ended already
                proc.terminate()
        for proc in started:
            await asyncio.wait_for(proc.wait(), 15)
