"""ramplus-tl (RAM+, tensor-local, https://arxiv.org/abs/2601.13572): RAM, each model's unique
entries scaled up by how much of what it changed it shares with the others."""

from __future__ import annotations

from ._parameters import Parameter, Range
from .ram import Ram

R = Parameter("r", "ramplus-tl: how much a model's shared-to-unique ratio scales up its unique entries.", "R",
              default=0.1, per_tensor=True)
ALPHA = Parameter("alpha", "ramplus-tl: the cap on that ratio.", "A", default=0.2,
                  range=Range(lambda v: True, "a finite number"), per_tensor=True)


class RamplusTl(Ram):
    name = "ramplus-tl"
    summary = ("ram, model i's unique entries times λᵢ = 1 + r·clip(sharedᵢ / max(uniqueᵢ, ε), 0, α), counted over "
               "the tensor")
    parameters = (R, ALPHA, *Ram.parameters)
    listing_order = 91
    differs = "writes the dtype asked for (mergekit's float λ promotes a bfloat16 merge to float32)"

    def measure(self) -> None:
        """Per model, how many of the entries it changes it shares with another model, and how many
        it changes alone: counted chunk by chunk."""
        import numpy as np

        shared, unique = [0] * self.models, [0] * self.models
        for j in range(self.chunks):
            start, count = self.span(j)
            _, counts, contributors = self._counted([read(start, count) for read in self.reads])
            several = np.greater(contributors, 1, out=self.buffer("shared", count, bool))
            one = np.equal(contributors, 1, out=self.buffer("unique", count, bool))
            both = self.buffer("both", count, bool)
            for i in range(self.models):
                shared[i] += int(np.count_nonzero(np.logical_and(counts[i], several, out=both)))
                unique[i] += int(np.count_nonzero(np.logical_and(counts[i], one, out=both)))
        r, alpha, eps = self.params["r"], self.params["alpha"], self.params["epsilon"]
        self.lambdas = [1 + r * min(max(s / max(u, eps), 0.0), alpha) for s, u in zip(shared, unique)]

    def _lambdas(self) -> list[float]:
        return self.lambdas
