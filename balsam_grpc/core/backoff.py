"""Reconnect and retry delays shared by every client of the server (SDK calls and
watches, the site stream, the launcher session)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Jittered exponential backoff: a delay drawn from [cap/2, cap] where the cap doubles
    with each attempt up to `maximum`, so many clients cut off together do not reconnect
    in lockstep. `reset()` after a connection that worked."""

    initial: float = 0.2
    maximum: float = 5.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        cap = min(self.maximum, self.initial * (2 ** self.attempt))
        self.attempt += 1
        return self.rng.uniform(cap / 2, cap)

    def reset(self) -> None:
        self.attempt = 0
