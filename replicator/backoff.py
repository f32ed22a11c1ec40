"""One formula for waiting between retries, shared by every retry loop.

Capped exponential backoff with "equal jitter": the wait for retry number
`attempt` (1-based) is uniform within [half, full] of `base * 2^(attempt-1)`
capped at `cap`. Spreading the wait stops many callers that failed together
from retrying together, and keeping the lower half still makes every attempt
wait longer than the one before. The registry transport (via tenacity), the
work queue's persisted next-try times and the MQTT reconnect all use it.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def jittered_backoff(
    attempt: int, base: float, cap: float, rng: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before retry number `attempt` (1-based)."""
    exp = min(cap, base * (2 ** max(0, min(attempt - 1, 60))))
    return exp / 2 + (exp / 2) * rng()
