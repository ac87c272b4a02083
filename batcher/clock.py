"""The one clock the batcher reads: monotonic seconds, real by default, simulated under `jitney simulate`.

Every time the batcher stamps (an arrival, a window closing, a deadline, a step's start and length, a token) is
read from the clock its Engine was given, so the very same Engine, RequestQueue, Scheduler and KVCacheManager
run on a virtual clock (sim/loop.py) with no second copy of any rule. A clock is a plain zero-argument callable:
the real one is time.monotonic itself, so serving pays one function call per read, as before.
"""
from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]
REAL_CLOCK: Clock = time.monotonic
