"""``mabeam maintenance status|compact|defrag|disarm|recover``: etcd's upkeep, talking to etcd directly.

When etcd's database reaches its space quota it raises the NOSPACE alarm and
refuses every write; the mesh says so (``mabeam status``, the health name
``mabeam.store``) and goes on once space is freed and the alarm disarmed, no
restart needed (``docs/operations.md``)::

    mabeam maintenance status            # each member's database size against the quota, alarms
    mabeam maintenance compact           # drop history up to the current revision
    mabeam maintenance defrag            # give the freed space back, one member at a time
    mabeam maintenance disarm            # clear NOSPACE: writes are accepted again
    mabeam maintenance recover           # the three above, in that order

``--etcd URL[,URL]`` (env ``MABEAM_ETCD``, default ``mabeam up``'s
``http://127.0.0.1:2379``) names the members; ``defrag`` defragments each one
given. ``--etcd-ca/--etcd-cert/--etcd-key`` (env ``MABEAM_ETCD_CA/CERT/KEY``)
for TLS to etcd.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

from mabeam import errors
from mabeam.cli.flags import connection_flags, etcd_settings
from mabeam.tls import TLS


def size(n: int | None) -> str:
    """Bytes for people: ``1.5 MiB``."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


async def etcd_report(endpoints: list[str], tls: TLS | None) -> dict[str, Any]:
    """Every member's size against its quota and the active alarms, as a JSON-ready document.

    A member that does not answer is listed with its error; the alarms come
    from the first member that answers.
    """
    from mabeam.runtime.etcd import connect, maintenance

    members: list[dict[str, Any]] = []
    for endpoint in endpoints:
        try:
            st = await maintenance.member_status(endpoint, tls)
        except Exception as exc:
            members.append({"endpoint": endpoint, "error": f"{type(exc).__name__}: {exc}".strip()})
            continue
        quota = await maintenance.quota_bytes(endpoint, tls)
        members.append(
            {
                "endpoint": endpoint,
                "member_id": f"{st.member_id:x}",
                "leader": st.is_leader,
                "version": st.version,
                "db_size": st.db_size,
                "db_size_in_use": st.db_size_in_use,
                "quota": quota,
                "used_fraction": round(st.db_size / quota, 4) if quota else None,
                "revision": st.revision,
            }
        )
    alarms: list[dict[str, str]] | None = None
    client = await connect(endpoints, tls=tls, timeout=2)
    try:
        alarms = [
            {"member_id": f"{a.member_id:x}", "alarm": a.kind} for a in await maintenance.alarms(client)
        ]
    except Exception:
        alarms = None  # unreachable: the members' errors say so
    finally:
        await client.close()
    return {
        "members": members,
        "alarms": alarms,
        "nospace": bool(alarms and any(a["alarm"] == "NOSPACE" for a in alarms)),
    }


def print_report(report: dict[str, Any]) -> None:
    """The table of :func:`etcd_report`."""
    print(f"{'ETCD MEMBER':<28} {'ID':<17} {'DB SIZE':>10} {'IN USE':>10} {'QUOTA':>10} {'USED':>6}")
    for m in report["members"]:
        if "error" in m:
            print(f"{m['endpoint']:<28} unreachable: {m['error'].splitlines()[0]}")
            continue
        used = f"{100 * m['used_fraction']:.0f}%" if m["used_fraction"] is not None else "?"
        member = m["member_id"] + ("*" if m["leader"] else "")
        print(
            f"{m['endpoint']:<28} {member:<17} {size(m['db_size']):>10} {size(m['db_size_in_use']):>10} "
            f"{size(m['quota']):>10} {used:>6}"
        )
    alarms = report["alarms"]
    if alarms is None:
        print("alarms: ? (etcd unreachable)")
    elif not alarms:
        print("alarms: none")
    else:
        listed = ", ".join(f"{a['alarm']} (member {a['member_id']})" for a in alarms)
        print(f"alarms: {listed}")
        if report["nospace"]:
            print(
                "etcd refuses writes (NOSPACE): free space with `mabeam maintenance recover` "
                "(compact, defrag, disarm); see docs/operations.md"
            )


async def _status(args: argparse.Namespace) -> int:
    endpoints, tls = etcd_settings(args)
    report = await etcd_report(endpoints, tls)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print_report(report)
    reachable = all("error" not in m for m in report["members"])
    return 0 if reachable and not report["alarms"] else 1


