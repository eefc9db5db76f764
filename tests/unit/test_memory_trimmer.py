"""server/wire.py MemoryTrimmer: when several large requests are in hand at once, the
memory of each is trimmed after it settles, not only of the first (its trim used to
reset the byte count, and the others' memory stayed resident)."""

from __future__ import annotations

import asyncio

from balsam_grpc.server.wire import MemoryTrimmer


def test_each_of_concurrent_large_requests_is_trimmed_after() -> None:
    async def run() -> list[int]:
        trimmer = MemoryTrimmer(threshold=100, delay=0.0)
        trimmer._trim = lambda pad: 0  # no real malloc_trim: count the calls
        seen = []

        async def settle_and_count() -> None:
            trimmer.settled()
            for _ in range(200):  # the trim runs in a thread, a few loop turns later
                if not trimmer._scheduled:
                    break
                await asyncio.sleep(0.005)
            seen.append(trimmer.trims)

        for _ in range(3):
            trimmer.received(100)  # three large requests arrive together
        await settle_and_count()  # the first finishes: trimmed, the others still in hand
        await settle_and_count()  # the second: trimmed again (its bytes were owed)
        await settle_and_count()  # the last: trimmed, and nothing is owed any more
        trimmer.received(10)  # a small request after that: no trim
        await settle_and_count()
        return seen

    assert asyncio.run(run()) == [1, 2, 3, 3]
