"""nearswap (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001): the model's value
where it is near the base's, the base's where they are far apart, and in between by their distance."""

from __future__ import annotations

from ._base import MergeMethod
from ._parameters import FINITE, T

NEAR = T.variant(range=FINITE)  # a distance: any number (below 0, the base's values)
DISTANCE_EPS = 1e-6  # distances below this count as this


class Nearswap(MergeMethod):
    name = "nearswap"
    summary = "w·θ + (1 − w)·base, w = clip(t / max(|θ − base|, 1e-6), 0, 1), of exactly one model"
    parameters = (NEAR,)
    needs_base = True
    min_models = max_models = 1
    listing_order = 64

    def merge_chunk(self, j: int, values: list, out):
        import numpy as np

        base, theta = values
        weight = np.clip(self.params["t"] / np.maximum(np.abs(theta - base), DISTANCE_EPS), 0, 1)
        result = np.multiply(weight, theta, out=out)
        result += (1 - weight) * base
        return result
