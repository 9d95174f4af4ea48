"""Semi-supervised anomaly scorers on feature vectors, as ADBench runs them for AnoOnly (Zhou et
al., arXiv 2305.18798; cool-xuan/AnoOnly ``baselines/``): DeepSAD, DevNet, PReNet and
FEAWAD, each with its original loss and AnoOnly's, which keeps the loss on the labelled
anomalies only.

Every scorer takes a batch of features ``x`` [B, D] and ``labels`` [B] (1: a labelled anomaly,
0: unlabelled, mostly normal) and scores the **whole** batch in one forward, so that its
BatchNorm sees normal and anomalous samples together (AnoOnly's weak supervision of the
normal data); only the loss leaves the unlabelled rows out. Each ``loss`` returns a scalar that
is 0, with no gradient to any parameter, for a batch without a labelled anomaly under AnoOnly.
Higher ``score`` means more anomalous.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _mean_over_anomalies(values: Tensor, labels: Tensor) -> Tensor:
    """The mean of ``values`` over the labelled anomalies; 0 attached to the graph, with no
    gradient, for a batch without one (the mean of nothing would be NaN)."""
    anomalous = values[labels == 1]
    return anomalous.mean() if anomalous.numel() else values.sum() * 0.0


class DeepSAD(nn.Module):
    """Deep SAD (Ruff et al., ICLR 2020) as ADBench's ``networks/mlp.py``: hidden layers of
    Linear (no bias) → BatchNorm1d (no affine, eps 1e-4) → LeakyReLU, widths 100 and 20, then a
    linear code of 10 (no bias). The score is ‖φ(x) − c‖², c the mean code of the training data
    at the start (:meth:`set_center`). Loss: unlabelled ‖φ − c‖², labelled anomalies
    η/(‖φ − c‖² + 1e-6), averaged over the batch; AnoOnly: the anomalies' term averaged over them."""

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (100, 20), code: int = 10, eta: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_features, width, bias=False), nn.BatchNorm1d(width, eps=1e-4, affine=False),
                       nn.LeakyReLU()]
            in_features = width
        self.encoder = nn.Sequential(*layers, nn.Linear(in_features, code, bias=False))
        self.eta = eta
        self.eps = 1e-6
        self.register_buffer("center", torch.zeros(code))

    @torch.no_grad()
    def set_center(self, x: Tensor, minimum: float = 0.1) -> None:
        """c = the mean code of ``x`` in eval mode; coordinates closer to 0 than ``minimum`` are
        moved to ±``minimum`` (the authors' ``init_center_c``)."""
        was_training = self.training
        center = self.eval().encoder(x).mean(dim=0)
        self.train(was_training)
        center[(center.abs() < minimum) & (center < 0)] = -minimum
        center[(center.abs() < minimum) & (center >= 0)] = minimum
        self.center.copy_(center)

    def score(self, x: Tensor) -> Tensor:
        return (self.encoder(x) - self.center).pow(2).sum(dim=1)

    def loss(self, x: Tensor, labels: Tensor, anomaly_only: bool) -> Tensor:
        distance = self.score(x)
        inverse = self.eta / (distance + self.eps)
        if anomaly_only:
            return _mean_over_anomalies(inverse, labels)
        return torch.where(labels == 1, inverse, distance).mean()


