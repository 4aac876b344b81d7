"""Selection by rank over a whole tensor, applied chunk by chunk: the entries whose rank by value,
largest first, lies in a window [a, b) — TIES' top k, breadcrumbs' band below the outliers,
SCE's top variances. Equal values are ranked in row-major order (the earlier first), as a stable
sort would rank them; mergekit's sorts leave that order to the sort.

`RankWindow.measure` finds the two values at the window's edges and keeps, per chunk, how many
entries equal to an edge lie before it — so that any chunk is then selected alone. In float32 it
never holds the whole tensor's values: the values (≥ 0) rank as their bits do, so a first pass
counts them by their top 16 bits (a histogram of 2¹⁵ bins), which says the bin each edge lies in,
and a second counts the entries of those bins by their low 16 bits, which says the edge exactly
(and how many entries equal it, and how many are greater): the same edges as a partition of the
whole array would find, in the memory of a chunk. Other dtypes (float64) hold the values once
and partition them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

STORED = 1 << 20  # keys of the edges' bins kept from the second pass (4 MB): beyond it, a third pass counts


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
        """`values(j, out)` writes chunk j's values (magnitudes, variances: ≥ 0 or NaN) into `out`;
        the window is [a, b), or `a(nonzero)` when it depends on how many values are not zero (SCE).
        The sums are of each chunk's values in float64, added up in float64."""
        import numpy as np

        if np.dtype(wide) == np.float32:
            return cls._streamed(numel, spans, values, a, b, sums)
        return cls._held(numel, spans, values, wide, a, b, sums)

    # -- float32: two passes of histograms, nothing whole held --

    @classmethod
    def _streamed(cls, numel, spans, values, a, b, sums) -> RankWindow:
        import numpy as np

        n, passes = numel, _Passes(spans, values)
        total, zeros = passes.coarse(sums, callable(a))
        if callable(a):
            a, b = a(n - zeros)
        a, b = max(0, a), min(n, b)
        if a >= b:
            return cls(None, None, [], 0.0, total, nothing=True)
        if a == 0 and b == n:
            return cls(None, None, [], total, total, everything=True)
        # ascending ranks: the b-th largest at n - b, the (a+1)-th at n - 1 - a; a bound only where needed
        low_rank, high_rank = (n - b if b < n else None), (n - 1 - a if a > 0 else None)
        between = passes.fine(low_rank, high_rank, sums)
        low, high = passes.at(low_rank), passes.at(high_rank)
        edges, keys = [], []
        for edge in (high, low):
            if edge is None or (edges and edges[0].value == edge[0]):
                continue
            value, key, greater, equal = edge
            first, last = max(0, a - greater), min(equal, b - greater)
            edges.append(_Edge(value, first, last, None if (first, last) == (0, equal) else []))
            keys.append(key)
        passes.tie_counts([(e, key) for e, key in zip(edges, keys) if e.before is not None])
        kept = 0.0
        if sums and passes.nans:
            kept = float("nan")  # as the sum of the ranks would be (and the total is NaN too)
        elif sums:
            kept = between + passes.inside(low[1] if low else -1, high[1] if high else 1 << 31)
            for edge in edges:  # the edges' share
                if edge.last > edge.first:
                    kept += float(np.float64(edge.value) * (edge.last - edge.first))
        return cls(low[0] if low else None, high[0] if high else None, edges, kept, total)

    # -- other dtypes: the values held once, partitioned --

    @classmethod
    def _held(cls, numel, spans, values, wide, a, b, sums) -> RankWindow:
        import numpy as np

        whole = np.empty(numel, wide)
        for j, (start, count) in enumerate(spans):
            values(j, whole[start:start + count])
        total = sum(float(whole[s:s + c].sum(dtype=np.float64)) for s, c in spans) if sums else 0.0
        if callable(a):
            a, b = a(int(np.count_nonzero(whole)))
        n = numel
        a, b = max(0, a), min(n, b)
        if a >= b:
            return cls(None, None, [], 0.0, total, nothing=True)
        if a == 0 and b == n:
            return cls(None, None, [], total, total, everything=True)
        # ascending order: the b-th largest lands at n - b, the (a+1)-th at n - 1 - a; a bound only
        # where needed, one partition each (numpy's vectorized selection takes one order statistic)
        if b < n:
            whole.partition(n - b)
        if a > 0 and b == n:
            whole.partition(n - 1 - a)
        elif a > 0 and n - 1 - a > n - b:  # above the low edge, which stays where it is
            whole[n - b + 1:].partition(b - a - 2)
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


