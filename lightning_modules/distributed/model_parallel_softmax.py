"""Model-parallel softmax over class centres sharded by class, with Partial-FC sampling and
KNN-softmax selection, and helpers that move the sharded state between world sizes.

Each rank owns a contiguous slice of the class centres (:func:`class_shard`). The batch's
embeddings and labels are all-gathered; each rank computes the logits of the whole batch
with its own classes only, and the softmax normaliser comes from an all-reduce of the row
max and of the row sum of exponentials. Memory per rank is O(global batch × classes / ranks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.distributed.comm import (
    all_gather,
    all_gather_with_grad,
    all_reduce_max,
    all_reduce_sum,
    world_info,
)
from lightning_modules.nn.margins import MarginHead

# Rows of the initial class centres are drawn in blocks of this many, each from its own
# generator, so that no rank draws (or holds) the full matrix.
_INIT_BLOCK_ROWS = 4096


def class_shard(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the classes of ``rank``: contiguous near-equal slices, the first
    ``num_classes % world_size`` ranks holding one class more."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _initial_centres(num_classes: int, start: int, end: int, dim: int, seed: int) -> Tensor:
    """Rows [start, end) of the normal(0, 0.01) initial centres (arcface_torch's init).

    Block b of ``_INIT_BLOCK_ROWS`` rows comes from a generator seeded by the b-th draw of a
    generator seeded with ``seed``: a row's value depends on neither the world size nor the rank.
    """
    if start == end:
        return torch.empty(0, dim)
    num_blocks = math.ceil(num_classes / _INIT_BLOCK_ROWS)
    block_seeds = torch.randint(2**62, (num_blocks,), generator=torch.Generator().manual_seed(seed))
    first, last = start // _INIT_BLOCK_ROWS, math.ceil(end / _INIT_BLOCK_ROWS)
    blocks = []
    for block in range(first, last):
        rows = min(_INIT_BLOCK_ROWS, num_classes - block * _INIT_BLOCK_ROWS)
        generator = torch.Generator().manual_seed(int(block_seeds[block]))
        blocks.append(torch.empty(rows, dim).normal_(0.0, 0.01, generator=generator))
    offset = first * _INIT_BLOCK_ROWS
    return torch.cat(blocks)[start - offset : end - offset].clone()


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def _reduce_statistic(x: Tensor) -> Tensor:
    """A head's per-sample statistic summed over shards (heads use it without gradient)."""
    return all_reduce_sum(x.detach())


def _sharded_log_sum_exp(logits: Tensor) -> Tensor:
    """log Σ_j exp(z_j) over the classes of all shards, per row [N].

    Shifted by the global row max, which is a constant for the gradient: the result does
    not depend on it.
    """
    if logits.shape[1]:
        local_max = logits.detach().amax(1)
    else:
        local_max = logits.new_full(logits.shape[:1], -math.inf)
    shift = all_reduce_max(local_max)
    return shift + all_reduce_sum((logits - shift[:, None]).exp().sum(1)).log()


class ModelParallelSoftmax(nn.Module):
    """Softmax loss with a margin head over class centres sharded across ranks.

    ``forward`` returns the mean loss over the global batch, the same on every rank, equal
    to the single-process full softmax with the same head. Gradients:

    - class centres: each rank gets the exact gradient of that loss for its own rows;
    - embeddings: the all-gather sends back to each rank the gradient of the loss w.r.t. its
      own embeddings, multiplied by the world size, because DDP averages the (replicated)
      backbone's gradients over ranks: the average is then the gradient of the global loss.

    The centres are model-parallel (:meth:`model_parallel_parameter_names`): exclude them
    from DDP's gradient all-reduce. Build the module once torch.distributed is initialised
    (in a LightningModule: ``configure_model``), since the shard is chosen at construction.

    Training-time class selection (eval always uses all classes):

    - ``sample_rate < 1``: Partial FC (An et al., arXiv 2010.05222; arcface_torch): each
      shard keeps the classes of the global batch it owns plus uniformly drawn others,
      ceil(sample_rate·C_local) classes in all (more if the batch has more positives).
    - ``knn_neighbours = K > 0``: KNN softmax (arXiv 2102.06025): the batch's classes and,
      for each, its K nearest other class centres by cosine over all shards (exact top-K,
      recomputed every step). UNVERIFIED reconstruction: the paper has no public code and
      its body was not available; K and the exact-search choice are ours (configurable).

    Only the active rows receive gradient (note: a dense momentum still moves the others).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        head: MarginHead,
        sample_rate: float = 1.0,
        knn_neighbours: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if knn_neighbours < 0:
            raise ValueError(f"knn_neighbours must be >= 0, got {knn_neighbours}")
        if knn_neighbours and sample_rate < 1.0:
            raise ValueError("choose one class selection: sample_rate < 1 or knn_neighbours > 0")
        rank, world_size = world_info()
        self.num_classes = num_classes
        self.start, self.end = class_shard(num_classes, rank, world_size)
        self.sample_rate = sample_rate
        self.knn_neighbours = knn_neighbours
        self.head = head
        self.weight = nn.Parameter(_initial_centres(num_classes, self.start, self.end, embedding_size, seed))

    def extra_repr(self) -> str:
        return (
            f"classes [{self.start}, {self.end}) of {self.num_classes}, "
            f"sample_rate={self.sample_rate}, knn_neighbours={self.knn_neighbours}"
        )

    def model_parallel_parameter_names(self) -> list[str]:
        """Names (relative to this module) of the parameters sharded across ranks."""
        return ["weight"]

    def active_classes(self, labels: Tensor) -> Tensor:
        """Sorted local rows this shard uses in training for a global batch with ``labels``
        (a collective with KNN selection: call it on every rank)."""
        local_count = self.end - self.start
        owned = (labels >= self.start) & (labels < self.end)
        positives = torch.unique(labels[owned] - self.start)
        if self.knn_neighbours:
            return self._nearest_classes(labels, positives)
        if self.sample_rate < 1.0:
            count = max(math.ceil(self.sample_rate * local_count), positives.numel())
            score = torch.rand(local_count, device=labels.device)
            score[positives] = 2.0
            return score.topk(count).indices.sort().values
        return torch.arange(local_count, device=labels.device)

    @torch.no_grad()
    def _nearest_classes(self, labels: Tensor, positives: Tensor) -> Tensor:
        classes = torch.unique(labels)
        owned = (classes >= self.start) & (classes < self.end)
        weight = F.normalize(self.weight, dim=1)
        centres = weight.new_zeros(classes.numel(), weight.shape[1])
        centres[owned] = weight[classes[owned] - self.start]
        centres = all_reduce_sum(centres)
        similarity = centres @ weight.T  # [classes of the batch, local classes]
        similarity[owned.nonzero().squeeze(1), classes[owned] - self.start] = -math.inf  # not its own neighbour
        k = self.knn_neighbours
        local_top = similarity.topk(min(k, similarity.shape[1]), dim=1).values
        local_top = F.pad(local_top, (0, k - local_top.shape[1]), value=-math.inf)
        _, world_size = world_info()
        candidates = all_gather(local_top).view(world_size, -1, k).transpose(0, 1).reshape(classes.numel(), -1)
        kth = candidates.topk(k, dim=1).values[:, -1]
        active = (similarity >= kth[:, None]).any(0)
        active[positives] = True
        return active.nonzero().squeeze(1)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean loss over the global batch from this rank's embeddings [B, D] and labels [B]."""
        _, world_size = world_info()
        if world_size > 1:
            embeddings = _ScaleGrad.apply(embeddings, float(world_size))
        features = F.normalize(all_gather_with_grad(embeddings), dim=1)
        labels = all_gather(labels)
        column = labels - self.start
        in_shard = (column >= 0) & (column < self.end - self.start)
        weight = self.weight
        if self.training and (self.sample_rate < 1.0 or self.knn_neighbours):
            active = self.active_classes(labels)
            weight = weight[active]
            column = torch.searchsorted(active, column)
        cos = features @ F.normalize(weight, dim=1).T
        cos = cos.to(torch.promote_types(cos.dtype, torch.float32))  # softmax in >= fp32 under autocast
        logits = self.head.logits(cos, in_shard, column, _reduce_statistic)
        rows = in_shard.nonzero().squeeze(1)
        target = all_reduce_sum(logits.new_zeros(labels.shape[0]).index_put((rows,), logits[rows, column[rows]]))
        return self.head.loss(target - _sharded_log_sum_exp(logits)).mean()


def shard_of(full: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's slice of a full [num_classes, ...] tensor (weights or optimizer state)."""
    start, end = class_shard(full.shape[0], rank, world_size)
    return full[start:end].clone()


@torch.no_grad()
def gather_full_weight(local: Tensor) -> Tensor:
    """The full [num_classes, ...] tensor from every rank's slice (a collective), for saving.

    Works for the centres and for any per-parameter optimizer state shaped like them (e.g.
    SGD's ``momentum_buffer``). Slices may differ in rows: padded to the largest, gathered,
    trimmed.
    """
    if world_info()[1] == 1:
        return local.detach().clone()
    sizes = all_gather(torch.tensor([local.shape[0]], device=local.device)).tolist()
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = all_gather(padded).split(max(sizes))
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])
