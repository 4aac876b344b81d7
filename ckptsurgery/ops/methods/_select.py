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
    boolean mask out (`keep`). With `sums`, `kept_sum` and `total_sum` are the sums of the kept
    values and of all values, in float64 (their ratio rescales a delta to its L1 norm)."""

    low: float | None  # entries above low (when a bound) and below high (when a bound) are kept
    high: float | None
    edges: list[_Edge]
    kept_sum: float = 0.0
    total_sum: float = 0.0
    nothing: bool = False
    everything: bool = False

    @classmethod
    def measure(cls, numel: int, spans: list[tuple[int, int]], values: Callable[[int, object], object], wide: str,
                a: int | Callable, b: int | None = None, sums: bool = False) -> RankWindow:
        """`values(j, out)` writes chunk j's values (magnitudes, variances: ≥ 0) into `out`; the
        window is [a, b), or `a(values)` when it depends on the values (SCE's count of nonzero ones)."""
        import numpy as np

        whole = np.empty(numel, wide)
        for j, (start, count) in enumerate(spans):
            values(j, whole[start:start + count])
        total = float(whole.sum(dtype=np.float64)) if sums else 0.0
        if callable(a):
            a, b = a(whole)
        n = numel
        a, b = max(0, a), min(n, b)
        if a >= b:
            return cls(None, None, [], 0.0, total, nothing=True)
        if a == 0 and b == n:
            return cls(None, None, [], total, total, everything=True)
        # ascending order: the b-th largest lands at n - b, the (a+1)-th at n - 1 - a; a bound only where needed
        whole.partition([k for k, needed in ((n - b, b < n), (n - 1 - a, a > 0)) if needed])
        low = whole[n - b] if b < n else None
        high = whole[n - 1 - a] if a > 0 else None
        kept_sum = float(whole[n - b:n - a].sum(dtype=np.float64)) if sums else 0.0
        edges = []
        for value, beyond in ((high, whole[n - a:]), (low, whole[n - b + 1:])):
            if value is None or (edges and edges[0].value == value):
                continue
            # entries greater than an edge all lie beyond it in the partitioned array
            greater = int(np.count_nonzero(beyond > value))
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
        if self.nothing:
            return np.zeros(values.shape, bool)
        if self.low is not None and self.high is not None:
            mask = (values > self.low) & (values < self.high)
        elif self.low is not None:
            mask = values > self.low
        else:
            mask = values < self.high
        for edge in self.edges:
            if edge.before is None:
                mask |= values == edge.value
                continue
            where = np.flatnonzero(values == edge.value)
            done = edge.before[j]
            mask[where[max(0, edge.first - done):max(0, edge.last - done)]] = True
        return mask
