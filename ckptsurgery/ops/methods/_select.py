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

        n = numel
        size = max((c for _, c in spans), default=0)
        scratch, keys, bins = np.empty(size, np.float32), np.empty(size, np.uint32), np.empty(size, np.intp)
        coarse = np.zeros(1 << 15, np.int64)  # the keys' top 16 bits (the sign bit is cleared)
        total, zeros = 0.0, 0

        def chunk_keys(j: int, count: int):
            chunk = scratch[:count]
            values(j, chunk)
            # ≥ 0 values order as their bits; NaN (either sign) above inf, one key per payload
            return chunk, np.bitwise_and(chunk.view(np.uint32), np.uint32(0x7FFFFFFF), out=keys[:count])

        for j, (_, count) in enumerate(spans):
            chunk, k = chunk_keys(j, count)
            if sums:
                total += float(chunk.sum(dtype=np.float64))
            if callable(a):
                zeros += count - int(np.count_nonzero(k))
            coarse += np.bincount(np.right_shift(k, 16, out=bins[:count]), minlength=len(coarse))
        if callable(a):
            a, b = a(n - zeros)
        a, b = max(0, a), min(n, b)
        if a >= b:
            return cls(None, None, [], 0.0, total, nothing=True)
        if a == 0 and b == n:
            return cls(None, None, [], total, total, everything=True)
        # ascending ranks: the b-th largest at n - b, the (a+1)-th at n - 1 - a; a bound only where needed
        ranks = [r for r, needed in ((n - b, b < n), (n - 1 - a, a > 0)) if needed]
        below = np.cumsum(coarse) - coarse  # entries in the bins before each bin
        where = {r: int(np.searchsorted(below + coarse, r, side="right")) for r in ranks}
        wanted = sorted(set(where.values()) | ({0x7F80} if coarse[0x7F80] else set()))  # 0x7F80: inf and NaNs
        fine = {B: np.zeros(1 << 16, np.int64) for B in wanted}
        low_bin = where[n - b] if b < n else -1
        high_bin = where[n - 1 - a] if a > 0 else 1 << 15
        stored: list | None = []
        held = between = 0
        for j, (_, count) in enumerate(spans):
            chunk, k = chunk_keys(j, count)
            top = np.right_shift(k, 16, out=bins[:count])
            if sums and high_bin - low_bin > 1:  # the values in the bins strictly between the edges' bins
                between += float(np.sum(chunk, where=(top > low_bin) & (top < high_bin), dtype=np.float64))
            mask = top == wanted[0]
            for B in wanted[1:]:
                mask |= top == B
            picked = k[mask]
            if stored is not None:
                held += len(picked)
                if held <= STORED:
                    stored.append(picked)
                    continue
                for p in stored:  # too many to keep: count what was kept, count the rest as it comes
                    cls._count(p, fine)
                stored = None
            cls._count(picked, fine)
        if stored is not None:
            cls._count(np.concatenate(stored) if stored else np.empty(0, np.uint32), fine)
        nans = int(coarse[0x7F81:].sum()) + (int(fine[0x7F80][1:].sum()) if 0x7F80 in fine else 0)

        def at(rank: int):
            """The value of that ascending rank, and how many values are greater (NaN is not) and equal."""
            B = where[rank]
            counts = fine[B]
            within = np.cumsum(counts)
            low = int(np.searchsorted(within, rank - int(below[B]), side="right"))
            key = (B << 16) | low
            value = np.array([key], np.uint32).view(np.float32)[0]
            if key > 0x7F800000:  # a NaN: nothing compares greater or equal
                return value, key, 0, 0
            return value, key, n - int(below[B]) - int(within[low]) - nans, int(counts[low])

        found = {r: at(r) for r in ranks}
        low = found[n - b] if b < n else None
        high = found[n - 1 - a] if a > 0 else None
        edges, edge_keys = [], []
        for edge in (high, low):
            if edge is None or (edges and edges[0].value == edge[0]):
                continue
            value, key, greater, equal = edge
            first, last = max(0, a - greater), min(equal, b - greater)
            edges.append(_Edge(value, first, last, None if (first, last) == (0, equal) else []))
            edge_keys.append(key)
        counted = [(e, key) for e, key in zip(edges, edge_keys) if e.before is not None]
        if counted and stored is not None:  # from the keys the second pass kept
            for edge, key in counted:
                running = 0
                for p in stored:
                    edge.before.append(running)
                    if key <= 0x7F800000:
                        running += int(np.count_nonzero(p == key))
        elif counted:  # a third pass
            running = [0] * len(counted)
            for j, (_, count) in enumerate(spans):
                _, k = chunk_keys(j, count)
                for i, (edge, key) in enumerate(counted):
                    edge.before.append(running[i])
                    if key <= 0x7F800000:
                        running[i] += int(np.count_nonzero(k == key))
        kept = 0.0
        if sums and nans:
            kept = float("nan")  # as the sum of the ranks would be (and the total is NaN too)
        elif sums:  # between the edges' bins; in the edges' bins, from the counts of each value; the edges' share
            low_key = low[1] if low is not None else -1
            high_key = high[1] if high is not None else 1 << 31
            kept = between
            for B in {low_bin, high_bin} & fine.keys():
                keys = (B << 16) | np.arange(1 << 16, dtype=np.int64)
                inside = (keys > low_key) & (keys < high_key) & (fine[B] > 0)
                worth = keys[inside].astype(np.uint32).view(np.float32).astype(np.float64)
                kept += float((worth * fine[B][inside]).sum())
            for edge in edges:
                if edge.last > edge.first:
                    kept += float(np.float64(edge.value) * (edge.last - edge.first))
        return cls(low[0] if low is not None else None, high[0] if high is not None else None, edges, kept, total)

    @staticmethod
    def _count(picked, fine: dict) -> None:
        """Adds the keys `picked` (of the wanted bins) to their bins' counts by their low 16 bits."""
        import numpy as np

        if not len(picked):
            return
        top = picked >> 16
        for B, counts in fine.items():
            counts += np.bincount(picked[top == B] & 0xFFFF, minlength=len(counts))

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
