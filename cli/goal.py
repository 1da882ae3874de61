"""``mabeam goal run|status|cancel``: goals from the command line.

A goal file (YAML or JSON) is a ``mabeam.v1.GoalSpec`` in its JSON form, with
two conveniences: a step's ``id`` may stand for ``step_id``, and ``strategy``
may be ``first_fit``, ``least_loaded`` or ``auction``::

    name: sum
    strategy: least_loaded
    steps:
      - id: a
        capability: compute
        input: {values: [1, 2]}
      - id: b
        capability: compute
        input: {values: [3]}
        depends_on: [a]

``run`` shows a progress bar on a terminal and plain lines otherwise, then
the outputs as JSON; it exits 0 when the goal succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from mabeam import errors
from mabeam.cli import flags
from mabeam.cli.flags import connection_flags, one_line
from mabeam.client import MeshClient
from mabeam.v1 import planner_pb2

STRATEGIES = {
    "first_fit": "ASSIGNMENT_STRATEGY_FIRST_FIT",
    "least_loaded": "ASSIGNMENT_STRATEGY_LEAST_LOADED",
    "auction": "ASSIGNMENT_STRATEGY_AUCTION",
}


def load_goal(path: Path) -> planner_pb2.GoalSpec:
    """Read a goal file (YAML or JSON) into a GoalSpec; errors name the file and the field."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a goal file holds a mapping with 'steps'")

    def strategy(node: dict[str, Any]) -> None:
        if isinstance(node.get("strategy"), str):
            node["strategy"] = STRATEGIES.get(node["strategy"].lower(), node["strategy"])

    strategy(doc)
    for step in doc.get("steps") or []:
        if isinstance(step, dict):
            if "id" in step:
                step["step_id"] = step.pop("id")
            strategy(step)
    try:
        return json_format.ParseDict(doc, planner_pb2.GoalSpec())
    except json_format.ParseError as exc:
        raise ValueError(f"{path}: {exc}") from None


def add_goal_parser(sub: Any) -> None:
    """The ``goal`` subcommand of ``mabeam``."""
    p = sub.add_parser(
        "goal", help="run, follow and cancel goals on the planner", parents=[connection_flags()]
    )
    gsub = p.add_subparsers(dest="goal_command", required=True)
    nested = [connection_flags(nested=True)]
    run = gsub.add_parser("run", help="submit a goal file and follow it", parents=nested)
    run.add_argument("file", type=Path)
    run.add_argument("--id", default="", help="goal id (makes the submission idempotent)")
    status = gsub.add_parser("status", help="show a goal", parents=nested)
    status.add_argument("goal_id")
    status.add_argument("--json", action="store_true", help="the goal as JSON")
    cancel = gsub.add_parser("cancel", help="cancel a goal", parents=nested)
    cancel.add_argument("goal_id")
    cancel.add_argument("--reason", default="cancelled from the command line")
    p.set_defaults(func=main)


async def _client(args: argparse.Namespace) -> MeshClient:
    planner = args.planner or os.environ.get("MABEAM_PLANNER", "")
    if args.etcd and not planner:
        return await flags.connect(args)  # discovery, with the command's TLS for etcd and the services
    return await flags.connect(args, planner=planner or "127.0.0.1:50054")


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


EVENT_WORDS = {
    planner_pb2.GOAL_EVENT_TYPE_GOAL_STARTED: "goal started",
    planner_pb2.GOAL_EVENT_TYPE_STEP_ASSIGNED: "assigned",
    planner_pb2.GOAL_EVENT_TYPE_STEP_STARTED: "started",
    planner_pb2.GOAL_EVENT_TYPE_STEP_SUCCEEDED: "succeeded",
    planner_pb2.GOAL_EVENT_TYPE_STEP_FAILED: "failed",
    planner_pb2.GOAL_EVENT_TYPE_STEP_RETRYING: "retrying",
    planner_pb2.GOAL_EVENT_TYPE_STEP_CANCELLED: "cancelled",
    planner_pb2.GOAL_EVENT_TYPE_GOAL_FINISHED: "goal finished",
}


async def _run(args: argparse.Namespace) -> int:
    spec = load_goal(args.file)
    tty = sys.stdout.isatty()
    async with await _client(args) as mesh:
        goal = (await mesh.planner.SubmitGoal(planner_pb2.SubmitGoalRequest(goal=spec, goal_id=args.id))).goal
        print(f"goal {goal.goal_id}: {len(spec.steps)} steps", flush=True)
        async for event in mesh.planner.ExecuteGoal(planner_pb2.ExecuteGoalRequest(goal_id=goal.goal_id)):
            word = EVENT_WORDS.get(event.type, "?")
            what = f"step {event.step_id} {word}" + (f" on {event.agent_id}" if event.agent_id else "")
            if event.error:
                what += f": {event.error}"
            if tty:
                print(f"\r\x1b[K{_bar(event.steps_done, event.steps_total)} {what}", end="", flush=True)
            elif event.step_id:
                print(f"{event.steps_done}/{event.steps_total} {what}", flush=True)
        if tty:
            print()
        final = (await mesh.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=goal.goal_id))).goal
    state = planner_pb2.GoalState.Name(final.state).removeprefix("GOAL_STATE_")
    print(f"goal {final.goal_id} {state}" + (f": {final.error}" if final.error else ""))
    outputs = {s.step_id: json_format.MessageToDict(s.output) for s in final.steps if s.HasField("output")}
    print(json.dumps(outputs, indent=2, sort_keys=True))
    return 0 if final.state == planner_pb2.GOAL_STATE_SUCCEEDED else 1


async def _status(args: argparse.Namespace) -> int:
    async with await _client(args) as mesh:
        goal = (await mesh.planner.GetGoal(planner_pb2.GetGoalRequest(goal_id=args.goal_id))).goal
    if args.json:
        print(json_format.MessageToJson(goal))
        return 0
    print(
        f"goal {goal.goal_id} {planner_pb2.GoalState.Name(goal.state).removeprefix('GOAL_STATE_')}"
        + (f": {goal.error}" if goal.error else "")
    )
    print(f"{'STEP':<24} {'STATE':<10} {'AGENT':<20} ATTEMPTS")
    for s in goal.steps:
        print(
            f"{s.step_id:<24} {planner_pb2.StepState.Name(s.state).removeprefix('STEP_STATE_'):<10} {s.agent_id:<20} {len(s.attempts)}"
        )
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    async with await _client(args) as mesh:
        goal = (
            await mesh.planner.CancelGoal(
                planner_pb2.CancelGoalRequest(goal_id=args.goal_id, reason=args.reason)
            )
        ).goal
    print(f"goal {goal.goal_id} {planner_pb2.GoalState.Name(goal.state).removeprefix('GOAL_STATE_')}")
    return 0


def main(args: argparse.Namespace) -> int:
    """Entry point of ``mabeam goal``."""
    command = {"run": _run, "status": _status, "cancel": _cancel}[args.goal_command]
    try:
        return asyncio.run(command(args))
    except ValueError as exc:
        print(f"mabeam goal: {exc}", file=sys.stderr)
        return 2
    except errors.MabeamError as exc:
        print(f"mabeam goal: {one_line(exc, args)}", file=sys.stderr)
        return 1
