#!/usr/bin/env python3
"""Write docs/states.md, the job transition table, from balsam_grpc/core/states.py RULES.

Usage: scripts/gen_states_doc.py [--check]   (--check exits 1 when the file is stale)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from balsam_grpc.core.states import states_document  # noqa: E402

TARGET = ROOT / "docs" / "states.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/states.md differs from the table")
    args = parser.parse_args()
    text = states_document()
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is stale: run scripts/gen_states_doc.py", file=sys.stderr)
            return 1
        return 0
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
