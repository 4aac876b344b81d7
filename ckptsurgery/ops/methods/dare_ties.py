"""dare-ties (Yu et al. 2023, https://arxiv.org/abs/2311.03099): DARE's random drop, then TIES'
sign election — the agreeing deltas summed, not divided (mergekit's `normalize: false`)."""

from ._parameters import DENSITY, SCALE, SEED, WEIGHTS
from ._task_arithmetic import (
    NORMALIZE_OFF,
    RESCALE_ON,
    TOGGLES,
    Consensus,
    Sparsification,
    TaskArithmetic,
)


class DareTies(TaskArithmetic):
    name = "dare-ties"
    summary = ("δᵢ's entries kept with chance D, rescaled to its L1 norm; the sign of Σ wᵢδᵢ elected; the agreeing "
               "wᵢδᵢ summed; times λ, plus base")
    parameters = (WEIGHTS, DENSITY, SCALE, SEED, NORMALIZE_OFF, RESCALE_ON, *TOGGLES)
    listing_order = 50
    differs = "masks drawn from PCG64 per seed, model, key and block of 2¹⁸ elements, not from torch's global generator: other masks, the same distribution"
    sparsification = Sparsification.RANDOM
    consensus = Consensus.SUM
