#!/usr/bin/env python3
"""Generate the committed Python stubs in balsam_grpc/v1/ from protos/balsam/v1/.

Usage: scripts/gen_protos.py [--check]

--check regenerates into a temporary folder and exits 1 (listing the files) when the
committed stubs differ, so CI and the contract tests catch drift.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "balsam" / "v1"
OUT_DIR = ROOT / "balsam_grpc" / "v1"
HEADER = '"""Generated protobuf and gRPC stubs of the balsam.v1 contract (scripts/gen_protos.py)."""\n'


def _rewrite(text: str) -> str:
    # protoc names modules after the proto package path; ours live in balsam_grpc.v1.
    text = re.sub(r"^from balsam\.v1 import", "from balsam_grpc.v1 import", text, flags=re.M)
    text = re.sub(r"^import balsam\.v1\.", "import balsam_grpc.v1.", text, flags=re.M)
    # Without this, messages report module "balsam.v1.x_pb2" and cannot be pickled.
    return re.sub(r"'balsam\.v1\.(\w+_pb2)'", r"'balsam_grpc.v1.\1'", text)


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency, imported only when generating
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(PROTO_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as raw:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",  # protoc.main() does not add the bundled well-known types itself
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            *[str(p) for p in protos],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for produced in sorted((Path(raw) / "balsam" / "v1").iterdir()):
            target = out_dir / produced.name
            target.write_text(_rewrite(produced.read_text()))
            written.append(target)
        (out_dir / "__init__.py").write_text(HEADER)
        written.append(out_dir / "__init__.py")
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed stubs drift")
    args = parser.parse_args()
    if not args.check:
        for stale in OUT_DIR.glob("*_pb2*.py*"):
            stale.unlink()
        written = generate(OUT_DIR)
        print(f"wrote {len(written)} files to {OUT_DIR.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        expected = {p.name for p in fresh.iterdir()}
        committed = {p.name for p in OUT_DIR.iterdir() if p.is_file()}
        drift = sorted(expected ^ committed)
        drift += sorted(n for n in expected & committed if not filecmp.cmp(fresh / n, OUT_DIR / n, shallow=False))
        if drift:
            print("generated stubs drift from protos/ (run scripts/gen_protos.py):", *drift, sep="\n  ")
            return 1
    print("generated stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
