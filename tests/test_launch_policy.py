"""Launching is not arbitrary: a registry runs its catalog's kinds; free-form argv only with --allow-argv.

The "ShadowRay" attack (a caller that reaches a launch API runs what it likes
on the host) is tried through each way in: StartAgent, MigrateAgent with a
launch spec, and an orchestrator worker pool. Each is refused before
anything is written, and the file its command would create never appears.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from harness.wait import eventually
from mabeam import errors
from mabeam.client import MeshClient
from mabeam.config import MeshConfig
from mabeam.runtime.etcd import EtcdClient
from mabeam.runtime.process import pid_alive
from mabeam.server import MeshServer
from mabeam.v1 import auth_pb2, common_pb2, orchestrator_pb2, registry_pb2

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "examples" / "worker.py")

pytestmark = pytest.mark.timeout(90)

# The catalog's "worker" writes its environment to $ENV_DUMP, then runs examples/worker.py.
DUMP_AND_RUN = (
    "import json, os, runpy, sys; "
    "json.dump(dict(os.environ), open(os.environ['ENV_DUMP'], 'w')); "
    f"sys.argv = [{WORKER!r}] + sys.argv[1:]; "
    f"runpy.run_path({WORKER!r}, run_name='__main__')"
)


def attack(marker: Path) -> registry_pb2.LaunchSpec:
    """What an attacker sends: a command that leaves a file behind."""
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    return registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=[sys.executable, "-c", code]))


@pytest.fixture
def catalog_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A strict registry's settings: a catalog, no --allow-argv, and a registry environment with secrets."""
    path = tmp_path / "agents.yaml"
    path.write_text(
        json.dumps(  # JSON is YAML
            {
                "worker": {
                    "argv": [sys.executable, "-c", DUMP_AND_RUN],
                    "env": {"ENV_DUMP": str(tmp_path / "env.json"), "CATALOG_SAYS": "hello"},
                    "allowed_args": ["--lease-ttl="],
                }
            }
        )
    )
    monkeypatch.delenv("MABEAM_ALLOW_ARGV", raising=False)
    monkeypatch.setenv("MABEAM_AGENT_CATALOG", str(path))
    # In the registry's environment; a launched agent must see none of them.
    monkeypatch.setenv("MABEAM_TEST_SECRET", "registry-only")
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))
    monkeypatch.setenv("LD_PRELOAD", "")
    return path


@pytest.fixture
async def strict_registry(catalog_file: Path, service: Callable[..., Awaitable[MeshServer]]) -> MeshServer:
    return await service("registry")


@pytest.fixture
async def strict(strict_registry: MeshServer) -> AsyncIterator[MeshClient]:
    client = await MeshClient.connect(registry=strict_registry.address)
    yield client
    await client.close()


async def supervised_keys(etcd_client: EtcdClient, config: MeshConfig) -> list[bytes]:
    """Every supervision key of the mesh in etcd (``supervised/<id>``, ``supervised-tokens/<id>``)."""
    return [kv.key for kv in await etcd_client.get_prefix(config.key("supervised"))]


async def start_worker(client: MeshClient, agent_id: str, *args: str) -> registry_pb2.StartAgentResponse:
    return await client.registry.StartAgent(  # type: ignore[no-any-return]
        registry_pb2.StartAgentRequest(
            agent_id=agent_id, launch=registry_pb2.LaunchSpec(kind="worker", args=list(args))
        )
    )


async def stop(client: MeshClient, agent_id: str) -> None:
    await client.registry.StopAgent(registry_pb2.StopAgentRequest(agent_id=agent_id))


async def test_start_agent_with_free_form_argv_is_refused_and_writes_nothing(
    strict: MeshClient, tmp_path: Path, etcd_client: EtcdClient, mesh_config: MeshConfig
) -> None:
    marker = tmp_path / "pwned"
    for launch in (
        attack(marker),
        registry_pb2.LaunchSpec(python_entry_point="harness.sample_agents:make_sample"),
        registry_pb2.LaunchSpec(kind="worker", env={"LD_PRELOAD": "/evil.so"}),
        registry_pb2.LaunchSpec(kind="worker", working_dir=str(tmp_path)),
    ):
        with pytest.raises(errors.PermissionDenied, match="--allow-argv") as info:
            await strict.registry.StartAgent(registry_pb2.StartAgentRequest(agent_id="evil", launch=launch))
        assert info.value.reason == "NOT_AUTHORIZED"
    assert await supervised_keys(etcd_client, mesh_config) == []
    # A legitimate start after it registers: the supervisor had every chance to run the attack.
    started = await start_worker(strict, "good")
    assert started.agent.state == registry_pb2.SUPERVISION_STATE_RUNNING
    listed = await strict.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
    assert [a.agent_id for a in listed.agents] == ["good"]
    assert not marker.exists()
    await stop(strict, "good")


