"""ram (Reinforced Agent Merging, https://arxiv.org/abs/2601.13572): each entry of the merged delta
is the one model's that changed it, or the mean of those that did."""

from __future__ import annotations

from ...errors import UsageError
from ._base import MergeMethod
from ._parameters import Range
from ._task_arithmetic import EPSILON

RAM_EPSILON = EPSILON.variant(default=1e-5, range=Range(lambda v: v >= 0, "0 or more"))


class Ram(MergeMethod):
    name = "ram"
    summary = ("base + Σ δᵢ over the models whose |δᵢ| > ε there, divided by their count when more than one "
               "(unique entries whole, shared ones averaged)")
    parameters = (RAM_EPSILON,)
    needs_base = True
    listing_order = 90

    @classmethod
    def check(cls, values: dict) -> None:
        if isinstance(values["epsilon"], list):
            raise UsageError(f"--method {cls.name} takes one --epsilon, not one per model")

    def _counted(self, values: list):
        """δᵢ where it counts (0 elsewhere), whether it counts, and how many count per entry."""
        import numpy as np

        base = values[0]
        deltas = np.stack([np.subtract(theta, base) for theta in values[1:]])
        counts = np.abs(deltas) > self.params["epsilon"]
        deltas *= counts
        return deltas, counts, counts.sum(axis=0)

    def _lambdas(self) -> list[float]:
        return [1.0] * self.models

    def merge_chunk(self, j: int, values: list, out):
        import numpy as np

        deltas, _, contributors = self._counted(values)
        unique = contributors == 1
        shared = (contributors > 1) / np.maximum(contributors, 1).astype(self.wide)
        merged = np.zeros(len(values[0]), self.wide)
        for d, lam in zip(deltas, self._lambdas()):
            merged += d * (unique * lam) + d * shared
        return np.add(values[0], merged, out=out)
