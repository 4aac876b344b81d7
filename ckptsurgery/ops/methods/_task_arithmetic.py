"""mergekit's "generalized task arithmetic", which task-arithmetic, ties, dare-linear and dare-ties
are settings of: δᵢ = θᵢ − base; sparsified (`Sparsification`); times wᵢ; summed, or summed where
its sign is the elected one (`Consensus`), and for TIES divided by the agreeing weights
(`normalize`); times λ; added to the base. A method of this family is a subclass that sets them."""

from __future__ import annotations

from typing import ClassVar

from ...kinds import Kind
from ._base import MergeMethod, tensor_seed

RESCALE_EPS = 1e-7  # DARE leaves a delta unscaled when its L1 norm before or after is below this


class Sparsification(Kind):
    """How each delta is thinned before it is weighted (mergekit's `SparsificationMethod`)."""

    MAGNITUDE = "magnitude"  # TIES: keep exactly the top `density` fraction by magnitude
    RANDOM = "random"  # DARE: keep each entry with chance `density`, rescaled to the delta's L1 norm


class Consensus(Kind):
    """How the weighted deltas are combined where their signs disagree (mergekit's `ConsensusMethod`)."""

    SUM = "sum"  # elect the sign of Σ dᵢ; sum only the dᵢ of that sign (TIES' sign election)