async def test_a_catalog_kind_starts_and_registers_with_a_minimal_environment(
    strict: MeshClient, strict_registry: MeshServer, tmp_path: Path
) -> None:
    started = await start_worker(strict, "k1", "--lease-ttl=3")
    assert started.agent.state == registry_pb2.SUPERVISION_STATE_RUNNING
    assert started.agent.launch.kind == "worker" and list(started.agent.launch.args) == ["--lease-ttl=3"]
    agent = (await strict.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="k1"))).agent
    assert agent.supervised and "compute" in agent.capabilities
    assert agent.lease_ttl.seconds >= 3
    env = json.loads((tmp_path / "env.json").read_text())
    # The catalog's environment and the supervisor's MABEAM_* are there ...
    assert env["CATALOG_SAYS"] == "hello" and env["MABEAM_AGENT_ID"] == "k1"
    assert env["MABEAM_REGISTRY"] and env["MABEAM_AGENT_TOKEN"]
    # ... the registry's own environment is not.
    for name in ("MABEAM_TEST_SECRET", "PYTHONPATH", "LD_PRELOAD", "MABEAM_AGENT_CATALOG"):
        assert name not in env, name
    # Its credential is its own (role agent, this id only), not the admin token in the registry's environment.
    assert env["MABEAM_TOKEN"] != os.environ["MABEAM_TOKEN"]
    as_agent = await MeshClient.connect(registry=strict_registry.address, token=env["MABEAM_TOKEN"])
    try:
        me = (await as_agent.auth.WhoAmI(auth_pb2.WhoAmIRequest())).principal
    finally:
        await as_agent.close()
    assert me.role == auth_pb2.ROLE_AGENT and me.agent_pattern == "k1"
    assert set(env) - {"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "ENV_DUMP", "CATALOG_SAYS"} <= {
        n for n in env if n.startswith(("MABEAM_", "LC_"))
    } | {"PYTHONUNBUFFERED"}
    await stop(strict, "k1")


async def test_a_disallowed_extra_arg_or_unknown_kind_is_refused(
    strict: MeshClient, etcd_client: EtcdClient, mesh_config: MeshConfig
) -> None:
    with pytest.raises(errors.PermissionDenied, match=r"launch\.args\[1\]: '--port=1'.*--lease-ttl=") as info:
        await start_worker(strict, "k2", "--lease-ttl=3", "--port=1")
    assert "'--port=1'" in info.value.message
    with pytest.raises(errors.NotFound, match=r"'shell'.*--agent-catalog .*agents\.yaml"):
        await strict.registry.StartAgent(
            registry_pb2.StartAgentRequest(agent_id="k2", launch=registry_pb2.LaunchSpec(kind="shell"))
        )
    assert await supervised_keys(etcd_client, mesh_config) == []


async def test_migrate_agent_with_a_free_form_launch_is_refused(strict: MeshClient, tmp_path: Path) -> None:
    started = await start_worker(strict, "mover")
    marker = tmp_path / "pwned"
    with pytest.raises(errors.PermissionDenied, match="--allow-argv"):
        await strict.registry.MigrateAgent(
            registry_pb2.MigrateAgentRequest(agent_id="mover", token=started.token, launch=attack(marker))
        )
    # The agent was not touched: same process, same launch, same registration.
    listed = await strict.registry.ListSupervisedAgents(registry_pb2.ListSupervisedAgentsRequest())
    (record,) = listed.agents
    assert record.pid == started.agent.pid and record.launch.kind == "worker"
    assert record.state == registry_pb2.SUPERVISION_STATE_RUNNING
    agent = (await strict.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="mover"))).agent
    assert agent.generation == 1
    # A migration to the kind works, and by then the attack would long have run.
    moved = await strict.registry.MigrateAgent(
        registry_pb2.MigrateAgentRequest(
            agent_id="mover", token=started.token, launch=registry_pb2.LaunchSpec(kind="worker")
        )
    )
    assert moved.agent.generation == 2
    assert not marker.exists()
    await eventually(lambda: not pid_alive(started.agent.pid), timeout=10, what="old process retired")
    await stop(strict, "mover")


