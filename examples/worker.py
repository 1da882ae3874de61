"""An agent that executes goal steps, and keeps a counter that survives migration.

    python3 examples/worker.py --id worker-1 --registry 127.0.0.1:50051

Capabilities ``compute`` and ``count``:

* ``compute``: the output is ``{"sum": ...}``, the sum of the numbers in the
  step's input (a number, a list, or ``{"values": [...]}``) and of every
  dependency's ``sum``; ``{"sleep": s}`` in the input waits first, and
  ``{"fail": true}`` fails the step (to exercise retries).
* ``count``: adds the step's input (default 1) to a counter and returns it;
  the counter is the state that ExportState / ImportState move.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any

from mabeam import errors
from mabeam.agent import Agent, from_value
from mabeam.v1 import agent_pb2


def _numbers(data: Any) -> list[float]:
    if isinstance(data, bool):
        return []
    if isinstance(data, int | float):
        return [float(data)]
    if isinstance(data, list):
        return [n for item in data for n in _numbers(item)]
    if isinstance(data, dict):
        return _numbers(data.get("values", []))
    return []


class Worker(Agent):
    """Executes ``compute`` and ``count`` steps."""

    capabilities = ("compute", "count")

    def __init__(self, agent_id: str | None = None) -> None:
        super().__init__(agent_id)
        self.counter = 0
        self.steps_run = 0

    async def execute_step(self, request: agent_pb2.ExecuteStepRequest) -> Any:
        data = from_value(request.input) if request.HasField("input") else None
        self.steps_run += 1
        if request.capability == "count":
            self.counter += int(data) if isinstance(data, int | float) else 1
            return {"count": self.counter}
        if isinstance(data, dict):
            if data.get("sleep"):
                await asyncio.sleep(float(data["sleep"]))
            if data.get("fail"):
                raise errors.FailedPrecondition(f"step {request.step_id} asked to fail")
        total = sum(_numbers(data))
        for output in request.dependency_outputs.values():
            dep = from_value(output)
            if isinstance(dep, dict):
                total += float(dep.get("sum", 0))
        return {"sum": total, "agent": self.agent_id}

    async def export_state(self) -> bytes:
        return json.dumps({"counter": self.counter}).encode()

    async def import_state(self, state: bytes) -> None:
        self.counter = int(json.loads(state or b"{}").get("counter", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description="a step-executing agent")
    parser.add_argument(
        "--id", default=os.environ.get("MABEAM_AGENT_ID"), help="agent id (env MABEAM_AGENT_ID)"
    )
    parser.add_argument("--registry", default=None, help="registry host:port (env MABEAM_REGISTRY)")
    parser.add_argument("--port", type=int, default=0, help="port to serve on (default: any)")
    parser.add_argument(
        "--host",
        default=os.environ.get("MABEAM_AGENT_HOST", "127.0.0.1"),
        help="address to bind (env MABEAM_AGENT_HOST)",
    )
    parser.add_argument("--lease-ttl", type=float, default=5.0, help="registration lease TTL in seconds")
    args = parser.parse_args()
    asyncio.run(
        Worker(args.id).serve(
            registry=args.registry, host=args.host, port=args.port, lease_ttl=args.lease_ttl
        )
    )


if __name__ == "__main__":
    main()
