"""karcher (https://arxiv.org/abs/2603.04972): the Karcher (Riemannian) mean of the models'
directions on the unit sphere, found by gradient steps, times their mean norm."""

from __future__ import annotations

import math

from ._base import MergeMethod
from ._parameters import NON_NEGATIVE, Parameter, Range

MAX_ITER = Parameter("max_iter", "karcher: at most this many steps.", "N", type=int, default=10, range=NON_NEGATIVE)
TOL = Parameter("tol", "karcher: stop when a step is shorter than this (and skip models closer than this).", "TOL",
                default=1e-5, range=Range(lambda v: v >= 0, "0 or more"))


class Karcher(MergeMethod):
    name = "karcher"
    summary = ("the Karcher mean of θᵢ/‖θᵢ‖ on the unit sphere (equal weights; at most `max_iter` steps, to `tol`), "
               "times mean ‖θᵢ‖")
    parameters = (MAX_ITER, TOL)
    without_base = "karcher averages the models themselves (mergekit ignores a base)"
    min_models = 1
    listing_order = 63
    differs = ("refuses --base (mergekit ignores it); dot products of whole tensors summed in float64, the steps "
               "taken on the N coefficients (mergekit: on float32 tensors)")

    def measure(self) -> None:
        """The models' dot products (N × N, float64, chunk by chunk); the mean stays a combination
        of the unit vectors, so every step of the iteration is made on its N coefficients."""
        import numpy as np

        n = self.models
        gram = np.zeros((n, n))
        # the products in float64 (exact for float32 inputs) in one array reused from chunk to chunk,
        # summed by numpy: np.dot of float64 goes through BLAS, whose threads (and fresh float64
        # copies) cost ten times the sums on a busy two-core machine
        products = np.empty(min(self.chunk_size, self.numel), np.float64)
        for j in range(self.chunks):
            start, count = self.span(j)
            vs = [read(start, count) for read in self.reads]
            for a in range(n):
                for b in range(a, n):
                    product = np.multiply(vs[a], vs[b], out=products[:count], dtype=np.float64)
                    gram[a, b] = gram[b, a] = gram[a, b] + float(product.sum())
        self.coefficients = self._solve(gram) if n > 1 else None

    def _solve(self, gram):
        import numpy as np

        n, tol = self.models, self.params["tol"]
        norms = np.sqrt(np.maximum(np.diag(gram), 0))
        alphas = np.full(n, 1.0 / n)
        valid = [i for i in range(n) if norms[i] > tol]
        if not valid:
            return np.zeros(n)
        units = gram[np.ix_(valid, valid)] / np.outer(norms[valid], norms[valid])  # the unit vectors' dots
        a = alphas[valid] / alphas[valid].sum()

        def norm(x):
            return math.sqrt(max(float(x @ units @ x), 0.0))

        mean = a.copy()
        mean_norm = norm(mean)
        mean = np.eye(len(valid))[0] if mean_norm < tol else mean / mean_norm
        for _ in range(self.params["max_iter"]):
            tangent = np.zeros(len(valid))
            for k in range(len(valid)):
                dot = min(1.0, max(-1.0, float(units[k] @ mean)))
                theta = math.acos(dot)
                if theta < tol:
                    continue
                step = -dot * mean
                step[k] += 1
                tangent += a[k] * (theta / math.sin(theta)) * step
            tangent_norm = norm(tangent)
            if tangent_norm < tol:
                break
            mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * (tangent / tangent_norm)
            unit_norm = norm(mean)
            if unit_norm > tol:
                mean = mean / unit_norm
        scale = float(alphas @ norms)
        coefficients = np.zeros(n)
        coefficients[valid] = scale * mean / norms[valid]  # of the models themselves
        return coefficients

    def merge_chunk(self, j: int, values: list, out):
        import numpy as np

        if self.coefficients is None:
            out = np.empty_like(values[0]) if out is None else out
            out[:] = values[0]
            return out
        result = np.multiply(values[0], self.coefficients[0], out=out)
        for v, c in zip(values[1:], self.coefficients[1:]):
            result += v * c
        return result