@contextlib.asynccontextmanager
async def _etcd(endpoints: list[str], tls: TLS | None, timeout: float) -> AsyncIterator[Any]:
    """An etcd client for one command, closed when it is done."""
    from mabeam.runtime.etcd import connect

    client = await connect(endpoints, tls=tls, timeout=timeout)
    try:
        yield client
    finally:
        await client.close()


async def _compact(args: argparse.Namespace) -> int:
    from mabeam.runtime.etcd import maintenance

    endpoints, tls = etcd_settings(args)
    async with _etcd(endpoints, tls, 60) as client:
        revision = await maintenance.compact(client)
    print(f"etcd: history compacted up to revision {revision}")
    return 0


async def _defrag(args: argparse.Namespace) -> int:
    from mabeam.runtime.etcd import maintenance

    endpoints, tls = etcd_settings(args)
    async with _etcd(endpoints, tls, 5) as client:
        listed = [m async for m in client.members()]
    given = {e.rstrip("/") for e in endpoints}
    for member in listed if len(listed) > len(endpoints) else []:
        urls = {str(u).rstrip("/") for u in member.client_urls}
        if not urls & given:
            print(
                f"etcd: member {member.name or f'{member.id:x}'} ({', '.join(sorted(urls))}) was not given "
                "with --etcd: defragment it too",
                file=sys.stderr,
            )
    for endpoint in endpoints:  # one at a time: a member defragmenting answers nothing meanwhile
        before = await maintenance.member_status(endpoint, tls)
        after = await maintenance.defragment(endpoint, tls)
        print(f"etcd: {endpoint} defragmented: {size(before.db_size)} -> {size(after.db_size)}", flush=True)
    return 0


async def _disarm(args: argparse.Namespace) -> int:
    from mabeam.runtime.etcd import maintenance

    endpoints, tls = etcd_settings(args)
    async with _etcd(endpoints, tls, 10) as client:
        disarmed = await maintenance.disarm(client)
    if not disarmed:
        print("etcd: no NOSPACE alarm to disarm")
    for alarm in disarmed:
        print(f"etcd: alarm {alarm.kind} of member {alarm.member_id:x} disarmed")
    for endpoint in endpoints:
        st = await maintenance.member_status(endpoint, tls)
        quota = await maintenance.quota_bytes(endpoint, tls)
        if quota and st.db_size >= quota:
            print(
                f"etcd: WARNING: {endpoint} still holds {size(st.db_size)} of a {size(quota)} quota: "
                "the next write raises NOSPACE again; compact and defrag first, or delete data",
                file=sys.stderr,
            )
            return 1
    return 0


async def _recover(args: argparse.Namespace) -> int:
    for step in (_compact, _defrag, _disarm):
        code = await step(args)
        if code:
            return code
    return 0


COMMANDS = {
    "status": (_status, "each member's database size against its quota, and etcd's alarms"),
    "compact": (_compact, "compact etcd's history up to the current revision"),
    "defrag": (_defrag, "defragment each member given with --etcd, one at a time"),
    "disarm": (_disarm, "disarm etcd's NOSPACE alarm (after freeing space)"),
    "recover": (_recover, "compact, defrag and disarm: the way out of NOSPACE"),
}


def add_maintenance_parser(sub: Any) -> None:
    """``mabeam maintenance``."""
    nested = [connection_flags()]
    p = sub.add_parser(
        "maintenance",
        help="etcd's upkeep: status, compact, defrag, disarm, recover (talks to etcd directly)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        parents=nested,
    )
    msub = p.add_subparsers(dest="maintenance_command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        # --etcd-ca/--etcd-cert/--etcd-key come with the connection flags (mabeam.cli.flags).
        c = msub.add_parser(name, help=help_text, parents=nested)
        if name == "status":
            c.add_argument("--json", action="store_true", help="JSON for scripts")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run ``mabeam maintenance <command>``: 0 done, 1 etcd failed or still full."""
    from mabeam.runtime.etcd import to_mabeam_error

    command, _ = COMMANDS[args.maintenance_command]
    try:
        return asyncio.run(command(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        mapped = exc if isinstance(exc, errors.MabeamError) else to_mabeam_error(exc)
        if mapped is None:
            raise
        endpoints, _ = etcd_settings(args)
        if isinstance(mapped, errors.Unavailable):
            print(
                f"mabeam maintenance: etcd at {','.join(endpoints)} is not reachable: check --etcd",
                file=sys.stderr,
            )
        else:
            print(f"mabeam maintenance: {mapped.message.splitlines()[0]}", file=sys.stderr)
        return 1
