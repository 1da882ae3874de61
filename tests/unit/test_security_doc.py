"""docs/security.md shows the policy the code enforces: one row per RPC, with the roles of mabeam.auth.POLICY."""

from __future__ import annotations

import re
from pathlib import Path

from mabeam import auth

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
ORDER = (auth.ADMIN, auth.OPERATOR, auth.AGENT, auth.READER, auth.SERVICE)


def _rows() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\| `(\w+/\w+)` \| ([a-z, ]+) \|", line)
        if match:
            rows[match.group(1)] = match.group(2).strip()
    return rows


def test_every_rule_of_the_policy_is_a_row_of_the_doc_with_the_same_roles() -> None:
    rows = _rows()
    expected = {}
    for method, rule in auth.POLICY.items():
        service, name = method.strip("/").split("/")
        expected[f"{service.removeprefix('mabeam.v1.')}/{name}"] = ", ".join(
            auth.role_name(r) for r in ORDER if r in rule.roles
        )
    assert rows == expected