async def test_a_worker_pool_with_free_form_argv_is_refused_at_bind_time(
    catalog_file: Path,
    service: Callable[..., Awaitable[MeshServer]],
    tmp_path: Path,
    etcd_client: EtcdClient,
    mesh_config: MeshConfig,
) -> None:
    registry = await service("registry")
    coordination = await service("coordination")
    orchestrator = await service("orchestrator")
    client = await MeshClient.connect(
        registry=registry.address, coordination=coordination.address, orchestrator=orchestrator.address
    )
    marker = tmp_path / "pwned"

    def binding(launch: registry_pb2.LaunchSpec) -> orchestrator_pb2.BindVariableRequest:
        return orchestrator_pb2.BindVariableRequest(
            binding=orchestrator_pb2.OrchestrationBinding(
                variable="pool/size",
                protocol="consensus",
                participants=common_pb2.AgentSelector(capability="size"),
                kind=orchestrator_pb2.BINDING_KIND_RESOURCE_ALLOCATION,
                worker_pool=orchestrator_pb2.WorkerPool(launch=launch, agent_id_prefix="pool"),
            )
        )

    try:
        with pytest.raises(errors.PermissionDenied, match=r"binding\.worker_pool: launch\.command"):
            await client.orchestrator.BindVariable(binding(attack(marker)))
        with pytest.raises(errors.NotFound, match="'shell'"):
            await client.orchestrator.BindVariable(binding(registry_pb2.LaunchSpec(kind="shell")))
        with pytest.raises(errors.PermissionDenied, match=r"args\[0\]"):
            await client.orchestrator.BindVariable(
                binding(registry_pb2.LaunchSpec(kind="worker", args=["--port=1"]))
            )
        bindings = await client.orchestrator.ListBindings(orchestrator_pb2.ListBindingsRequest())
        assert not bindings.bindings
        # A pool of a catalog kind binds; checking it started nothing.
        await client.orchestrator.BindVariable(binding(registry_pb2.LaunchSpec(kind="worker")))
        bindings = await client.orchestrator.ListBindings(orchestrator_pb2.ListBindingsRequest())
        assert [b.variable for b in bindings.bindings] == ["pool/size"]
        assert await supervised_keys(etcd_client, mesh_config) == []
        assert not marker.exists()
    finally:
        await client.close()


async def test_start_validate_only_checks_and_writes_nothing(
    strict: MeshClient, etcd_client: EtcdClient, mesh_config: MeshConfig
) -> None:
    answer = await strict.registry.StartAgent(
        registry_pb2.StartAgentRequest(
            agent_id="v1", launch=registry_pb2.LaunchSpec(kind="worker"), validate_only=True
        )
    )
    assert not answer.agent.agent_id and not answer.token
    assert await supervised_keys(etcd_client, mesh_config) == []


