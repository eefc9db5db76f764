"""Fuzz tier: one seeded hypothesis profile (deterministic, bounded), and a terminal
summary of how many generated requests each RPC received."""

from __future__ import annotations

import os
from typing import Any

from fuzz_messages import RAW, TYPED
from hypothesis import HealthCheck, settings

# derandomize: the same examples on every run and every machine, so CI is deterministic;
# database=None: no example replay from a local .hypothesis directory either.
# BALSAM_FUZZ_RANDOM=1 (exploring by hand, with BALSAM_FUZZ_SCALE and BALSAM_FUZZ_NO_SHRINK)
# draws new examples on every run instead.
settings.register_profile(
    "balsam-fuzz", derandomize=not os.environ.get("BALSAM_FUZZ_RANDOM"), database=None, deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture, HealthCheck.large_base_example])


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TYPED and not RAW:
        return
    backends = sorted({b for b, _ in TYPED} | {b for b, _ in RAW})
    rpcs = sorted({r for _, r in TYPED} | {r for _, r in RAW})
    tr = terminalreporter
    tr.section("generated requests per RPC (typed from descriptors / raw bytes)")
    header = f"{'rpc':40}" + "".join(f"{b + ' typed':>16}{b + ' raw':>14}" for b in backends)
    tr.write_line(header)
    for rpc in rpcs:
        tr.write_line(f"{rpc:40}" + "".join(f"{TYPED[b, rpc]:>16}{RAW[b, rpc]:>14}" for b in backends))
    tr.write_line(f"{'total':40}" + "".join(
        f"{sum(v for (bb, _), v in TYPED.items() if bb == b):>16}{sum(v for (bb, _), v in RAW.items() if bb == b):>14}"
        for b in backends))
