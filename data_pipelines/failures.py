"""Unusable inputs, grouped by cause: a report names each cause once, with a count and a few examples."""

from __future__ import annotations


class FailureLog:
    """Counts failures per cause; keeps at most ``max_causes`` causes and ``examples`` places per cause, so that
    memory stays flat over millions of samples and one broken field does not fill a report 20 times over."""

    def __init__(self, max_causes: int = 50, examples: int = 3):
        self.max_causes, self.examples = max_causes, examples
        self.total = 0
        self._causes: dict[str, list] = {}     # cause -> [count, [where, ...]]
        self._dropped = 0                      # failures whose cause did not fit in max_causes

    def add(self, where: str, cause: str) -> None:
        """One failure at ``where`` (a file, an episode, a step) for ``cause`` (the error, without ``where``)."""
        self.total += 1
        cause = cause.replace(where, "<this file>") if where and len(where) > 8 else cause
        entry = self._causes.get(cause)
        if entry is None:
            if len(self._causes) >= self.max_causes:
                self._dropped += 1
                return
            entry = self._causes[cause] = [0, []]
        entry[0] += 1
        if len(entry[1]) < self.examples and where not in entry[1]:
            entry[1].append(where)

    def __len__(self) -> int:
        return self.total

    def lines(self) -> list[str]:
        """One line per cause, most frequent first: ``"<n> x <cause>: <where>, <where>, ... (e.g.)"``."""
        out = []
        for cause, (n, where) in sorted(self._causes.items(), key=lambda kv: -kv[1][0]):
            more = ", ..." if n > len(where) else ""
            out.append(f"{n} x {cause}: {', '.join(where)}{more}")
        if self._dropped:
            out.append(f"{self._dropped} x other causes (not listed)")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())
