"""Benchmark cases: each module ``<case>.py`` exposes ``run(args: list[str]) -> list[dict]``.

Rows carry at least ``case``, ``what``, ``config``, ``device``, ``median_s`` (and ``ratio`` where two things
are compared). Run one with ``python -m launch.benchmark <case> [args]``.
"""
