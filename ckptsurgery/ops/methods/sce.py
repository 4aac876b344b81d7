"""sce (Wan et al. 2024, https://arxiv.org/abs/2408.07990): Select the entries where the task
vectors vary most, Calculate each model's weight from its vector's energy, Erase the entries whose
sign disagrees with the elected one."""

from __future__ import annotations

import math

from ._base import DeltaMethod
from ._parameters import INT8_MASK, Parameter, Range
from ._select import RankWindow

SELECT_TOPK = Parameter("select_topk", "sce: the fraction of entries kept, those where the task vectors' variance "
                        "across the models is largest (of the entries where it is not zero).", "K", default=1.0,
                        range=Range(lambda v: 0 <= v <= 1, "in [0, 1]"), per_tensor=True)
WEIGHT_EPS = 1e-6  # energies summing to less than this weigh the models equally; the agreeing weights are at least this


class Sce(DeltaMethod):
    name = "sce"
    summary = ("δᵢ kept where Var over i of δᵢ is among the top K (of the entries where it is not zero); wᵢ = mean "
               "of δᵢ² / Σ of those means; the sign of Σ δᵢ elected; Σ wᵢδᵢ over the agreeing ones / Σ of their wᵢ; "
               "plus base")
    parameters = (SELECT_TOPK, INT8_MASK)
    listing_order = 74
    differs = "equal variances at the cut: the earlier entries (row-major) are kept; mergekit's topk leaves it to the sort"

    def _stacked(self, values: list):
        """δᵢ of one chunk, stacked: [models, count], in an array reused from chunk to chunk."""
        import numpy as np

        count = len(values[0])
        if "stacked" not in self._buffers:
            self._buffers["stacked"] = np.empty((self.models, min(self.chunk_size, self.numel)), self.wide)
        deltas = self._buffers["stacked"][:, :count]
        for i, theta in enumerate(values[1:]):
            np.subtract(theta, values[0], out=deltas[i])
        return deltas

    def _variance(self, deltas, out=None):
        """Var over the models of each entry, as deltas.mean(axis=0) and np.square(deltas −
        mean).sum(axis=0) / models compute it (the same operations, in reused arrays)."""
        import numpy as np

        models, count = deltas.shape
        if "centered" not in self._buffers:
            self._buffers["centered"] = np.empty((models, min(self.chunk_size, self.numel)), self.wide)
        mean = np.add.reduce(deltas, axis=0, out=self.buffer("mean", count, self.wide))
        np.true_divide(mean, np.intp(models), out=mean, casting="unsafe")  # as ndarray.mean divides
        centered = np.subtract(deltas, mean, out=self._buffers["centered"][:, :count])
        np.square(centered, out=centered)
        if out is None:
            out = self.buffer("variance", count, self.wide)
        return np.divide(np.add.reduce(centered, axis=0, out=out), models, out=out)

    def _values(self, j: int):
        start, count = self.span(j)
        return [read(start, count) for read in self.reads]

    def measure(self) -> None:
        """The variance's top-K window (`RankWindow`: in float32 two passes over the chunks, the
        whole tensor's variances never held), then each model's energy, mean of its kept δᵢ²,
        chunk by chunk."""
        import numpy as np

        topk = self.params["select_topk"]
        self.window = None
        if topk < 1 and self.numel:
            def bounds(nonzero: int):
                return 0, int(nonzero * topk)

            self.window = RankWindow.measure(self.numel, [self.span(j) for j in range(self.chunks)],
                                             lambda j, out: self._variance(self._stacked(self._values(j)), out=out),
                                             self.wide, bounds)
        energy = [0.0] * self.models
        for j in range(self.chunks):
            deltas = self._kept(j, self._stacked(self._values(j)))
            for i in range(self.models):
                energy[i] += float(np.dot(deltas[i], deltas[i]))
        energy = [e / self.numel if self.numel else math.nan for e in energy]
        total = sum(energy)
        self.weights = [1 / self.models] * self.models if not abs(total) >= WEIGHT_EPS else [e / total for e in energy]

    def _kept(self, j: int, deltas):
        if self.window is None:
            return deltas
        deltas *= self.window.keep(j, self._variance(deltas))
        return deltas

    def merge_chunk(self, j: int, values: list, out):
        """The agreeing wᵢδᵢ over their weights, plus base — the float64 products of wᵢ, the masks
        and δᵢ added into float32 sums, as `merged += d * (w * agrees)` adds them — in arrays
        reused from chunk to chunk."""
        import numpy as np

        deltas = self._kept(j, self._stacked(values))
        count = deltas.shape[1]
        one = np.ones(1, self.wide)[0]
        total = np.add.reduce(deltas, axis=0, out=self.buffer("total", count, self.wide))
        positive = np.greater_equal(total, 0, out=self.buffer("positive", count, bool))
        elected = np.multiply(positive, one + one, out=total)
        elected -= one  # +1 where Σ δᵢ ≥ 0, else −1 (NaN: −1), as np.where(Σ δᵢ >= 0, 1, −1)
        merged, counted = self.buffer("merged", count, self.wide), self.buffer("counted", count, self.wide)
        merged[:] = 0
        counted[:] = 0
        sign, agrees = self.buffer("sign", count, self.wide), self.buffer("agrees", count, bool)
        weight, product = self.buffer("weight", count, np.float64), self.buffer("product", count, np.float64)
        for d, w in zip(deltas, self.weights):
            np.equal(np.sign(d, out=sign), elected, out=agrees)
            np.multiply(agrees, w, out=weight)  # w · agrees: float64, as a Python float times a mask is
            np.add(merged, np.multiply(d, weight, out=product), out=merged, casting="same_kind")
            np.add(counted, weight, out=counted, casting="same_kind")
        merged /= np.maximum(counted, WEIGHT_EPS, out=counted)
        return np.add(values[0], merged, out=out)
