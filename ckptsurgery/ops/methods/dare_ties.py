"""dare-ties (Yu et al. 2023, https://arxiv.org/abs/2311.03099): DARE's random drop, then TIES'
sign election — the agreeing deltas summed, not divided (mergekit's `normalize: false`)."""

from ._task_arithmetic import Consensus
from .dare_linear import DareLinear


class DareTies(DareLinear):
    name = "dare-ties"
    summary = ("δᵢ's entries kept with chance D, rescaled to its L1 norm; the sign of Σ wᵢδᵢ elected; the agreeing "
               "wᵢδᵢ summed; times λ, plus base")
    listing_order = 50
    differs = "masks drawn from PCG64 per seed, model, key and block of 2¹⁸ elements, not from torch's global generator: other masks, the same distribution"
    consensus = Consensus.SUM
