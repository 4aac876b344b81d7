"""dare-linear (Yu et al. 2023, https://arxiv.org/abs/2311.03099): each delta's entries dropped at
random, the rest rescaled to its L1 norm, then summed as task arithmetic sums."""

from ._parameters import DENSITY, SCALE, SEED, WEIGHTS
from ._task_arithmetic import (
    NORMALIZE_OFF,
    RESCALE_ON,
    TOGGLES,
    Sparsification,
    TaskArithmetic,
)


class DareLinear(TaskArithmetic):
    name = "dare-linear"
    summary = "δᵢ's entries kept with chance D, rescaled to its L1 norm; base + λ·Σ wᵢδᵢ"
    parameters = (WEIGHTS, DENSITY, SCALE, SEED, NORMALIZE_OFF, RESCALE_ON, *TOGGLES)
    listing_order = 40
    differs = 'masks drawn as dare-ties draws them'
    sparsification = Sparsification.RANDOM
