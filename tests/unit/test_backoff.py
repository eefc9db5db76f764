"""core.backoff is the one retry delay: jittered, capped, reset by a success, and no
module doubles a delay by hand beside it (five copies once drifted apart)."""

from __future__ import annotations

import random
import re
from pathlib import Path

from balsam_grpc.core.backoff import Backoff

PACKAGE = Path(__file__).resolve().parents[2] / "balsam_grpc"
HAND_DOUBLING = re.compile(r"\b(delay|backoff|wait|retry\w*)\s*(\*=\s*2\b|\*\s*2\s*\))")


def test_delays_double_up_to_the_cap_with_jitter_and_reset() -> None:
    b = Backoff(initial=0.2, maximum=1.0, rng=random.Random(7))
    delays = [b.next_delay() for _ in range(6)]
    caps = [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert all(cap / 2 <= d <= cap for d, cap in zip(delays, caps, strict=True)), delays
    b.reset()
    assert 0.1 <= b.next_delay() <= 0.2


def test_no_hand_written_backoff_beside_core_backoff() -> None:
    found = [f"{path.relative_to(PACKAGE)}:{n}" for path in sorted(PACKAGE.rglob("*.py"))
             if "v1" not in path.parts
             for n, line in enumerate(path.read_text().splitlines(), 1) if HAND_DOUBLING.search(line)]
    assert not found, f"use core.backoff.Backoff: {found}"
