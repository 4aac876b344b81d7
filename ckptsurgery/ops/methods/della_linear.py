"""della-linear: DELLA's drop by magnitude rank, then summed as task arithmetic sums."""

from ._parameters import DENSITY, SCALE, SEED, WEIGHTS
from ._task_arithmetic import (
    EPSILON,
    NORMALIZE_OFF,
    RESCALE_ON,
    TOGGLES,
    Sparsification,
    TaskArithmetic,
)


class DellaLinear(TaskArithmetic):
    name = "della-linear"
    summary = "δᵢ's entries kept with chance D − ε … D + ε by magnitude rank in their row, rescaled to its L1 norm; base + λ·Σ wᵢδᵢ"
    parameters = (WEIGHTS, DENSITY, EPSILON, SCALE, SEED, NORMALIZE_OFF, RESCALE_ON, *TOGGLES)
    listing_order = 73
    differs = 'as della'
    sparsification = Sparsification.DELLA_MAGPRUNE