class TaskArithmetic(MergeMethod):
    """The family's math; a method of it sets the three class attributes below."""

    needs_base = True
    sparsification: ClassVar[Sparsification | None] = None  # None: every entry of δᵢ is kept
    consensus: ClassVar[Consensus | None] = None  # None: Σ dᵢ
    normalize: ClassVar[bool] = False  # with a consensus: divide by the sum of the agreeing weights

    def measure(self) -> None:
        density = self.params.get("density", 1.0)
        if self.sparsification is Sparsification.MAGNITUDE and density < 1 and self.numel:
            self._find_cuts(density)
        elif self.sparsification is Sparsification.RANDOM and density < 1:
            self._measure_drop(density)

    def _delta(self, i: int, start: int, count: int, out=None):
        import numpy as np

        return np.subtract(self.reads[i](start, count), self.reads[0](start, count), out=out)

    # -- TIES: the magnitude cut --

    def _find_cuts(self, density: float) -> None:
        """TIES keeps exactly k = max(1, int(density·numel)) entries of each delta: those whose
        magnitude is above the k-th largest, then those equal to it in row-major order until
        there are k. Per model: the cut, how many equal entries to keep, and how many equal
        entries lie in the chunks before each chunk (so any chunk can be computed alone)."""
        import numpy as np

        n = self.numel
        k = max(1, int(density * n))
        self.cuts = []
        for i in range(1, len(self.reads)):
            magnitude = np.empty(n, self.wide)  # the one whole array: filled chunk by chunk
            for s, c in map(self.span, range(self.chunks)):
                np.abs(self._delta(i, s, c, out=magnitude[s:s + c]), out=magnitude[s:s + c])
            magnitude.partition(n - k)  # in place: the k-th largest lands at n - k, larger ones after it
            cut = magnitude[n - k]
            above = int(np.count_nonzero(magnitude[n - k + 1:] > cut))
            equal_total = int(np.count_nonzero(magnitude == cut))
            del magnitude
            if k - above >= equal_total:  # every entry equal to the cut is kept: nothing to count
                self.cuts.append((cut, None, None))
                continue
            equal = []  # equal entries beyond k (ties at the cut): the first ones in row-major order
            for s, c in map(self.span, range(self.chunks)):
                equal.append(int(np.count_nonzero(np.abs(self._delta(i, s, c)) == cut)))
            before = [0, *np.cumsum(equal)[:-1].tolist()]
            self.cuts.append((cut, k - above, before))

    def _kept_by_magnitude(self, i: int, j: int, delta):
        import numpy as np

        cut, equal_to_keep, before = self.cuts[i]
        magnitude = np.abs(delta)
        if before is None:
            return np.multiply(delta, magnitude >= cut, out=delta)
        keep = magnitude > cut
        room = equal_to_keep - before[j]
        if room > 0:
            equal = np.flatnonzero(magnitude == cut)[:room]
            keep[equal] = True
        return np.multiply(delta, keep, out=delta)

    # -- DARE: the random drop --

    def _draw_kept(self, i: int, j: int, count: int, density: float):
        """DARE's draws for model i in chunk j: ⌈count/2⌉ raw 64-bit outputs of PCG64 seeded by
        `tensor_seed`, read as little-endian uint32s (the first `count`); an entry is kept where
        its uint32 is below ⌊density·2³²⌋ — a uniform draw below the density, 2⁻³² apart."""
        import numpy as np

        generator = np.random.PCG64(tensor_seed(self.params["seed"], self.key, i, j))
        draws = generator.random_raw((count + 1) // 2).astype("<u8", copy=False).view("<u4")[:count]
        return draws < np.uint32(int(density * 2**32))

    def _measure_drop(self, density: float) -> None:
        """DARE rescales the kept entries so that each delta keeps its L1 norm: the norms before
        and after the drop, summed chunk by chunk. The masks are drawn once and kept, a bit per
        entry."""
        import numpy as np

        self.rescale, self.kept = [], []
        for i in range(1, len(self.reads)):
            before = after = 0.0
            masks = []
            for j in range(self.chunks):
                start, count = self.span(j)
                magnitude = np.abs(self._delta(i, start, count, self.scratch(0, count)), out=self.scratch(0, count))
                kept = self._draw_kept(i - 1, j, count, density)
                before += float(magnitude.sum())
                after += float(np.multiply(magnitude, kept, out=magnitude).sum())
                masks.append(np.packbits(kept))
            self.kept.append(masks)
            self.rescale.append(1.0 if before < RESCALE_EPS or after < RESCALE_EPS else before / after)

    def _dropped(self, i: int, j: int, delta):
        """DARE: the entries of the delta that were kept (the masks drawn by `measure`); the
        rescale that keeps its L1 norm is applied with the weight."""
        import numpy as np

        return np.multiply(delta, np.unpackbits(self.kept[i][j], count=delta.size).view(bool), out=delta)

    # -- one chunk --

    def _weighted_deltas(self, j: int, base, thetas) -> list:
        """wᵢ·δᵢ, sparsified, each in scratch i+1: the inputs stay as read."""
        import numpy as np

        density = self.params.get("density", 1.0)
        deltas = []
        for i, (theta, w) in enumerate(zip(thetas, self.params["weights"])):
            delta = np.subtract(theta, base, out=self.scratch(i + 1, len(base)))
            if self.sparsification is Sparsification.MAGNITUDE and density < 1:
                delta = self._kept_by_magnitude(i, j, delta)
            elif self.sparsification is Sparsification.RANDOM and density < 1:
                delta = self._dropped(i, j, delta)
                w = w * self.rescale[i]
            if w != 1:
                delta *= w
            deltas.append(delta)
        return deltas

    def _agreeing_sum(self, deltas: list, mixed):
        """Where Σ dᵢ (in `mixed`) is ≥ 0 the sign + is elected, else −; the sum of the dᵢ of that
        sign (a zero never agrees), divided by their weights' sum when normalizing (1 where none)."""
        import numpy as np

        one = np.ones(1, self.wide)[0]
        elected = np.where(mixed >= 0, one, -one)
        mixed[:] = 0
        counted = np.zeros_like(mixed) if self.normalize else None
        counts = self.scratch(len(deltas) + 1, len(mixed))
        for d, w in zip(deltas, self.params["weights"]):
            agrees = np.multiply(d, elected, out=counts) > 0
            mixed += np.multiply(d, agrees, out=counts)
            if counted is not None:
                counted += np.multiply(agrees, one * w, out=counts)
        if counted is not None:
            counted[counted == 0] = 1
            mixed /= counted
        return mixed

    def merge_chunk(self, j: int, values: list, out):
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
        scale = self.params.get("scale", 1.0)
        if scale != 1:
            mixed *= scale
        return np.add(base, mixed, out=out)
