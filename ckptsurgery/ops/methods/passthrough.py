"""passthrough: the one model's tensor as it is, or times λ (mergekit's `scale`) — what a recipe's
layer slices copy."""

from __future__ import annotations

from ._base import MergeMethod
from ._parameters import SCALE


class Passthrough(MergeMethod):
    name = "passthrough"
    summary = "λ·θ, of exactly one model (λ = 1: θ as it is)"
    parameters = (SCALE,)
    without_base = "passthrough copies its one model"
    min_models = max_models = 1
    listing_order = 100

    def merge_chunk(self, j: int, values: list, out):
        import numpy as np

        scale = self.params["scale"]
        if scale == 1:
            out = np.empty_like(values[0]) if out is None else out
            out[:] = values[0]
            return out
        return np.multiply(values[0], scale, out=out)
