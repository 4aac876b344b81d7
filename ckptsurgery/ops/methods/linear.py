"""linear: the weighted mean of the models (`--average` is this method), or with --no-normalize
their weighted sum."""

from __future__ import annotations

import math

from ...errors import UsageError
from ._base import MergeMethod
from ._parameters import NORMALIZE_ON, WEIGHTS


class Linear(MergeMethod):
    name = "linear"
    summary = ("Σ wᵢθᵢ / Σ wᵢ, the weights summing to more than zero (`--average` is this method); Σ wᵢθᵢ with "
               "`--no-normalize`")
    parameters = (WEIGHTS, NORMALIZE_ON)
    min_models = 2
    listing_order = 10
    differs = 'normalizing, the weights must sum to more than zero (mergekit divides by any sum)'

    @classmethod
    def check(cls, values: dict) -> None:
        total = sum(values["weights"])
        if values["normalize"] and total <= 0:  # dividing by a negative total would flip every weight's sign
            raise UsageError(f"--weights must not sum to zero or less (they sum to {total:g})")

    def merge_chunk(self, j: int, values: list, out):
        import numpy as np

        # the weights divided by their sum first, in float64: 1e-50 each is 1/n
        weights = self.params["weights"]
        total = math.fsum(weights) if self.params.get("normalize", True) else 1.0
        shares = [w / total for w in weights]
        result = np.multiply(values[0], shares[0], out=out)
        for x, share in zip(values[1:], shares[1:]):
            result += np.multiply(x, share, out=self.scratch(0, len(x)))
        return result
