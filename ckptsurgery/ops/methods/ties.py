"""ties (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): each delta cut to its largest
entries, signs elected, the agreeing ones averaged by their weights."""

from ._parameters import DENSITY, SCALE, WEIGHTS
from ._task_arithmetic import (
    NORMALIZE_ON,
    RESCALE_OFF,
    TOGGLES,
    Consensus,
    Sparsification,
    TaskArithmetic,
)


class Ties(TaskArithmetic):
    name = "ties"
    summary = ("δᵢ cut to its top D by magnitude; the sign of Σ wᵢδᵢ elected; the agreeing wᵢδᵢ summed and "
               "divided by their weights; times λ, plus base")
    parameters = (WEIGHTS, DENSITY, SCALE, NORMALIZE_ON, RESCALE_OFF, *TOGGLES)
    listing_order = 30
    differs = "equal magnitudes at the cut: the earlier entries (row-major) are kept; mergekit's argsort leaves it to the sort"
    sparsification = Sparsification.MAGNITUDE
    consensus = Consensus.SUM
