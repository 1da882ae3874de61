#!/usr/bin/env python3
"""Regenerate the Python code for proto/mabeam/v1 into sdk/v1 (import name `mabeam.v1`).

The generated files are committed and never edited by hand; this script is the
only way they change. `--check` regenerates into a temporary directory and
exits 1 if anything differs from what is committed (tests/test_contracts.py
runs it), so stale code cannot land.

Outputs per proto: `*_pb2.py` (protoc), `*_pb2.pyi` and `*_pb2_grpc.pyi`
(mypy-protobuf's plugins, pinned in the `test` extra) and `*_pb2_grpc.py`
(grpcio-tools).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_DIR = PROTO_ROOT / "mabeam" / "v1"
OUT_DIR = ROOT / "sdk" / "v1"
INIT = '"""Generated protobuf and gRPC code for mabeam.v1 (scripts/gen_protos.py; do not edit)."""\n'


def _plugin(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        raise SystemExit(f"{name} not found: install the test extra (pip install -e '.[test]')")
    return found


def generate(out: Path) -> None:
    """Run protoc on every proto of mabeam.v1 and leave the package in `out`."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        generated = Path(tmp) / "mabeam" / "v1"
        out.mkdir(parents=True, exist_ok=True)
        for old in out.iterdir():
            if old.is_file():
                old.unlink()
        for new in sorted(generated.iterdir()):
            shutil.copy2(new, out / new.name)
        (out / "__init__.py").write_text(INIT)
        (out / "py.typed").write_text("")


def check() -> int:
    """Return 0 when sdk/v1 matches a fresh generation, else 1 with the differences."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "v1"
        generate(fresh)
        committed = {p.name for p in OUT_DIR.iterdir() if p.is_file()} if OUT_DIR.exists() else set()
        regenerated = {p.name for p in fresh.iterdir() if p.is_file()}
        stale = sorted(committed ^ regenerated)
        stale += sorted(
            n for n in committed & regenerated if not filecmp.cmp(OUT_DIR / n, fresh / n, shallow=False)
        )
    if stale:
        print("generated code is stale; run scripts/gen_protos.py:", ", ".join(stale))
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if sdk/v1 is stale")
    args = parser.parse_args()
    if args.check:
        return check()
    generate(OUT_DIR)
    print(f"generated {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
