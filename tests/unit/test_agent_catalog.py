"""The agent catalog: its file is checked at start-up, and its policy decides every launch."""

from __future__ import annotations

from pathlib import Path

import pytest

from mabeam import errors
from mabeam.config import ConfigError
from mabeam.services.registry import catalog
from mabeam.services.registry.launch import check_launch, child_environment
from mabeam.v1 import registry_pb2

GOOD = """
echo:
  argv: [/usr/bin/python3, /srv/agents/echo.py]
  working_dir: /srv/agents
  env: {ECHO_MODE: loud, WORKERS: 4}
  allowed_args: [--verbose, --bid=]
planner-worker:
  python_entry_point: "agents.planner:make"
  allowed_args: [fast]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    return path


def test_a_good_catalog_parses(tmp_path: Path) -> None:
    kinds = catalog.load(write(tmp_path, GOOD))
    assert set(kinds) == {"echo", "planner-worker"}
    echo = kinds["echo"]
    assert echo.argv == ("/usr/bin/python3", "/srv/agents/echo.py") and echo.working_dir == "/srv/agents"
    assert echo.env == {"ECHO_MODE": "loud", "WORKERS": "4"}
    assert kinds["planner-worker"].python_entry_point == "agents.planner:make"
    assert catalog.load(write(tmp_path, "")) == {}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("- a\n- b\n", "must be a mapping of kind names"),
        ("'bad name': {argv: [x]}\n", "kind name 'bad name'"),
        ("echo: [x]\n", "kind 'echo': must be a mapping"),
        ("echo: {}\n", "kind 'echo': give exactly one of argv and python_entry_point"),
        ("echo: {argv: [x], python_entry_point: 'a:b'}\n", "kind 'echo': give exactly one"),
        ("echo: {argv: []}\n", "kind 'echo': argv must not be empty"),
        ("echo: {argv: x}\n", "kind 'echo': argv must be a list of strings"),
        ("echo: {argv: [x, 3]}\n", "kind 'echo': argv must be a list of strings"),
        ("echo: {python_entry_point: nocolon}\n", "kind 'echo': python_entry_point must look like"),
        ("echo: {argv: [x], env: [A]}\n", "kind 'echo': env must be a mapping"),
        ("echo: {argv: [x], env: {'A=B': x}}\n", "kind 'echo': env: 'A=B' is not an environment"),
        ("echo: {argv: [x], env: {A: [1]}}\n", "kind 'echo': env[A] must be a string"),
        ("echo: {argv: [x], allowed_args: --v}\n", "kind 'echo': allowed_args must be a list"),
        ("echo: {argv: [x], allowed_args: ['']}\n", "kind 'echo': allowed_args entries must not be empty"),
        ("echo: {argv: [x], working_dir: ''}\n", "kind 'echo': working_dir must be a non-empty path"),
        ("echo: {argv: [x], args: [y]}\n", "kind 'echo': unknown field 'args'"),
        ("echo: {argv: [x\n", "not valid YAML"),
    ],
)
def test_a_bad_catalog_is_one_line_naming_the_file_kind_and_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        catalog.load(path)
    message = str(info.value)
    assert message.startswith(f"agent catalog {path}") and problem in message, message
    assert "\n" not in message


def test_a_missing_catalog_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"agent catalog .*nope\.yaml: cannot read it"):
        catalog.policy(str(tmp_path / "nope.yaml"), False)


def policy(tmp_path: Path, allow_argv: bool = False) -> catalog.LaunchPolicy:
    return catalog.policy(str(write(tmp_path, GOOD)), allow_argv)


def kind(name: str, *args: str, **fields: object) -> registry_pb2.LaunchSpec:
    return registry_pb2.LaunchSpec(kind=name, args=list(args), **fields)  # type: ignore[arg-type]


def test_a_kind_resolves_to_the_catalogs_argv_and_allowed_args(tmp_path: Path) -> None:
    p = policy(tmp_path)
    r = p.resolve(kind("echo", "--verbose", "--bid=12", "--bid="))
    assert r.argv == ("/usr/bin/python3", "/srv/agents/echo.py", "--verbose", "--bid=12", "--bid=")
    assert r.env == {"ECHO_MODE": "loud", "WORKERS": "4"} and r.working_dir == "/srv/agents"
    entry = p.resolve(kind("planner-worker", "fast"))
    assert entry.argv == () and entry.python_entry_point == "agents.planner:make" and entry.args == ("fast",)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (kind("echo", "--verbose=1"), "launch.args[0]"),  # an exact entry is not a prefix
        (kind("echo", "--verbose", "--bi=3"), "launch.args[1]"),
        (kind("echo", "--verbose", "-x"), "launch.args[1]"),
        (kind("echo", "; rm -rf /"), "launch.args[0]"),
        (kind("echo", env={"LD_PRELOAD": "/evil.so"}), "launch.env"),
        (kind("echo", working_dir="/tmp"), "launch.working_dir"),
        (registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=["touch", "/tmp/x"])), "launch.command"),
        (registry_pb2.LaunchSpec(python_entry_point="os:system"), "launch.python_entry_point"),
    ],
)
def test_without_allow_argv_what_the_catalog_does_not_say_is_permission_denied(
    tmp_path: Path, spec: registry_pb2.LaunchSpec, field: str
) -> None:
    with pytest.raises(errors.PermissionDenied) as info:
        check_launch(spec, policy(tmp_path))
    assert info.value.message.startswith(field), info.value.message
    assert info.value.reason == "NOT_AUTHORIZED"


def test_an_unknown_kind_is_not_found_and_says_where_kinds_come_from(tmp_path: Path) -> None:
    with pytest.raises(errors.NotFound, match=r"'nope'.*--agent-catalog .*kinds: echo, planner-worker"):
        check_launch(kind("nope"), policy(tmp_path))
    with pytest.raises(errors.NotFound, match=r"no catalog: start the registry with --agent-catalog"):
        check_launch(kind("echo"), catalog.LaunchPolicy())


def test_malformed_kind_launches_are_invalid_argument(tmp_path: Path) -> None:
    p = policy(tmp_path, allow_argv=True)
    for spec, field in [
        (kind("bad kind"), "launch.kind"),
        (kind("echo", "a\x00b"), "launch.args[0]"),
        (kind("echo", *["--verbose"] * 65), "launch.args"),
        (registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=["x"]), args=["y"]), "launch.args"),
    ]:
        with pytest.raises(errors.InvalidArgument) as info:
            check_launch(spec, p)
        assert info.value.field == field


def test_allow_argv_lets_free_form_launches_and_request_env_through(tmp_path: Path) -> None:
    p = policy(tmp_path, allow_argv=True)
    command = p.resolve(
        registry_pb2.LaunchSpec(command=registry_pb2.Command(argv=["a", "b"]), env={"X": "1"})
    )
    assert command.argv == ("a", "b") and command.env == {"X": "1"}
    r = p.resolve(kind("echo", env={"ECHO_MODE": "quiet", "Y": "2"}, working_dir="/w"))
    assert r.env == {"ECHO_MODE": "quiet", "WORKERS": "4", "Y": "2"} and r.working_dir == "/w"
    with pytest.raises(errors.PermissionDenied):  # the kind's allowed args still hold
        p.resolve(kind("echo", "--other"))


def test_the_policy_comes_from_the_environment(tmp_path: Path) -> None:
    path = str(write(tmp_path, GOOD))
    p = catalog.policy_from_env({catalog.CATALOG_ENV: path, catalog.ALLOW_ARGV_ENV: "1"})
    assert p.allow_argv and set(p.kinds) == {"echo", "planner-worker"} and p.source == path
    assert not catalog.policy_from_env({}).allow_argv
    assert not catalog.policy_from_env({catalog.ALLOW_ARGV_ENV: "0"}).allow_argv


def test_a_child_gets_only_path_home_locale_and_time_zone_of_the_parent() -> None:
    parent = {
        "PATH": "/bin",
        "HOME": "/home/a",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "TZ": "UTC",
        "LD_PRELOAD": "/evil.so",
        "PYTHONPATH": "/x",
        "MABEAM_TOKEN": "secret",
        "MABEAM_TLS_KEY": "/key.pem",
        "AWS_SECRET_ACCESS_KEY": "s",
    }
    assert child_environment(parent) == {
        "PATH": "/bin",
        "HOME": "/home/a",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "TZ": "UTC",
    }
