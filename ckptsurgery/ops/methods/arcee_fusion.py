"""arcee-fusion (https://arcee.ai): the model's changes kept where they matter most — each entry's
|δ| times its row's KL divergence between the model's and the base's softmax, above the upper
fence median + 1.5·IQR of those scores."""

from __future__ import annotations

import os
import threading

from ._base import MergeMethod
from ._vectors import Vectors

PROBABILITY_EPS = 1e-8  # added to each softmax probability
QUANTILES = (0.25, 0.5, 0.75)
THREADS = min(2, os.cpu_count() or 1)  # threads scoring blocks of rows in measure()


class ArceeFusion(MergeMethod):
    name = "arcee-fusion"
    summary = ("base + δ where |δ|·KL(softmax θ ‖ softmax base) of its row (the last dimension) ≥ median + "
               "1.5·(q₃ − q₁) of those scores over the tensor; of exactly one model")
    needs_base = True
    min_models = max_models = 1
    listing_order = 85
    differs = ("the quartiles are exact, of every score (mergekit sorts a random sample of 10⁶ of them, drawn with "
               "replacement, for a larger tensor); writes the dtype asked for (mergekit's float mask promotes a "
               "bfloat16 merge to float32)")

    def measure(self) -> None:
        """Each row's KL divergence (whole rows read at a time: a 1-D tensor at once), one number
        a row, and, while the rows are at hand, their scores, every score held once (4 bytes an
        element in float32) for the quartiles. Blocks of rows are independent: two threads take
        them (numpy's exp and log let go of the GIL), each with its own buffers; the same bits."""
        import numpy as np

        self.rows = Vectors(self.shape, self.numel, "rows")
        n, length = self.numel, self.numel // max(1, self.rows.count)
        self.kl = np.zeros(self.rows.count, self.wide)
        per_read = max(1, self.chunk_size // max(1, length))
        scores = np.empty(n, self.wide)
        blocks = [(first, min(per_read, self.rows.count - first)) for first in range(0, self.rows.count, per_read)]
        local = threading.local()  # each thread's buffers (the one thread's, without a pool)
        if len(blocks) > 1 and THREADS > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(THREADS, thread_name_prefix="ckptsurgery-arcee") as pool:
                list(pool.map(lambda block: self._score_rows(*block, length, scores, local), blocks))
        else:
            for first, rows in blocks:
                self._score_rows(first, rows, length, scores, local)
        self.threshold = _fence(scores) if n else 0.0

    def _score_rows(self, first: int, rows: int, length: int, scores, local) -> None:
        """Rows [first, first + rows): their KL into `self.kl`, their scores into `scores`, with
        the float64 buffers `local` holds (made on first use, the size of the largest block)."""
        import numpy as np

        start, count = first * length, rows * length
        if getattr(local, "p", None) is None or local.p.size < count:
            local.p, local.q = np.empty(count, np.float64), np.empty(count, np.float64)
        theta, base = self.reads[1](start, count), self.reads[0](start, count)
        p = self._softmax(theta.reshape(rows, length), local.p[:count].reshape(rows, length))
        q = self._softmax(base.reshape(rows, length), local.q[:count].reshape(rows, length))
        ratio = np.divide(p, q, out=q)
        terms = np.multiply(p, np.log(ratio, out=ratio), out=ratio)
        kl = self.kl[first:first + rows]
        kl[:] = terms.sum(axis=1)
        block = np.abs(np.subtract(theta, base, out=scores[start:start + count]), out=scores[start:start + count])
        block.reshape(rows, length)[...] *= kl[:, None]  # |δ| times its row's KL

    @staticmethod
    def _softmax(x, out):
        """softmax + ε of each row of `x`, in float64, into `out` (of x's shape)."""
        import numpy as np

        out[...] = x
        out -= x.max(axis=1, keepdims=True)  # float32 in: the float64 difference is exact
        np.exp(out, out=out)
        out /= out.sum(axis=1, keepdims=True)
        out += PROBABILITY_EPS
        return out

    def merge_chunk(self, j: int, values: list, out):
        """base + δ where |δ|·KL of its row ≥ the threshold: δ computed once, its scores beside it."""
        import numpy as np

        start, count = self.span(j)
        delta = np.subtract(values[1], values[0], out=out)
        scores = self.rows.multiply(start, np.abs(delta, out=self.scratch(0, count)), self.kl)
        delta *= np.greater_equal(scores, self.threshold, out=self.buffer("keep", count, bool))
        delta += values[0]
        return delta


def _fence(scores) -> float:
    """median + 1.5·(q₃ − q₁) of `scores` (partitioned in place), mergekit's sorted[int(q·(n − 1))]:
    one order statistic per partition (numpy's vectorized selection takes one; a list of them is
    several times slower): the median, then q1 among those below it, q3 among those above."""
    n = scores.size
    lo, mid, hi = (int(q * (n - 1)) for q in QUANTILES)
    scores.partition(mid)
    below = (lambda: scores[:mid].partition(lo)) if lo < mid else None
    above = (lambda: scores[mid + 1:].partition(hi - mid - 1)) if hi > mid else None
    if below and above and THREADS > 1:  # the two halves are disjoint: partitioned at once (numpy lets go of the GIL)
        other = threading.Thread(target=above)
        other.start()
        below()
        other.join()
    else:
        for part in (below, above):
            if part:
                part()
    q1, median, q3 = scores[lo], scores[mid], scores[hi]
    return median + 1.5 * (q3 - q1)
