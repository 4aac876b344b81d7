"""mergekit's "generalized task arithmetic", which task-arithmetic, ties, dare-*, breadcrumbs* and
della* are settings of: δᵢ = θᵢ − base; sparsified (`Sparsification`, with each model's own
density), rescaled to its L1 norm when `rescale`; times wᵢ; summed, or summed where its sign is
the elected one (`Consensus`); divided by the (agreeing) weights when `normalize`; times λ; added
to the base. A method of this family is a subclass that sets its sparsification and consensus
and declares its parameters (their defaults are mergekit's for that method)."""

from __future__ import annotations

from typing import ClassVar

from ...kinds import Kind
from ._base import MergeMethod, below, uniform_draws
from ._parameters import INT8_MASK, NORMALIZE, NORMALIZE_ON, RESCALE, Parameter, Range
from ._select import RankWindow

RESCALE_EPS = 1e-7  # a delta is left unscaled when its L1 norm before or after is below this
NORMALIZE_EPS = 1e-8  # without a consensus, weights summing to less than this (in magnitude) divide by 1

# the toggles, with each method's default (mergekit's)
NORMALIZE_OFF = NORMALIZE
RESCALE_ON, RESCALE_OFF = RESCALE.variant(default=True), RESCALE
GAMMA = Parameter("gamma", "breadcrumbs*: the fraction of each delta's largest entries dropped as outliers (fewer "
                  "when the density needs them); one value, or one per model.", "G[,G..]", default=0.01,
                  range=Range(lambda v: 0 <= v <= 1, "in [0, 1]"), per_model=True, broadcast=True, per_tensor=True,
                  each="gamma")
EPSILON = Parameter("epsilon", "della*: keep chances from D−ε (smallest entries) to D+ε (largest) along each row; "
                    "one value, or one per model (D ± ε in (0, 1)); ram*: a delta's entries of magnitude at most ε "
                    "count as unchanged (one value).", "E[,E..]", default=0.15,
                    range=Range(lambda v: 0 <= v < 1, "in [0, 1)"), per_model=True, broadcast=True, per_tensor=True,
                    each="epsilon")
TOGGLES = (INT8_MASK,)  # accepted by every method of the family; changes nothing in our math

# what the family's methods import from here (NORMALIZE_ON re-exported beside its OFF)
__all__ = ["EPSILON", "GAMMA", "NORMALIZE_OFF", "NORMALIZE_ON", "RESCALE_OFF", "RESCALE_ON", "TOGGLES", "Consensus",
           "Sparsification", "TaskArithmetic"]


class Sparsification(Kind):
    """How each delta is thinned before it is weighted (mergekit's `SparsificationMethod`)."""

    MAGNITUDE = "magnitude"  # TIES: keep exactly the top `density` fraction by magnitude
    RANDOM = "random"  # DARE: keep each entry with chance `density`
    MAGNITUDE_OUTLIERS = "magnitude_outliers"  # breadcrumbs: drop the top `gamma`, keep the next `density`
    DELLA_MAGPRUNE = "della_magprune"  # DELLA: keep chances by rank within each row, D − ε to D + ε


class Consensus(Kind):
    """How the weighted deltas are combined where their signs disagree (mergekit's `ConsensusMethod`)."""

    SUM = "sum"  # elect the sign of Σ dᵢ; sum only the dᵢ of that sign (TIES' sign election)


