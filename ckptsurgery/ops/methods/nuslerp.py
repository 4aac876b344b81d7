"""nuslerp: slerp between two models (or their deltas from a base, when --base is given), with t
from their weights, over the flattened tensor (default), its rows or its columns."""

from __future__ import annotations

from ._base import BaseOptional
from ._parameters import WEIGHTS, Parameter
from ._vectors import Vectors

NUSLERP_FLATTEN = Parameter("nuslerp_flatten", "nuslerp: interpolate the tensor as one flat vector; "
                            "--no-nuslerp-flatten: each row (or column, with --nuslerp-row-wise) apart.", "", type=bool,
                            default=True)
NUSLERP_ROW_WISE = Parameter("nuslerp_row_wise", "nuslerp, not flattened: interpolate along the first dimension "
                             "(mergekit's dim 0: the columns of a matrix) instead of the last.", "", type=bool,
                             default=False)
NORM_FLOOR = 1e-7  # a vector's norm below this normalizes as this
COLINEAR = 1e-16  # 1 − cos² at most this: interpolated linearly
WEIGHTS_EPS = 1e-6  # weights summing to less than this (in magnitude): t = 0.5


class Nuslerp(BaseOptional):
    name = "nuslerp"
    summary = ("slerp from v₀ to v₁ at t = w₁ / (w₀ + w₁) (0.5 when the weights sum to 0), vᵢ = θᵢ, or θᵢ − base "
               "added back to the base; per tensor, row or column")
    parameters = (WEIGHTS, NUSLERP_FLATTEN, NUSLERP_ROW_WISE)
    min_models = max_models = 2
    listing_order = 61

    def measure(self) -> None:
        """Both vectors' norms and their dot product, per vector, in float64; then each vector's
        two coefficients."""
        import numpy as np

        w0, w1 = self.params["weights"]
        total = w0 + w1
        t = 0.5 if abs(total) < WEIGHTS_EPS else w1 / total
        how = "whole" if self.params["nuslerp_flatten"] else "columns" if self.params["nuslerp_row_wise"] else "rows"
        self.vectors = Vectors(self.shape, self.numel, how)
        sums = np.zeros((3, self.vectors.count))
        for j in range(self.chunks):
            start, count = self.span(j)
            v0, v1 = self.points([read(start, count) for read in self.reads])
            for k, product in enumerate((v0 * v0, v1 * v1, v0 * v1)):
                sums[k] += self.vectors.sums(start, product)
        n0, n1 = np.maximum(np.sqrt(sums[0]), NORM_FLOOR), np.maximum(np.sqrt(sums[1]), NORM_FLOOR)
        cos = np.clip(sums[2] / (n0 * n1), -1, 1)
        colinear = (1 - cos * cos) <= COLINEAR
        theta = np.arccos(np.where(colinear, 0.0, cos))
        sin = np.where(colinear, 1.0, np.sin(theta))
        self.a = np.where(colinear, 1 - t, np.sin((1 - t) * theta) / sin).astype(self.wide)
        self.b = np.where(colinear, t, np.sin(t * theta) / sin).astype(self.wide)
        self.t = t

    def merge_chunk(self, j: int, values: list, out):
        import numpy as np

        start, count = self.span(j)
        v0, v1 = self.points(values)
        result = np.multiply(self.vectors.spread(start, count, self.a), v0, out=out)
        result += self.vectors.spread(start, count, self.b) * v1
        return self.add_base(result, values)