async def test_allow_argv_still_runs_free_form_launches_with_the_requests_env(
    service: Callable[..., Awaitable[MeshServer]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MABEAM_ALLOW_ARGV", "1")
    monkeypatch.setenv("MABEAM_TEST_SECRET", "registry-only")
    registry = await service("registry")
    client = await MeshClient.connect(registry=registry.address)
    try:
        dump = tmp_path / "env.json"
        launch = registry_pb2.LaunchSpec(
            command=registry_pb2.Command(argv=[sys.executable, "-c", DUMP_AND_RUN]),
            env={"ENV_DUMP": str(dump), "FROM_REQUEST": "yes"},
        )
        started = await client.registry.StartAgent(
            registry_pb2.StartAgentRequest(agent_id="dev", launch=launch)
        )
        assert started.agent.state == registry_pb2.SUPERVISION_STATE_RUNNING
        env: dict[str, Any] = json.loads(dump.read_text())
        assert env["FROM_REQUEST"] == "yes" and "MABEAM_TEST_SECRET" not in env
        await stop(client, "dev")
    finally:
        await client.close()


def test_a_bad_catalog_stops_the_registry_at_start_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("echo: {argv: []}\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mabeam.services.registry",
            "--etcd",
            "http://127.0.0.1:1",
            "--no-auth",
            "--agent-catalog",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    record = json.loads(result.stderr.strip().splitlines()[-1])
    assert record["message"] == f"mabeam registry: agent catalog {bad}: kind 'echo': argv must not be empty"


async def test_local_mesh_passes_the_catalog_and_allow_argv_to_its_registries(
    catalog_file: Path,
    local_mesh: Callable[..., Awaitable[Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What `mabeam up --agent-catalog FILE [--allow-argv]` starts: registries launching what the flags say."""
    monkeypatch.delenv("MABEAM_AGENT_CATALOG")  # from the flag only
    mesh = await local_mesh(services=("registry",), agent_catalog=str(catalog_file))
    client = await MeshClient.connect(registry=mesh.address("registry"))
    try:
        marker = tmp_path / "pwned"
        with pytest.raises(errors.PermissionDenied, match="--allow-argv"):
            await client.registry.StartAgent(
                registry_pb2.StartAgentRequest(agent_id="evil", launch=attack(marker))
            )
        started = await start_worker(client, "via-up")
        assert started.agent.state == registry_pb2.SUPERVISION_STATE_RUNNING
        assert not marker.exists()
        await stop(client, "via-up")
    finally:
        await client.close()


def test_mabeam_up_refuses_a_bad_catalog_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("echo: {argv: [x], allowed_args: --v}\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mabeam.cli",
            "up",
            "--agent-catalog",
            str(bad),
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"mabeam up: agent catalog {bad}: kind 'echo': allowed_args must be a list of strings"
    )


@pytest.mark.parametrize("caller", ["nobody", "operator"])
async def test_the_shadowray_attack_by_a_stranger_or_an_operator_is_refused_even_with_allow_argv(
    caller: str,
    service: Callable[..., Awaitable[MeshServer]],
    tmp_path: Path,
    etcd_client: EtcdClient,
    mesh_config: MeshConfig,
) -> None:
    """Even a registry that runs free-form argv (the test session's MABEAM_ALLOW_ARGV=1) launches
    nothing for a caller without credentials or with an operator token: not through StartAgent,
    not through MigrateAgent with a launch spec, not through a worker-pool binding."""
    assert os.environ.get("MABEAM_ALLOW_ARGV") == "1"  # only auth stands in the way here
    registry = await service("registry")
    coordination = await service("coordination")
    orchestrator = await service("orchestrator")
    addresses = {
        "registry": registry.address,
        "coordination": coordination.address,
        "orchestrator": orchestrator.address,
    }
    admin = await MeshClient.connect(**addresses)
    token = ""
    if caller == "operator":
        token = (
            await admin.auth.CreateToken(auth_pb2.CreateTokenRequest(name="ops", role=auth_pb2.ROLE_OPERATOR))
        ).token
    stranger = await MeshClient.connect(**addresses, token=token)
    if token:  # every service learns the new token from its watch: wait until both know it

        async def known() -> bool:
            try:
                await stranger.registry.ListAgents(registry_pb2.ListAgentsRequest())
                await stranger.orchestrator.ListVariables(orchestrator_pb2.ListVariablesRequest())
            except errors.Unauthenticated:
                return False
            return True

        await eventually(known, timeout=10, interval=0.05, what="the operator token known to every service")
    refused = errors.Unauthenticated if caller == "nobody" else errors.PermissionDenied
    marker = tmp_path / "pwned"
    try:
        # A live supervised agent to aim MigrateAgent at (its token is known: the worst case).
        target = await admin.registry.StartAgent(
            registry_pb2.StartAgentRequest(
                agent_id="victim",
                launch=registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=[sys.executable, WORKER])),
            )
        )
        before = await supervised_keys(etcd_client, mesh_config)
        with pytest.raises(refused):
            await stranger.registry.StartAgent(
                registry_pb2.StartAgentRequest(agent_id="evil", launch=attack(marker))
            )
        with pytest.raises(refused):
            await stranger.registry.MigrateAgent(
                registry_pb2.MigrateAgentRequest(agent_id="victim", token=target.token, launch=attack(marker))
            )
        with pytest.raises(refused):
            await stranger.orchestrator.BindVariable(
                orchestrator_pb2.BindVariableRequest(
                    binding=orchestrator_pb2.OrchestrationBinding(
                        variable="pool/size",
                        protocol="consensus",
                        participants=common_pb2.AgentSelector(capability="size"),
                        kind=orchestrator_pb2.BINDING_KIND_RESOURCE_ALLOCATION,
                        worker_pool=orchestrator_pb2.WorkerPool(
                            launch=attack(marker), agent_id_prefix="pool"
                        ),
                    )
                )
            )
        assert not (await admin.orchestrator.ListBindings(orchestrator_pb2.ListBindingsRequest())).bindings
        assert await supervised_keys(etcd_client, mesh_config) == before
        # A legitimate start after it registers: the supervisor had every chance to run the attack.
        await admin.registry.StartAgent(
            registry_pb2.StartAgentRequest(
                agent_id="good",
                launch=registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=[sys.executable, WORKER])),
            )
        )
        agent = (await admin.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="victim"))).agent
        assert agent.generation == 1  # not migrated
        assert not marker.exists()
        for agent_id in ("victim", "good"):
            await stop(admin, agent_id)
    finally:
        await stranger.close()
        await admin.close()


async def test_a_supervised_agents_credential_dies_with_the_registry_replica_that_minted_it(
    strict: MeshClient, etcd_client: EtcdClient, mesh_config: MeshConfig
) -> None:
    """Bound to the replica's lease: a registry killed outright leaves no agent credential in etcd."""
    await start_worker(strict, "k9")
    records = await etcd_client.get_prefix(mesh_config.key("auth", "principals") + b"/")
    (credential,) = [kv for kv in records if json.loads(kv.value)["name"] == "supervised:k9"]
    assert credential.lease != 0
    info = await etcd_client.get_lease_info(credential.lease)
    assert 0 < info.TTL <= mesh_config.service_ttl
    await stop(strict, "k9")
