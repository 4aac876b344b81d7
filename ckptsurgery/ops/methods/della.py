"""della (Deep et al. 2024, https://arxiv.org/abs/2406.11617): each delta's entries kept at random
with chances by magnitude rank within their row (D − ε to D + ε), rescaled to its L1 norm; TIES'
sign election; the agreeing deltas divided by their weights."""

from ._parameters import DENSITY, SCALE, SEED, WEIGHTS
from ._task_arithmetic import (
    EPSILON,
    NORMALIZE_ON,
    RESCALE_ON,
    TOGGLES,
    Consensus,
    Sparsification,
    TaskArithmetic,
)


class Della(TaskArithmetic):
    name = "della"
    summary = ("δᵢ's entries kept with chance D − ε … D + ε by magnitude rank in their row, rescaled to its L1 norm; "
               "the sign of Σ wᵢδᵢ elected; the agreeing wᵢδᵢ summed and divided by their weights; times λ, plus base")
    parameters = (WEIGHTS, DENSITY, EPSILON, SCALE, SEED, NORMALIZE_ON, RESCALE_ON, *TOGGLES)
    listing_order = 72
    differs = 'masks drawn as dare-ties draws them; equal magnitudes ranked in row-major order; a row of one entry is kept with chance D (mergekit: a NaN chance, an error)'
    sparsification = Sparsification.DELLA_MAGPRUNE
    consensus = Consensus.SUM
