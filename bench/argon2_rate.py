"""The login and registration baselines: raw argon2id, as fast as these cores go.

Run as its own process (``python -m bench.argon2_rate verify|hash SECONDS TIME MEMORY PARALLEL``)
while nothing else is under load, so it gets the same cores the service gets during its run,
and prints one number: operations per second. A thread pool of ``os.cpu_count()`` threads,
because argon2-cffi releases the GIL while hashing, as the service's hashing pool does.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher, Type

PASSWORD = "bench-correct-horse-battery"


def _count_until(deadline: float, operation: Callable[[], object]) -> int:
    done = 0
    while time.perf_counter() < deadline:
        operation()
        done += 1
    return done


def rate(kind: str, seconds: float, time_cost: int, memory_cost: int, parallelism: int) -> float:
    """``verify`` or ``hash`` operations per second over about ``seconds``."""
    hasher = PasswordHasher(
        time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism, type=Type.ID
    )
    stored = hasher.hash(PASSWORD)

    def verify() -> object:
        return hasher.verify(stored, PASSWORD)

    def hash_one() -> object:
        return hasher.hash(PASSWORD)

    operation = verify if kind == "verify" else hash_one
    threads = os.cpu_count() or 1
    started = time.perf_counter()
    deadline = started + seconds
    with ThreadPoolExecutor(max_workers=threads) as pool:
        counts = list(pool.map(lambda _: _count_until(deadline, operation), range(threads)))
    return sum(counts) / (time.perf_counter() - started)


if __name__ == "__main__":
    kind, seconds, time_cost, memory_cost, parallelism = sys.argv[1:6]
    if kind not in ("verify", "hash"):
        raise SystemExit("usage: python -m bench.argon2_rate verify|hash SECONDS T M P")
    print(f"{rate(kind, float(seconds), int(time_cost), int(memory_cost), int(parallelism)):.3f}")
