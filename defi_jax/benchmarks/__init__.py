"""Benchmark cases: each module ``<case>.py`` exposes ``run(args: list[str]) -> list[dict]``.

Rows carry at least ``case``, ``what``, ``config``, ``device``, ``median_s`` (and ``ratio`` where two things
are compared). Run one with ``python -m launch.benchmark <case> [args]``.
"""

import time
from collections.abc import Callable


def timeit(fn: Callable[[], object], steps: int, warmup: int = 0) -> list[float]:
    """Wall seconds of ``steps`` calls of ``fn`` after ``warmup`` untimed ones (fn must block until done)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out
