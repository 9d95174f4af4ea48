"""The search policy of Loss Function Search (Wang et al., "Loss Function Search for Face
Recognition", ICML 2020, arXiv 2007.06542), as in the authors' ``loss_agent.py``.

The policy is a set of Gaussians N(μ_i, σ), σ = 0.2, μ initialised to 0; the first mean passes
through a ReLU. UNVERIFIED: the ReLU's gradient here is straight-through (identity). With
torch's ReLU the gradient is zero for μ_0 ≤ 0, and since a = −|x| is symmetric in the sign of
x, the first REINFORCE steps push μ_0 below 0 about half the time, after which the policy
could never move again. Forward values are the authors'. A sample x gives the Search-Softmax parameter a = −|x| (a ≤ 0 keeps the
modulated probability below p). With ``search_type='global'`` (the code's default) there is
one Gaussian; the ``local`` variant has one per probability bin (10).

REINFORCE: each search worker trains with its own sample, its validation accuracy is the
reward, rewards are normalised over the workers as r_i = 2·(acc_i − mean)/(max − min + 1e-6),
and the policy minimises −Σ_i log π(x_i)·r_i (Adam, lr 0.05, betas (0.5, 0.999)).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Normal


class GaussianLossPolicy(nn.Module):
    """``num_parameters`` Gaussians N(μ_i, σ) over the search parameters (see the module docstring)."""

    def __init__(self, num_parameters: int = 1, sigma: float = 0.2) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(num_parameters))
        self.sigma = sigma

    def distribution(self) -> Normal:
        first = self.mu[:1]
        first = first + (first.clamp(min=0.0) - first).detach()  # ReLU, straight-through gradient
        return Normal(torch.cat([first, self.mu[1:]]), self.sigma)

    @torch.no_grad()
    def sample(self, generator: torch.Generator) -> Tensor:
        """One draw x (one value per Gaussian)."""
        means = self.distribution().mean
        return means + self.sigma * torch.randn(means.shape, generator=generator)

    @staticmethod
    def search_parameters(x: Tensor) -> Tensor:
        """a = −|x| ≤ 0."""
        return -x.abs()

    def log_prob(self, x: Tensor) -> Tensor:
        """log π(x), summed over the Gaussians; differentiable in μ."""
        return self.distribution().log_prob(x).sum()


def normalised_rewards(accuracies: Tensor) -> Tensor:
    """The authors' reward normalisation over the search workers: 2·(acc − mean)/(max − min + 1e-6)."""
    spread = accuracies.max() - accuracies.min()
    return 2.0 * (accuracies - accuracies.mean()) / (spread + 1e-6)
