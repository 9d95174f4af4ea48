"""The losses and modules of compatible model upgrades beyond BCT, in plain torch (method cards
7-9 of ``face_and_retrieval.md``; the Lightning glue is in ``lightning_modules/retrieval/``).

- :func:`ract_contrastive_loss` (RACT, TencentARC/OpenCompatible ``model/loss.py``,
  ``contra_ract``): the positive of a new feature is the same image's old feature; the negatives
  are the old **and** the new features of the other classes of the global batch.
- :func:`ract_triplet_loss` (``triplet_ract``): a margin ranking of the positive distance against
  the hardest new-to-old and new-to-new negative distances.
- :class:`GradientReversal` and :func:`reversal_coefficient` (AdvBCT, Ashespt/AdvBCT): the
  identity forward, −α × the gradient backward, α = 2/(1 + e^(−10p)) − 1 over training progress p.
- :class:`ModelDiscriminator` (AdvBCT ``models/modules.py``): Linear → BN → ReLU → Linear(2) →
  log-softmax; old features are class 1, new ones class 0.
- :func:`class_statistics` (AdvBCT ``extract_feat.py``): per class, the mean of the L2-normalised
  features (not re-normalised) and the largest radius after a 1.5·IQR outlier filter.
- :class:`ElasticBoundary` and :func:`boundary_loss` (AdvBCT ``bct_limit`` with
  ``ELASTIC_BOUNDARY``): radii moved from r_max toward the threshold T by a learned fraction, and
  the distance beyond them averaged over the violating samples only.
- :func:`refine_prototypes` (UniBCT, a reconstruction): one kNN-graph propagation step over the
  old prototypes.
- :class:`ResidualMLP`, and :class:`ResidualTransformation` on it (BiCT, DMU, a reconstruction):
  the forward transformation ψ of old features into the new space; BEBR's binarizer
  (``nn/binarization.py``) is built of the same blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.distributed.model_parallel_softmax import scale_gradient

MASKED = 1e9


def _other_class_mask(labels: Tensor, gathered_labels: Tensor) -> Tensor:
    """[B, G] 1 where the gathered entry has the anchor's class (the anchor's own entries too)."""
    return (labels[:, None] == gathered_labels[None, :]).float()


def ract_contrastive_loss(new: Tensor, old: Tensor, labels: Tensor, gathered_new: Tensor, gathered_old: Tensor,
                          gathered_labels: Tensor, temperature: float = 0.01, topk: int = 0) -> Tensor:
    """RACT's loss of the local anchors (module docstring), averaged over them.

    ``new`` [B, D] L2-normalised new features (with gradient), ``old`` [B, D] the same images'
    L2-normalised old features; ``gathered_*`` [G, ...] the global batch's, without gradient (as
    the authors' ``all_gather``). Entries of the anchor's class are masked out of both negative
    sets (so other same-class old features are neither positives nor negatives); ``topk`` > 0
    keeps the k largest of each set."""
    mask = _other_class_mask(labels, gathered_labels) * MASKED
    positive = (new * old.detach()).sum(dim=1, keepdim=True)
    new_to_old = new @ gathered_old.detach().T - mask
    new_to_new = new @ gathered_new.detach().T - mask
    if topk > 0:
        new_to_old = new_to_old.topk(min(topk, new_to_old.shape[1]), dim=1).values
        new_to_new = new_to_new.topk(min(topk, new_to_new.shape[1]), dim=1).values
    logits = torch.cat([positive, new_to_old, new_to_new], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(new), dtype=torch.long, device=new.device))


def ract_triplet_loss(new: Tensor, old: Tensor, labels: Tensor, gathered_new: Tensor, gathered_old: Tensor,
                      gathered_labels: Tensor, margin: float = 0.8, topk: int = 10) -> Tensor:
    """RACT's ``triplet_ract``: with d the Euclidean distance, max(0, d(n_i, o_i) − d_neg + margin)
    averaged over the ``topk`` smallest other-class distances d_neg to the gathered old features,
    plus the same over the gathered new features (arguments as :func:`ract_contrastive_loss`)."""
    mask = _other_class_mask(labels, gathered_labels) * MASKED
    positive = (new - old.detach()).norm(dim=1, keepdim=True)
    terms = []
    for gathered in (gathered_old, gathered_new):
        distances = torch.cdist(new, gathered.detach()) + mask
        hardest = distances.topk(min(topk, distances.shape[1]), dim=1, largest=False).values
        terms.append(F.relu(positive - hardest + margin).mean())
    return terms[0] + terms[1]


class GradientReversal(nn.Module):
    """The identity forward; the gradient times −``coefficient`` backward (Ganin & Lempitsky)."""

    def forward(self, x: Tensor, coefficient: float) -> Tensor:
        return scale_gradient(x, -coefficient)


def reversal_coefficient(progress: float) -> float:
    """AdvBCT's schedule of the reversal coefficient, 2/(1 + e^(−10p)) − 1, p ∈ [0, 1)."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