class _Passes:
    """The passes of a float32 RankWindow over the chunks: each chunk's values as keys (their
    bits, the sign cleared: values ≥ 0 order as their keys, every NaN above inf), counted by their
    top 16 bits (`coarse`), then, in the bins the edges fall in, by their low 16 bits (`fine`)."""

    def __init__(self, spans, values):
        import numpy as np

        self.spans, self.values = spans, values
        self.n = sum(c for _, c in spans)
        size = max((c for _, c in spans), default=0)
        self.scratch, self.keys = np.empty(size, np.float32), np.empty(size, np.uint32)
        self.bins = np.empty(size, np.intp)
        self.counts = np.zeros(1 << 15, np.int64)
        self.nans = 0

    def chunk(self, j: int):
        """Chunk j's values and their keys, and the keys' top 16 bits."""
        import numpy as np

        count = self.spans[j][1]
        chunk = self.scratch[:count]
        self.values(j, chunk)
        keys = np.bitwise_and(chunk.view(np.uint32), np.uint32(0x7FFFFFFF), out=self.keys[:count])
        return chunk, keys, np.right_shift(keys, 16, out=self.bins[:count])

    def coarse(self, sums: bool, zeros: bool) -> tuple[float, int]:
        """The first pass: the counts per top 16 bits; the sum of the values, how many are zero."""
        import numpy as np

        total, zero = 0.0, 0
        for j in range(len(self.spans)):
            chunk, keys, top = self.chunk(j)
            if sums:
                total += float(chunk.sum(dtype=np.float64))
            if zeros:
                zero += len(keys) - int(np.count_nonzero(keys))
            self.counts += np.bincount(top, minlength=len(self.counts))
        self.below = np.cumsum(self.counts) - self.counts  # entries in the bins before each bin
        return total, zero

    def fine(self, low_rank: int | None, high_rank: int | None, sums: bool) -> float:
        """The second pass: the counts per low 16 bits in the bins of the edges' ranks (and inf's,
        for the NaNs beside it); the keys of those bins kept per chunk (up to STORED); with `sums`,
        the sum of the values in the bins strictly between the two edges' bins."""
        import numpy as np

        ranks = [r for r in (low_rank, high_rank) if r is not None]
        self.where = {r: int(np.searchsorted(self.below + self.counts, r, side="right")) for r in ranks}
        self.edge_bins = sorted(set(self.where.values()))
        wanted = sorted(set(self.edge_bins) | ({0x7F80} if self.counts[0x7F80] else set()))  # 0x7F80: inf, NaNs
        self.fine_counts = {B: np.zeros(1 << 16, np.int64) for B in wanted}
        low_bin = self.where[low_rank] if low_rank is not None else -1
        high_bin = self.where[high_rank] if high_rank is not None else 1 << 15
        self.stored: list | None = []
        held, between = 0, 0.0
        for j in range(len(self.spans)):
            chunk, keys, top = self.chunk(j)
            if sums and high_bin - low_bin > 1:
                between += float(np.sum(chunk, where=(top > low_bin) & (top < high_bin), dtype=np.float64))
            mask = top == wanted[0]
            for B in wanted[1:]:
                mask |= top == B
            picked = keys[mask]
            if self.stored is not None:
                held += len(picked)
                if held <= STORED:
                    self.stored.append(picked)
                    continue
                for p in self.stored:  # too many to keep: count what was kept, count the rest as it comes
                    self._count(p)
                self.stored = None
            self._count(picked)
        if self.stored is not None:
            self._count(np.concatenate(self.stored) if self.stored else np.empty(0, np.uint32))
        self.nans = int(self.counts[0x7F81:].sum()) + (int(self.fine_counts[0x7F80][1:].sum())
                                                       if 0x7F80 in self.fine_counts else 0)
        return between

    def _count(self, picked) -> None:
        import numpy as np

        if not len(picked):
            return
        top = picked >> 16
        for B, counts in self.fine_counts.items():
            counts += np.bincount(picked[top == B] & 0xFFFF, minlength=len(counts))

    def at(self, rank: int | None):
        """(value, key, how many values are greater — NaN is not —, how many equal) of that
        ascending rank; None for None."""
        import numpy as np

        if rank is None:
            return None
        B = self.where[rank]
        counts = self.fine_counts[B]
        within = np.cumsum(counts)
        low = int(np.searchsorted(within, rank - int(self.below[B]), side="right"))
        key = (B << 16) | low
        value = np.array([key], np.uint32).view(np.float32)[0]
        if key > 0x7F800000:  # a NaN: nothing compares greater or equal
            return value, key, 0, 0
        return value, key, self.n - int(self.below[B]) - int(within[low]) - self.nans, int(counts[low])

    def tie_counts(self, counted: list) -> None:
        """Each edge's `before`: per chunk, how many entries equal to it lie in the chunks before —
        from the keys the second pass kept, or a third pass when they were too many."""
        import numpy as np

        running = [0] * len(counted)
        for j in range(len(self.spans) if counted else 0):
            keys = self.stored[j] if self.stored is not None else self.chunk(j)[1]
            for i, (edge, key) in enumerate(counted):
                edge.before.append(running[i])
                if key <= 0x7F800000:  # a NaN edge equals nothing
                    running[i] += int(np.count_nonzero(keys == key))

    def inside(self, low_key: int, high_key: int) -> float:
        """The sum of the values of the edges' bins strictly between the two keys, from their counts."""
        import numpy as np

        kept = 0.0
        for B in self.edge_bins:
            keys = (B << 16) | np.arange(1 << 16, dtype=np.int64)
            inside = (keys > low_key) & (keys < high_key) & (self.fine_counts[B] > 0)
            worth = keys[inside].astype(np.uint32).view(np.float32).astype(np.float64)
            kept += float((worth * self.fine_counts[B][inside]).sum())
        return kept
