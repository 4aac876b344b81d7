"""Selection by rank over a whole tensor, applied chunk by chunk: the entries whose rank by value,
largest first, lies in a window [a, b) — TIES' top k, breadcrumbs' band below the outliers,
SCE's top variances. Equal values are ranked in row-major order (the earlier first), as a stable
sort would rank them; mergekit's sorts leave that order to the sort.

`RankWindow.measure` holds the values of the whole tensor once (its wide dtype: 4 bytes an element
in float32), finds the two values at the window's edges with a partition, and keeps, per chunk,
how many entries equal to an edge lie before it — so that any chunk is then selected alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Edge:
    value: float
    first: int  # of the entries equal to `value`, in row-major order, keep those numbered [first, last)
    last: int
    before: list[int] | None  # per chunk, how many equal entries lie in the chunks before; None: keep all of them


@dataclass
class RankWindow:
    """Keeps entries of rank [a, b) by value, the largest ranked 0: chunk j of the values in, a
    boolean mask out (`keep`). `kept_sum` and `total_sum` are the sums of the kept values and of
    all values, in float64 (their ratio rescales a delta to its L1 norm)."""

    low: float | None  # entries strictly between low and high are kept; None: nothing is kept
    high: float | None
    edges: list[_Edge]
    kept_sum: float
    total_sum: float
    everything: bool = False

    @classmethod
    def measure(cls, numel: int, spans: list[tuple[int, int]], values: Callable[[int, object], object], wide: str,
                a: int | Callable, b: int | None = None) -> RankWindow:
        """`values(j, out)` writes chunk j's values (magnitudes, variances: ≥ 0) into `out`; the
        window is [a, b), or `a(values)` when it depends on the values (SCE's count of nonzero ones)."""
        import numpy as np

        whole = np.empty(numel, wide)
        for j, (start, count) in enumerate(spans):
            values(j, whole[start:start + count])
        total = float(whole.sum(dtype=np.float64))
        if callable(a):
            a, b = a(whole)
        a, b = max(0, a), min(numel, b)
        if a >= b:
            return cls(None, None, [], 0.0, total)
        if a == 0 and b == numel:
            return cls(None, None, [], total, total, everything=True)
        n = numel
        whole.partition([n - b, n - 1 - a])  # ascending: the b-th largest at n - b, the (a+1)-th at n - 1 - a
        low, high = whole[n - b], whole[n - 1 - a]
        kept_sum = float(whole[n - b:n - a].sum(dtype=np.float64))
        edges = []
        for value in ([high] if low == high else [high, low]):
            greater = int(np.count_nonzero(whole > value))
            equal = int(np.count_nonzero(whole == value))
            first, last = max(0, a - greater), min(equal, b - greater)
            edges.append(_Edge(value, first, last, None if (first, last) == (0, equal) else []))
        del whole
        if any(e.before is not None for e in edges):
            counted = [e for e in edges if e.before is not None]
            running = [0] * len(counted)
            scratch = np.empty(max((c for _, c in spans), default=0), wide)
            for j, (start, count) in enumerate(spans):
                chunk = scratch[:count]
                values(j, chunk)
                for k, edge in enumerate(counted):
                    edge.before.append(running[k])
                    running[k] += int(np.count_nonzero(chunk == edge.value))
        return cls(low, high, edges, kept_sum, total)

    def keep(self, j: int, values):
        """The mask of chunk j's entries kept, given the chunk's values."""
        import numpy as np

        if self.everything:
            return np.ones(values.shape, bool)
        if self.low is None:
            return np.zeros(values.shape, bool)
        mask = (values > self.low) & (values < self.high)
        for edge in self.edges:
            equal = values == edge.value
            if edge.before is None:
                mask |= equal
                continue
            where = np.flatnonzero(equal)
            done = edge.before[j]
            mask[where[max(0, edge.first - done):max(0, edge.last - done)]] = True
        return mask
