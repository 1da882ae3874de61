from __future__ import annotations

from typing import Any

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
