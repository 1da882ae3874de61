"""Services log JSON lines: every line of a service's log parses, with trace and span ids and exceptions as fields."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mabeam.client import MeshClient
from mabeam.runtime import process
from mabeam.runtime.embedded_etcd import EmbeddedEtcd
from mabeam.runtime.service import json_handler
from mabeam.v1 import registry_pb2

pytestmark = pytest.mark.timeout(60)


def records(path: Path) -> list[dict[str, Any]]:
    """Every line of the log as JSON; a line that is not JSON fails the test, naming it."""
    found = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"{path.name} line {n} is not JSON: {line!r}\n{path.read_text()}")
    return found


async def test_a_record_carries_trace_and_span_ids_and_its_exception_as_fields() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    stream = io.StringIO()
    logger = logging.getLogger("test.json_logs")
    logger.propagate = False
    logger.addHandler(json_handler(stream))
    try:
        with TracerProvider().get_tracer("test").start_as_current_span("call") as span:
            try:
                raise ZeroDivisionError("no share for anyone")
            except ZeroDivisionError:
                logger.exception("dividing the pot failed")
        logger.warning("outside any span")
    finally:
        logger.handlers.clear()
        logger.propagate = True
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the traceback is a field, not more lines
    failed, outside = (json.loads(line) for line in lines)
    context = span.get_span_context()
    assert failed["trace_id"] == f"{context.trace_id:032x}"
    assert failed["span_id"] == f"{context.span_id:016x}"
    assert failed["level"] == "ERROR" and failed["message"] == "dividing the pot failed"
    assert failed["exc_type"] == "builtins.ZeroDivisionError"
    assert failed["exc_message"] == "no share for anyone"
    assert "Traceback" in failed["exc_info"] and "raise ZeroDivisionError" in failed["exc_info"]
    assert outside["trace_id"] == "" and outside["span_id"] == "" and "exc_info" not in outside


def start_registry(etcd: str, log: Path, prefix: str) -> tuple[subprocess.Popen[bytes], process.ReadyFile]:
    """A registry whose stdout and stderr both go to ``log``, as under ``mabeam up``."""
    ready = process.ReadyFile()
    argv = process.python_module_argv("mabeam.services.registry", "--etcd", etcd, "--port", "0")
    with open(log, "ab") as out:
        proc = process.spawn(
            [*argv, "--prefix", prefix, "--no-auth"],
            env={**os.environ, **ready.env()},
            stdout=out,
            stderr=out,
        )
    return proc, ready


async def test_every_line_a_service_writes_to_its_log_is_json(etcd: EmbeddedEtcd, tmp_path: Path) -> None:
    # A service that serves, answers, and stops on SIGTERM.
    log = tmp_path / "registry-0.log"
    proc, ready = start_registry(etcd.endpoint, log, f"/json-logs-{os.getpid()}")
    try:
        address = (await ready.wait(proc, 20)).address
        client = await MeshClient.connect(registry=address)
        await client.registry.ListAgents(registry_pb2.ListAgentsRequest())
        await client.close()
        proc.send_signal(signal.SIGTERM)
        assert await process.wait_exit(proc) == 0
    finally:
        ready.close()
        await process.terminate(proc, 1)
    served = records(log)
    assert any(r["message"] == f"mabeam registry serving on {address}" for r in served)
    assert all({"time", "level", "logger", "trace_id", "span_id", "message"} <= r.keys() for r in served)

    # A service that cannot start: the exception path, still JSON lines.
    failed_log = tmp_path / "registry-1.log"
    proc, ready = start_registry("http://127.0.0.1:1", failed_log, "/json-logs-unreachable")
    try:
        with pytest.raises(process.ExitedBeforeReady):
            await ready.wait(proc, 30)
    finally:
        ready.close()
        await process.terminate(proc, 1)
    failed = records(failed_log)
    fatal = [r for r in failed if r["level"] == "CRITICAL"]
    assert len(fatal) == 1, failed
    assert "etcd at http://127.0.0.1:1 is not reachable" in fatal[0]["message"]
    assert fatal[0]["exc_type"] and "Traceback" in fatal[0]["exc_info"]