class DevNet(nn.Module):
    """DevNet (Pang et al., KDD 2019) as ADBench's Keras ``dev_network_s``: Dense(20, ReLU, L2
    0.01 on its kernel) → BatchNorm (added by AnoOnly; Keras' momentum 0.99, eps 1e-3) → Dense(1).
    The score is the output s. Loss (the code's; its z-score against a N(0, 1) reference is
    overwritten by ``dev = y_pred``): (1 − y)·|s| + y·|m − s|, m = 5, averaged over the batch;
    AnoOnly: y·(m − s), linear and without a hinge, exactly as coded, averaged over the batch
    (Keras' mean, normal rows counting 0). Both add 0.01·‖W₁‖²."""

    def __init__(self, in_features: int, hidden: int = 20, margin: float = 5.0, l2: float = 0.01,
                 batch_norm: bool = True) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden)
        self.norm = nn.BatchNorm1d(hidden, eps=1e-3, momentum=0.01) if batch_norm else nn.Identity()
        self.output = nn.Linear(hidden, 1)
        self.margin = margin
        self.l2 = l2

    def score(self, x: Tensor) -> Tensor:
        return self.output(self.norm(torch.relu(self.hidden(x)))).squeeze(1)

    def loss(self, x: Tensor, labels: Tensor, anomaly_only: bool) -> Tensor:
        s = self.score(x)
        y = labels.to(s.dtype)
        if anomaly_only:  # the y factor gives normal rows neither loss nor gradient
            loss = (y * (self.margin - s)).mean()
        else:
            loss = ((1 - y) * s.abs() + y * (self.margin - s).abs()).mean()
        return loss + self.l2 * self.hidden.weight.pow(2).sum()