class ModelDiscriminator(nn.Module):
    """Which model an embedding comes from (module docstring); log-probabilities [B, 2]."""

    def __init__(self, embedding_size: int, hidden: int = 100) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(embedding_size, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                    nn.Linear(hidden, 2), nn.LogSoftmax(dim=1))

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings)


def class_statistics(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """(centres [C, D], largest radii [C], counts [C]) of the classes 0..C−1 (module docstring).

    The radii r = ‖f − μ_c‖ of a class with 4 samples or more are filtered to [Q1 − 1.5·IQR,
    Q3 + 1.5·IQR] with Q1, Q3 the sorted radii at ⌊n/4⌋ and ⌊3n/4⌋ (as the authors index them);
    ``counts`` are the radii kept (a class with one is not constrained). Classes without
    samples have zero centre, radius and count."""
    features = F.normalize(features.float(), dim=1)
    centres = torch.zeros(num_classes, features.shape[1])
    radii, counts = torch.zeros(num_classes), torch.zeros(num_classes, dtype=torch.long)
    for c in labels.unique().tolist():
        own = features[labels == c]
        centres[c] = own.mean(dim=0)
        radius = (own - centres[c]).norm(dim=1).sort().values
        if len(radius) >= 4:
            q1, q3 = radius[len(radius) // 4], radius[3 * len(radius) // 4]
            iqr = q3 - q1
            kept = radius[(radius >= q1 - 1.5 * iqr) & (radius <= q3 + 1.5 * iqr)]
            radius = kept if len(kept) else radius
        radii[c], counts[c] = radius.max(), len(radius)
    return centres, radii, counts


class ElasticBoundary(nn.Module):
    """One learnable scalar w_c per class, U(−1, 1) at initialisation; the radius of class c is
    r_c + δ_c if r_c < T else r_c − δ_c, δ_c = |r_c − T|·σ(w_c): moved toward T by a learned
    fraction (AdvBCT, T = ``threshold``)."""

    def __init__(self, num_classes: int, threshold: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes).uniform_(-1.0, 1.0))
        self.threshold = threshold

    def forward(self, radii: Tensor, classes: Tensor) -> Tensor:
        radius = radii[classes]
        shift = (radius - self.threshold).abs() * torch.sigmoid(self.weight[classes])
        return torch.where(radius < self.threshold, radius + shift, radius - shift)


def boundary_loss(new: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """Σ max(‖normalize(new_i) − μ_i‖ − r_i, 0) / #{i: violating}: the distance of each new
    feature beyond its class's radius, averaged over the violators (0 when none). ``centres``,
    ``radii``: each sample's class's."""
    excess = F.relu((F.normalize(new, dim=1) - centres).norm(dim=1) - radii)
    violators = (excess > 0).sum()
    return excess.sum() / violators.clamp_min(1)


def refine_prototypes(prototypes: Tensor, neighbours: int = 5, temperature: float = 0.1, chunk: int = 4096) -> Tensor:
    """UniBCT's structural prototype refinement as reconstructed (card 9, UNVERIFIED): each
    L2-normalised prototype becomes the normalised, softmax(cosine/``temperature``)-weighted mean
    of itself and its ``neighbours`` most similar prototypes (a kNN graph, one propagation step),
    computed ``chunk`` rows at a time."""
    prototypes = F.normalize(prototypes.float(), dim=1)
    k = min(neighbours + 1, len(prototypes))
    refined = []
    for rows in prototypes.split(chunk):
        similarity, index = (rows @ prototypes.T).topk(k, dim=1)
        weights = (similarity / temperature).softmax(dim=1)
        refined.append(F.normalize((weights[..., None] * prototypes[index]).sum(dim=1), dim=1))
    return torch.cat(refined)


class ResidualMLP(nn.Module):
    """``blocks`` residual blocks x ← x + Linear(BN(ReLU(Linear(x)))) of width ``hidden_size``,
    the last linear of each zero-initialised: the identity at initialisation."""

    def __init__(self, embedding_size: int, hidden_size: int = 1024, blocks: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(embedding_size, hidden_size), nn.BatchNorm1d(hidden_size), nn.ReLU(inplace=True),
                          nn.Linear(hidden_size, embedding_size)) for _ in range(blocks))
        for block in self.blocks:
            nn.init.zeros_(block[-1].weight)
            nn.init.zeros_(block[-1].bias)

    def forward(self, features: Tensor) -> Tensor:
        for block in self.blocks:
            features = features + block(features)
        return features


class ResidualTransformation(ResidualMLP):
    """BiCT's / DMU's forward transformation ψ of old features into the new space (a
    reconstruction, cards 10-11): a :class:`ResidualMLP` (the identity at initialisation), then
    L2 normalisation."""

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(super().forward(features), dim=1)