class TaskArithmetic(MergeMethod):
    """The family's math; a method of it sets the class attributes below and declares its
    parameters, NORMALIZE_ON/OFF and RESCALE_ON/OFF giving its defaults."""

    needs_base = True
    sparsification: ClassVar[Sparsification | None] = None  # None: every entry of δᵢ is kept
    consensus: ClassVar[Consensus | None] = None  # None: Σ dᵢ

    @classmethod
    def check(cls, values: dict) -> None:
        if cls.sparsification is Sparsification.DELLA_MAGPRUNE:
            from ...errors import UsageError

            densities, epsilons = values["density"], values["epsilon"]
            count = max(len(v) if isinstance(v, list) else 1 for v in (densities, epsilons))
            for d, e in zip(*(v if isinstance(v, list) else [v] * count for v in (densities, epsilons))):
                if d < 1 and not (0 < d - e and d + e < 1):
                    raise UsageError(f"--density {d:g} with --epsilon {e:g}: density ± epsilon must be in (0, 1) "
                                     f"(or the density 1)")

    def measure(self) -> None:
        """Per model, what its sparsification needs from the whole tensor: a rank window (TIES,
        breadcrumbs) or drawn masks kept a bit per entry (DARE, DELLA), and the factor that
        rescales the kept entries to the delta's L1 norm (1 without `rescale`)."""
        self.selections: list = [None] * self.models
        self.factors = [1.0] * self.models
        if self.sparsification is None or not self.numel:
            return
        for i, (density, extra) in enumerate(zip(self.each("density", 1.0), self._extra())):
            if density >= 1:  # mergekit leaves the delta as it is: no sparsification, no rescale
                continue
            if self.sparsification in (Sparsification.MAGNITUDE, Sparsification.MAGNITUDE_OUTLIERS):
                a, b = self._window(density, extra)
                window = RankWindow.measure(self.numel, [self.span(j) for j in range(self.chunks)],
                                            lambda j, out, i=i: self._magnitude(i, j, out), self.wide, a, b,
                                            sums=bool(self.params.get("rescale")))
                self.selections[i] = window
                kept, total = window.kept_sum, window.total_sum
            else:
                self.selections[i], kept, total = self._draw_masks(i, density, extra)
            if self.params.get("rescale") and total >= RESCALE_EPS and kept >= RESCALE_EPS:
                self.factors[i] = total / kept

    def _extra(self) -> list:
        if self.sparsification is Sparsification.MAGNITUDE_OUTLIERS:
            return self.each("gamma", 0.01)
        if self.sparsification is Sparsification.DELLA_MAGPRUNE:
            return self.each("epsilon", 0.15)
        return [None] * self.models

    def _window(self, density: float, gamma: float | None) -> tuple[int, int]:
        """The ranks kept, largest first: TIES the top k = max(1, ⌊D·n⌋); breadcrumbs (mergekit's
        ascending indices[n_bot : n_bot + ⌊D·n⌋], n_bot = max(0, n − ⌊D·n⌋ − ⌊γ·n⌋)) the ⌊D·n⌋
        after the top min(⌊γ·n⌋, n − ⌊D·n⌋)."""
        n = self.numel
        if self.sparsification is Sparsification.MAGNITUDE:
            return 0, max(1, int(density * n))
        target, top = int(density * n), int(gamma * n)
        bottom = max(0, n - target - top)
        return n - bottom - target, n - bottom

    def _magnitude(self, i: int, j: int, out):
        import numpy as np

        start, count = self.span(j)
        return np.abs(np.subtract(self.reads[i + 1](start, count), self.reads[0](start, count), out=out), out=out)

    # -- DARE and DELLA: masks drawn once, kept a bit per entry --

    def _draw_masks(self, i: int, density: float, epsilon: float | None):
        """Model i's mask for the whole tensor, drawn element by element (`uniform_draws`): kept
        where its draw is below the keep chance — D (DARE), or D − ε + 2ε·r/(m−1) (DELLA), r the
        entry's rank by magnitude among the m entries of its row (mergekit: along dimension 1; a
        1-D tensor is one row; a row of one entry has the chance D). Returns the packed masks per
        chunk and the L1 norms after and before."""
        import numpy as np

        seed = self.params.get("seed", 0)
        if self.sparsification is Sparsification.RANDOM:
            masks, kept, total, limit = [], 0.0, 0.0, below(density)
            for j in range(self.chunks):
                start, count = self.span(j)
                magnitude = self._magnitude(i, j, self.scratch(0, count))
                keep = uniform_draws(seed, self.key, i, start, count) < limit
                total += float(magnitude.sum())  # each chunk's sum in the wide dtype, the chunks' in float64
                kept += float(np.multiply(magnitude, keep, out=magnitude).sum())
                masks.append(np.packbits(keep))
            return masks, kept, total
        shape = self.shape if len(self.shape) >= 2 else (1, self.numel)
        rows, length = shape[0], shape[1]
        rest = self.numel // max(1, rows * length)  # the dimensions after the second: each a row of its own
        slab = length * rest  # one index of the first dimension
        keep = np.empty(self.numel, bool)
        kept = total = 0.0
        per_read = max(1, self.chunk_size // max(1, slab))
        # float32 magnitudes (≥ 0) rank as their bits do: one uint64 key per entry, its bits above
        # its column, sorted (no ties left, so any sort ranks as a stable argsort would); the keep
        # chance of each rank from a table computed as the ranks' chances were, element by element
        shift = max(1, (int(length) - 1).bit_length())
        by_key = np.dtype(self.wide) == np.float32 and length > 1 and shift <= 32
        if by_key:
            scaled = np.arange(length, dtype=np.float64) / (length - 1)
            thresholds = np.floor(((density - epsilon) + scaled * (2 * epsilon)) * 2**32)
        for first in range(0, rows, per_read):
            start, count = first * slab, min(per_read, rows - first) * slab
            delta = np.subtract(self.reads[i + 1](start, count), self.reads[0](start, count))
            magnitude = np.abs(delta).reshape(-1, length, rest)
            draws = uniform_draws(seed, self.key, i, start, count)
            if by_key:
                chunk_keep = keep[start:start + count].reshape(magnitude.shape)
                self._della_keep(magnitude, draws, thresholds, shift, chunk_keep)
            else:
                order = np.argsort(magnitude, axis=1, kind="stable")
                ranks = np.empty(order.shape, np.float64)
                np.put_along_axis(ranks, order, np.arange(length, dtype=np.float64).reshape(1, -1, 1), axis=1)
                scaled = ranks / (length - 1) if length > 1 else np.full(ranks.shape, 0.5)
                chance = (density - epsilon) + scaled * (2 * epsilon)
                chunk_keep = draws.reshape(chance.shape) < np.floor(chance * 2**32)
                keep[start:start + count] = chunk_keep.reshape(-1)
            total += float(magnitude.sum(dtype=np.float64))
            kept += float((magnitude * chunk_keep).sum(dtype=np.float64))
        masks = [np.packbits(keep[s:s + c]) for s, c in map(self.span, range(self.chunks))]
        return masks, kept, total

    @staticmethod
    def _della_keep(magnitude, draws, thresholds, shift: int, out) -> None:
        """DELLA's mask of a block of float32 magnitudes (shape (rows, length, rest), ranked along
        axis 1) into `out` (that shape): kept where the entry's draw is below thresholds[rank], the
        rank its place in a stable ascending sort of its row. A NaN (any payload) ranks above
        inf, NaNs in row-major order, as numpy's sort puts them."""
        import numpy as np

        groups, length, rest = magnitude.shape
        bits = np.minimum(magnitude.view(np.uint32), np.uint32(0x7F800001))  # every NaN one key, above inf
        keys = np.empty((groups, rest, length), np.uint64)
        np.left_shift(bits.transpose(0, 2, 1), shift, out=keys, dtype=np.uint64)
        keys |= np.arange(length, dtype=np.uint64)
        keys.sort(axis=-1)
        where = (keys & np.uint64((1 << shift) - 1)).astype(np.intp)  # the column of each rank
        del keys
        if rest > 1:
            where *= rest
        where += (np.arange(groups, dtype=np.intp)[:, None] * (length * rest)
                  + np.arange(rest, dtype=np.intp)[None, :])[:, :, None]
        where = where.reshape(-1)
        flat = out.reshape(-1)
        flat[where] = (draws[where].reshape(groups, rest, length) < thresholds).reshape(-1)

    # -- one chunk --

    def _sparsified(self, i: int, j: int, delta):
        import numpy as np

        selection = self.selections[i]
        if selection is None:
            return delta
        if isinstance(selection, RankWindow):
            keep = selection.keep(j, np.abs(delta, out=self.scratch(len(self.reads) + 2, len(delta))))
        else:
            keep = np.unpackbits(selection[j], count=delta.size).view(bool)
        return np.multiply(delta, keep, out=delta)

    def _weighted_deltas(self, j: int, base, thetas) -> list:
        """wᵢ·δᵢ, sparsified and rescaled, each in scratch i+1: the inputs stay as read."""
        import numpy as np

        deltas = []
        for i, (theta, w) in enumerate(zip(thetas, self.params["weights"])):
            delta = self._sparsified(i, j, np.subtract(theta, base, out=self.scratch(i + 1, len(base))))
            w = w * self.factors[i]
            if w != 1:
                delta *= w
            deltas.append(delta)
        return deltas

    def _agreeing_sum(self, deltas: list, mixed):
        """Where Σ dᵢ (in `mixed`) is ≥ 0 the sign + is elected, else −; the sum of the dᵢ of that
        sign (a zero never agrees), divided by their weights' sum when normalizing (1 where none)."""
        import numpy as np

        one = np.ones(1, self.wide)[0]
        count = len(mixed)
        positive = np.greater_equal(mixed, 0, out=self.buffer("elected", count, bool))
        elected = np.multiply(positive, one + one, out=self.scratch(len(deltas) + 2, count))
        elected -= one  # +1 where Σ dᵢ ≥ 0, else −1 (NaN: −1), as np.where(mixed >= 0, 1, −1)
        mixed[:] = 0
        counted = None
        if self.params.get("normalize"):
            counted = self.scratch(len(deltas) + 4, count)
            counted[:] = 0
        counts = self.scratch(len(deltas) + 1, count)
        agrees = self.buffer("agrees", count, bool)
        for d, w in zip(deltas, self.params["weights"]):
            np.greater(np.multiply(d, elected, out=counts), 0, out=agrees)
            mixed += np.multiply(d, agrees, out=counts)
            if counted is not None:
                counted += np.multiply(agrees, one * w, out=counts)
        if counted is not None:
            counted[counted == 0] = 1
            mixed /= counted
        return mixed

    def merge_chunk(self, j: int, values: list, out):
        import math

        import numpy as np

        base = values[0]
        deltas = self._weighted_deltas(j, base, values[1:])
        mixed = deltas[0]
        if self.consensus is not None:  # the deltas are needed again: the sum goes elsewhere
            mixed = self.scratch(0, len(base))
            mixed[:] = deltas[0]
        for d in deltas[1:]:
            mixed += d
        if self.consensus is Consensus.SUM:
            mixed = self._agreeing_sum(deltas, mixed)
        elif self.params.get("normalize"):
            total = math.fsum(self.params["weights"])
            if abs(total) >= NORMALIZE_EPS:
                mixed /= total
        scale = self.params.get("scale", 1.0)
        if scale != 1:
            mixed *= scale
        return np.add(base, mixed, out=out)
