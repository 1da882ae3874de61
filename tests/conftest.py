from __future__ import annotations

import os
from typing import Any

# Set before grpc loads: tests fork etcd, services and agents from a process
# running grpc threads; grpc's fork handlers only log noise there.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

pytest_plugins = ["harness.etcd_fixtures", "harness.mesh_fixtures", "harness.cluster_fixtures"]


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