class PReNet(nn.Module):
    """PReNet (Pang et al., KDD 2023) as ADBench's ``baselines/PReNet``: a shared Linear(d → 20) →
    ReLU → BatchNorm1d (added by AnoOnly) per sample of a pair, and Linear(40 → 1) on the pair's
    concatenated features. Pairs (:meth:`pairs`) of two labelled anomalies target 8, of an anomaly
    and an unlabelled sample 4, of two unlabelled samples 0; loss: the mean |target − s| over the
    pairs, AnoOnly over the aa and au pairs only (uu pairs still pass through the BatchNorm).
    The score of x (:meth:`score`): the mean over ``draws`` training anomalies a and unlabelled u
    of s(a, x) + s(x, u)."""

    def __init__(self, in_features: int, hidden: int = 20, targets: tuple[float, float, float] = (8.0, 4.0, 0.0),
                 batch_norm: bool = True) -> None:
        super().__init__()
        self.feature = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(),
                                     nn.BatchNorm1d(hidden) if batch_norm else nn.Identity())
        self.head = nn.Linear(2 * hidden, 1)
        self.targets = targets

    def pair_score(self, left: Tensor, right: Tensor) -> Tensor:
        """s(left_i, right_i) [P]; each side through the feature layer as its own batch, as the
        authors' ``forward`` (so in training each side has its own BatchNorm statistics)."""
        return self.head(torch.cat([self.feature(left), self.feature(right)], dim=1)).squeeze(1)

    def pairs(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(left, right, target) of the authors' stratified pairs from a batch of 3q labelled
        anomalies and 5q unlabelled samples: q aa pairs, q au pairs and 2q uu pairs."""
        anomalies, unlabelled = x[labels == 1], x[labels == 0]
        q = len(anomalies) // 3
        if q == 0 or len(unlabelled) < 5 * q:
            raise ValueError(f"PReNet pairs need 3q labelled anomalies and 5q unlabelled samples a batch, got "
                             f"{len(anomalies)} and {len(unlabelled)} (data.anomalies_per_batch / unlabelled_per_batch)")
        left = torch.cat([anomalies[:q], anomalies[2 * q : 3 * q], unlabelled[:2 * q]])
        right = torch.cat([anomalies[q : 2 * q], unlabelled[2 * q : 3 * q], unlabelled[3 * q : 5 * q]])
        aa, au, uu = self.targets
        target = torch.cat([x.new_full((q,), aa), x.new_full((q,), au), x.new_full((2 * q,), uu)])
        return left, right, target

    def loss(self, x: Tensor, labels: Tensor, anomaly_only: bool) -> Tensor:
        if anomaly_only and not bool((labels == 1).any()):
            return self.feature(x).sum() * 0.0  # no aa or au pair: nothing to learn from
        left, right, target = self.pairs(x, labels)
        error = (target - self.pair_score(left, right)).abs()
        if anomaly_only:
            error = error[target != self.targets[2]]
        return error.mean()

    def score(self, x: Tensor, anomalies: Tensor, unlabelled: Tensor, draws: int = 30,
              generator: torch.Generator | None = None) -> Tensor:
        scores = []
        for sample in x:
            a = anomalies[torch.randint(len(anomalies), (draws,), generator=generator).to(x.device)]
            u = unlabelled[torch.randint(len(unlabelled), (draws,), generator=generator).to(x.device)]
            repeated = sample.expand(draws, -1)
            scores.append((self.pair_score(a, repeated) + self.pair_score(repeated, u)).mean())
        return torch.stack(scores)


class FEAWAD(nn.Module):
    """FEAWAD (Zhou et al., IEEE TNNLS 2021) as ADBench's Keras ``dev_network_d``: an autoencoder
    x → Dense(d) → Dense(128) → Dense(64) = h → Dense(128) → Dense(d) = x̂ (all ReLU), first trained
    alone on unlabelled samples (:meth:`reconstruction_loss`, MSE); then end to end, the residual
    r = x − x̂, its norm ‖r‖ and r̂ = r/‖r‖ feed Dense(256) on [r̂, h, ‖r‖], Dense(32) on [·, ‖r‖],
    BatchNorm (Keras' momentum 0.99, eps 1e-3) on [·, ‖r‖] and Dense(1) = s, the score. Loss, as
    coded (its residual term reads the norm of the *normalised* residual, 1, so it only adds a
    constant): (1 − y)(|s| + ‖r̂‖) + y(max(0, m − s) + max(0, m − ‖r̂‖)), m = 5, averaged over the
    batch; AnoOnly keeps the y terms. Weights Glorot-normal, biases 0 (the code's initialiser)."""

    def __init__(self, in_features: int, margin: float = 5.0) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_features, in_features), nn.ReLU(), nn.Linear(in_features, 128), nn.ReLU(),
                                     nn.Linear(128, 64), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, in_features), nn.ReLU())
        self.hidden1 = nn.Linear(in_features + 64 + 1, 256)
        self.hidden2 = nn.Linear(256 + 1, 32)
        self.norm = nn.BatchNorm1d(32 + 1, eps=1e-3, momentum=0.01)
        self.output = nn.Linear(32 + 1, 1)
        self.margin = margin
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                nn.init.xavier_normal_(layer.weight)
                nn.init.zeros_(layer.bias)

    def reconstruction_loss(self, x: Tensor) -> Tensor:
        """The autoencoder's pretraining loss on (unlabelled) samples ``x``."""
        return (self.decoder(self.encoder(x)) - x).pow(2).mean()

    def _score_and_residual(self, x: Tensor) -> tuple[Tensor, Tensor]:
        code = self.encoder(x)
        residual = x - self.decoder(code)
        norm = residual.norm(dim=1, keepdim=True)
        unit = residual / norm
        h = torch.relu(self.hidden1(torch.cat([unit, code, norm], dim=1)))
        h = torch.relu(self.hidden2(torch.cat([h, norm], dim=1)))
        return self.output(self.norm(torch.cat([h, norm], dim=1))).squeeze(1), unit

    def score(self, x: Tensor) -> Tensor:
        return self._score_and_residual(x)[0]

    def loss(self, x: Tensor, labels: Tensor, anomaly_only: bool) -> Tensor:
        s, unit = self._score_and_residual(x)
        unit_norm = unit.norm(dim=1)
        y = labels.to(s.dtype)
        anomalous = y * (torch.clamp(self.margin - s, min=0) + torch.clamp(self.margin - unit_norm, min=0))
        if anomaly_only:  # the y factor gives normal rows neither loss nor gradient
            return anomalous.mean()
        return ((1 - y) * (s.abs() + unit_norm) + anomalous).mean()
