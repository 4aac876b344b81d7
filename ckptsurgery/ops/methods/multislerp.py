"""multislerp (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea): barycentric interpolation
of any number of models on the hypersphere (of their deltas, when --base is given)."""

from __future__ import annotations

import math

from ...errors import CkptError, UsageError
from ._base import BaseOptional
from ._parameters import WEIGHTS, Parameter, Range

NORMALIZE_WEIGHTS = Parameter("normalize_weights", "multislerp: divide the weights by their sum.", "", type=bool,
                              default=True)
EPS = Parameter("eps", "multislerp: added to the norms it divides by.", "EPS", default=1e-8,
                range=Range(lambda v: v >= 0, "0 or more"))


class Multislerp(BaseOptional):
    name = "multislerp"
    summary = ("the weighted mean of the unit vectors vᵢ/‖vᵢ‖ (vᵢ = θᵢ, or θᵢ − base added back), projected to "
               "the sphere through its tangent space, times Σ wᵢ‖vᵢ‖; one model: that model")
    parameters = (WEIGHTS, NORMALIZE_WEIGHTS, EPS)
    min_models = 1
    listing_order = 62
    differs = ("refuses weights summing to 0 with --normalize-weights (mergekit divides by 0: NaN); the tangent "
               "step computed from the models' dot products (exact where mergekit adds float32 rounding)")

    @classmethod
    def check(cls, values: dict) -> None:
        if values["normalize_weights"] and sum(values["weights"]) == 0:
            raise UsageError("--method multislerp: the --weights sum to 0: they cannot be normalized "
                             "(give others, or --no-normalize-weights)")

    def measure(self) -> None:
        """The models' (or deltas') dot products, summed chunk by chunk in float64 (an N × N
        matrix): every norm and angle of the method follows from them, so the result is one
        linear combination of the models, coefficients measured once."""
        import numpy as np

        n = self.models
        gram = np.zeros((n, n))
        # the products in float64 (exact for float32 inputs) in one array reused from chunk to chunk,
        # summed by numpy: np.dot of float64 goes through BLAS, whose threads (and a fresh float64
        # copy per dot) cost ten times the sums on a busy two-core machine
        products = np.empty(min(self.chunk_size, self.numel), np.float64)
        for j in range(self.chunks):
            start, count = self.span(j)
            vs = self.points([read(start, count) for read in self.reads])
            for a in range(n):
                for b in range(a, n):
                    product = np.multiply(vs[a], vs[b], out=products[:count], dtype=np.float64)
                    gram[a, b] = gram[b, a] = gram[a, b] + float(product.sum())
        weights = np.array(self.params["weights"], np.float64)
        if self.params["normalize_weights"]:
            weights = weights / weights.sum()
        eps = self.params["eps"]
        if n == 1:
            self.coefficients, self.linear = None, False
            return
        norms = np.sqrt(np.maximum(np.diag(gram), 0))
        m = weights / (norms + eps)  # the weighted mean of the unit vectors, as coefficients of the vᵢ
        mean_norm = math.sqrt(max(float(m @ gram @ m), 0.0))
        if mean_norm < eps:
            if n == 2:
                self.coefficients = weights
                return
            raise CkptError(f"multislerp: {self.key}: the weighted sum of the models' directions is zero "
                            f"(antipodal models whose weights balance): give other --weights")
        mh = m / mean_norm
        dots = (gram @ mh) / (norms + eps)
        tangent = m - float(weights @ dots) * mh
        tangent_norm = math.sqrt(max(float(tangent @ gram @ tangent), 0.0)) + eps
        direction = mh * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
        self.coefficients = direction * float(norms @ weights)

    def merge_chunk(self, j: int, values: list, out):
        import numpy as np

        if self.coefficients is None:  # one model: itself, as mergekit returns it
            out = np.empty_like(values[-1]) if out is None else out
            out[:] = values[-1]
            return out
        vs = self.points(values)
        result = np.multiply(vs[0], self.coefficients[0], out=out)
        for v, c in zip(vs[1:], self.coefficients[1:]):
            result += v * c
        return self.add_base(result, values)
