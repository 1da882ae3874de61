from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Set before grpc loads: tests fork etcd, services and agents from a process
# running grpc threads; grpc's fork handlers only log noise there.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import pytest
from hypothesis import settings

pytest_plugins = [
    "harness.leak_fixtures",
    "harness.etcd_fixtures",
    "harness.mesh_fixtures",
    "harness.cluster_fixtures",
]

# Hypothesis in CI: the same examples on every run (derandomize; nothing to keep
# in a database between runs) and, on a failure, the blob that replays it
# (``@reproduce_failure``); no deadline, as a loaded runner is slow at random.
# Locally the default: random examples, a local example database.
settings.register_profile("ci", derandomize=True, print_blob=True, database=None, deadline=None)
if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
    settings.load_profile("ci")


@pytest.fixture(scope="session", autouse=True)
def _agent_logs_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Supervised agents started by in-process registries log here, not under ~/.mabeam/logs."""
    logs = tmp_path_factory.mktemp("logs")
    previous = os.environ.get("MABEAM_LOG_DIR")
    os.environ["MABEAM_LOG_DIR"] = str(logs)
    yield logs
    if previous is None:
        os.environ.pop("MABEAM_LOG_DIR", None)
    else:
        os.environ["MABEAM_LOG_DIR"] = previous
    shutil.rmtree(logs, ignore_errors=True)


@pytest.fixture(autouse=True)
def _free_form_launches_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registries started by tests run free-form launch specs (sample workers by path), as a dev registry
    started with --allow-argv does. Tests of the launch policy unset it (``monkeypatch.delenv``) before
    they start a registry; see tests/test_launch_policy.py."""
    monkeypatch.setenv("MABEAM_ALLOW_ARGV", "1")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print what tests recorded with ``record_property("report", text)`` (load figures, for CI logs),
    whether they passed or failed."""
    texts = [
        str(value)
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", ())
        if name == "report"
    ]
    if texts:
        terminalreporter.section("reports")
        for text in texts:
            terminalreporter.write_line(text)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    """Keep each phase's report on the item (``item.failed_call``): fixtures read it in teardown."""
    report = yield
    if report.when == "call" and report.failed:
        item.failed_call = True  # type: ignore[attr-defined]
    return report


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``containers`` tests last: their images are prepared in the background meanwhile."""
    items.sort(key=lambda item: item.get_closest_marker("containers") is not None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Nothing left running: a dockerd the containers' preparation started is stopped even when
    the session ended before the containers test ran (interrupted, -x)."""
    from harness import containers

    containers.stop_dockerd()


def pytest_collection_finish(session: pytest.Session) -> None:
    """A runnable ``containers`` test selected: start preparing its images now (tests/harness/containers.py)."""
    from harness import containers

    if session.config.option.collectonly or containers.unavailable():
        return
    if any(item.get_closest_marker("containers") for item in session.items):
        containers.start()
