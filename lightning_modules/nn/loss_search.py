"""The search policy of Loss Function Search (Wang et al., "Loss Function Search for Face
Recognition", ICML 2020, arXiv 2007.06542), as in the authors' ``lfs_core/utils/loss_agent.py``.

The policy is a set of Gaussians N(μ_i, σ), σ = 0.2, μ initialised to 0; the first mean passes
through a ReLU. A draw x gives the Search-Softmax parameter a = −|x| (a ≤ 0 keeps the modulated
probability below p), and log π is evaluated at that a, as the authors' code does (not at x).
With ``search_type='global'`` (the code's default) only the first Gaussian matters.

The ReLU's gradient (``first_mean_gradient``):

- ``"relu"`` (default, the authors' code): torch's ReLU, whose gradient at μ₀ = 0 is 0. μ₀
  starts at exactly 0, so it never moves: the authors' search draws a = −|x|, x ~ N(0, σ), in
  every epoch, and only the best-worker selection acts.
- ``"straight_through"`` (a deviation, not the authors'): the gradient passes the ReLU as if it
  were the identity, so μ₀ moves with the rewards (below 0 the forward value stays 0).

REINFORCE: each search worker trains with its own draw, its validation accuracy is the reward,
rewards are normalised over the workers as r_i = 2·(acc_i − mean)/(max − min + 1e-6), and each
worker's gradient of −log π(a_i)·r_i is averaged over the workers (the authors' all-reduce
divides by the world size) before one Adam step (lr 0.05, betas (0.5, 0.999)).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.distributions import Normal


class GaussianLossPolicy(nn.Module):
    """``num_parameters`` Gaussians N(μ_i, σ) over the search parameters (see the module docstring)."""

    def __init__(self, num_parameters: int = 1, sigma: float = 0.2,
                 first_mean_gradient: Literal["relu", "straight_through"] = "relu") -> None:
        super().__init__()
        if first_mean_gradient not in ("relu", "straight_through"):
            raise ValueError(f"first_mean_gradient must be 'relu' (the authors') or 'straight_through', "
                             f"got {first_mean_gradient!r}")
        self.mu = nn.Parameter(torch.zeros(num_parameters))
        self.sigma = sigma
        self.first_mean_gradient = first_mean_gradient

    def distribution(self) -> Normal:
        first = self.mu[:1]
        if self.first_mean_gradient == "relu":
            first = torch.relu(first)
        else:
            first = first + (first.clamp(min=0.0) - first).detach()
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

    def log_prob(self, a: Tensor) -> Tensor:
        """log π evaluated at the search parameters a = −|x| (the authors' choice), summed over
        the Gaussians; differentiable in μ."""
        return self.distribution().log_prob(a).sum()


def normalised_rewards(accuracies: Tensor) -> Tensor:
    """The authors' reward normalisation over the search workers: 2·(acc − mean)/(max − min + 1e-6)."""
    spread = accuracies.max() - accuracies.min()
    return 2.0 * (accuracies - accuracies.mean()) / (spread + 1e-6)
