"""model-stock (Jang et al. 2024, https://arxiv.org/abs/2403.19522): the models' mean pulled toward
the base by how much their changes agree — t = N·cos / (1 + (N − 1)·cos), cos the mean cosine
between the models' deltas."""

from __future__ import annotations

import itertools

from ._base import DeltaMethod
from ._parameters import Parameter
from ._vectors import Vectors

FILTER_WISE = Parameter("filter_wise", "model-stock: one t per row (along the last dimension) instead of one per "
                        "tensor.", "", type=bool, default=False)
NORM_FLOOR = 1e-6  # a product of norms below this divides as this
SINGULAR = 1e-6  # 1 + (N − 1)·cos below this (in magnitude): t = 0, the base kept


class ModelStock(DeltaMethod):
    name = "model-stock"
    summary = ("t·mean θᵢ + (1 − t)·base, t = N·c / (1 + (N − 1)·c), c the mean over pairs of the cosine between "
               "δᵢ and δⱼ (per tensor, or per row with --filter-wise); t = 0 where 1 + (N − 1)·c ≈ 0")
    parameters = (FILTER_WISE,)
    min_models = 2
    listing_order = 80

    def measure(self) -> None:
        """Each model's squared norm and each pair's dot product, per vector (the tensor, or its
        rows), summed chunk by chunk in float64: a few numbers per row."""
        import numpy as np

        self.vectors = Vectors(self.shape, self.numel, "rows" if self.params["filter_wise"] else "whole")
        n, count = self.models, self.vectors.count
        squares = np.zeros((n, count))
        pairs = list(itertools.combinations(range(n), 2))
        dots = np.zeros((len(pairs), count))
        for j in range(self.chunks):
            start, size = self.span(j)
            deltas = self.deltas([read(start, size) for read in self.reads])
            for i, d in enumerate(deltas):
                squares[i] += self.vectors.sums(start, d * d)
            for k, (a, b) in enumerate(pairs):
                dots[k] += self.vectors.sums(start, deltas[a] * deltas[b])
        norms = np.sqrt(squares)
        cos = np.mean([np.clip(dots[k] / np.maximum(norms[a] * norms[b], NORM_FLOOR), -1, 1)
                       for k, (a, b) in enumerate(pairs)], axis=0)
        denominator = 1 + (n - 1) * cos
        singular = np.abs(denominator) < SINGULAR
        self.t = np.where(singular, 0.0, n * cos / np.where(singular, 1.0, denominator)).astype(self.wide)

    def merge_chunk(self, j: int, values: list, out):
        import numpy as np

        start, count = self.span(j)
        t = self.vectors.spread(start, count, self.t)
        mean = values[1] + sum(values[2:]) if len(values) > 2 else values[1].copy()
        mean /= self.models
        result = np.multiply(t, mean, out=out)
        result += (1 - t) * values[0]
        return result
