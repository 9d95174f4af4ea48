"""Model-parallel softmax over class centres sharded by class, with Partial-FC sampling and
KNN-softmax selection, and helpers that move the sharded state between world sizes.

Each rank owns a contiguous slice of the class centres (:func:`class_shard`). The batch's
embeddings and labels are all-gathered; each rank computes the logits of the whole batch
with its own classes only, a chunk of classes at a time, and the softmax normaliser comes
from an all-reduce of the row max and of the row sum of exponentials. Memory per rank: the
centres, their gradient and momentum, (classes / ranks) × D each, and temporaries of
O(global batch × chunk).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

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
from lightning_modules.nn.margins import MarginHead, NegativeStatistic

# Rows of the initial class centres are drawn in blocks of this many, each from its own
# generator, so that no rank draws (or holds) the full matrix.
_INIT_BLOCK_ROWS = 4096
# Centres with a smaller norm are divided by this instead (F.normalize's eps).
_NORM_EPS = 1e-12


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
    centres = torch.empty(end - start, dim)
    num_blocks = math.ceil(num_classes / _INIT_BLOCK_ROWS)
    block_seeds = torch.randint(2**62, (num_blocks,), generator=torch.Generator().manual_seed(seed))
    for block in range(start // _INIT_BLOCK_ROWS, math.ceil(end / _INIT_BLOCK_ROWS)):
        block_start = block * _INIT_BLOCK_ROWS
        rows = min(_INIT_BLOCK_ROWS, num_classes - block_start)
        generator = torch.Generator().manual_seed(int(block_seeds[block]))
        values = torch.empty(rows, dim).normal_(0.0, 0.01, generator=generator)
        first, last = max(start, block_start), min(end, block_start + rows)  # this shard's rows of the block
        centres[first - start : last - start] = values[first - block_start : last - block_start]
    return centres


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def scale_gradient(x: Tensor, factor: float) -> Tensor:
    """``x`` unchanged forward; its gradient times ``factor`` backward (−α: a gradient-reversal
    layer)."""
    return _ScaleGrad.apply(x, factor)


def _chunks(count: int, size: int) -> Iterator[tuple[int, int]]:
    """[start, end) of consecutive chunks of at most ``size`` of ``count`` rows."""
    for start in range(0, count, size):
        yield start, min(start + size, count)


def _inverse_norms(centres: Tensor) -> Tensor:
    """1 / ‖w_j‖ of each centre [c], in >= fp32; norms below 1e-12 count as 1e-12 (as in
    ``F.normalize``)."""
    norms = centres.norm(dim=1)
    return 1.0 / norms.to(torch.promote_types(norms.dtype, torch.float32)).clamp_min(_NORM_EPS)


def _cosines(features: Tensor, centres: Tensor, inverse_norms: Tensor) -> Tensor:
    """Cosines [N, c] between unit ``features`` [N, D] and ``centres`` [c, D], in >= fp32
    (the softmax stays in fp32 under autocast): the product's columns are scaled by the
    centres' inverse norms, no normalised copy of the centres is made."""
    return (features @ centres.T).to(inverse_norms.dtype) * inverse_norms


def _target_cosines(features: Tensor, centres: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """cos(f_rows[k], w_cols[k]) [n] of the samples ``rows`` whose classes are ``cols``."""
    own = centres[cols]
    return (features[rows] * own).sum(1).to(torch.promote_types(own.dtype, torch.float32)) * _inverse_norms(own)


def _owned(target_columns: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, columns) of the samples whose class the shard owns, from ``target_columns``."""
    rows = (target_columns >= 0).nonzero().squeeze(1)
    return rows, target_columns[rows]


def _is_target(target_columns: Tensor, num_columns: int) -> Tensor:
    """[N, c] mask of each sample's own class among ``num_columns`` columns, from the
    samples' target columns relative to the first one (outside [0, c): none)."""
    return torch.arange(num_columns, device=target_columns.device) == target_columns[:, None]


def _finite_or_zero(x: Tensor) -> Tensor:
    """``x`` with -inf (a row with no class yet) replaced by 0, to shift by without NaNs."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _chunk_negative_logits(cos: Tensor, target_columns: Tensor, head: MarginHead, state: Any) -> Tensor:
    """The head's logits [N, c] of a chunk's cosines, -inf at the samples' own classes."""
    return torch.where(_is_target(target_columns, cos.shape[1]), -math.inf, head.negative_logits(cos, state))


def _accumulate_chunk(
    products: Tensor, inverse_norms: Tensor, target_columns: Tensor, head: MarginHead, state: Any,
    row_max: Tensor, row_sum: Tensor,
) -> tuple[Tensor, Tensor]:
    """One step of the online log-sum-exp over a chunk's negative logits: from the products
    f·w [N, c] and the centres' inverse norms [c], the new running max and the running sum of
    exp(z − max), rescaled to the new max. Element-wise and row reductions only."""
    logits = _chunk_negative_logits(products.to(inverse_norms.dtype) * inverse_norms, target_columns, head, state)
    new_max = torch.maximum(row_max, logits.amax(1))
    shift = _finite_or_zero(new_max)
    return new_max, row_sum * (row_max - shift).exp() + (logits - shift[:, None]).exp().sum(1)


def _chunk_cosine_gradient(
    products: Tensor, inverse_norms: Tensor, target_columns: Tensor, head: MarginHead, state: Any,
    log_sum_exp: Tensor, grad_log_sum_exp: Tensor,
) -> tuple[Tensor, Tensor]:
    """The chunk's gradient through the cosines: Ĝ = (∂L/∂cos) / ‖w‖ [N, c], in the products'
    dtype (the operand of the two gradient products), and (Σ_i Ĝ_ij cos_ij) / ‖w_j‖ [c]. The
    head's derivative is taken by ``torch.func.vjp``; its cotangent is the softmax
    exp(z − log Σ exp) times the incoming gradient. Element-wise and column reductions only."""
    cos = products.to(inverse_norms.dtype) * inverse_norms
    logits, pullback = torch.func.vjp(lambda c: _chunk_negative_logits(c, target_columns, head, state), cos)
    (grad_cos,) = pullback(grad_log_sum_exp[:, None] * (logits - _finite_or_zero(log_sum_exp)[:, None]).exp())
    scaled = grad_cos * inverse_norms
    return scaled.to(products.dtype), (scaled * cos).sum(0) * inverse_norms


class _ChunkSteps(NamedTuple):
    accumulate: Callable[..., tuple[Tensor, Tensor]]
    cosine_gradient: Callable[..., tuple[Tensor, Tensor]]


@functools.cache
def _chunk_steps(compiled: bool) -> _ChunkSteps:
    """The per-chunk element-wise steps, as written (eager: several passes over [N, c]) or
    compiled by ``torch.compile`` (fused: one kernel, or a few, per step)."""
    steps = _ChunkSteps(_accumulate_chunk, _chunk_cosine_gradient)
    return _ChunkSteps(*map(torch.compile, steps)) if compiled else steps


class _ShardSoftmaxTerms(torch.autograd.Function):
    """This shard's terms of the softmax loss, computed chunk by chunk:

    - the target cosines [n] of the samples whose class the shard owns (``target_columns``
      [N]: a sample's column in ``centres``, -1 if another shard owns its class):
      ``target_cos``, taken by the caller without gradient, returned with it;
    - log Σ_{j ≠ y_i} exp(z_ij) [N] over the negative classes of every shard, z the ``head``'s
      negative logits of the cosines given ``state``: an online log-sum-exp over the shard's
      chunks (running max, rescaled sum), then all-reduces of the max and of the sum.

    ``inverse_norms`` [c] are the centres' 1/‖w‖, taken by the caller without gradient: the
    backward's formulas below include the gradient through them.

    Temporaries are [N, chunk] and [chunk, D], never [N, classes of the shard], and the only
    tensor of the centres' size is their gradient, written chunk by chunk. Each chunk is one
    product f·wᵀ followed by element-wise ``steps`` (:func:`_chunk_steps`). The backward
    recomputes each chunk's products (one more product, instead of storing the logits) and,
    with Ĝ_ij = (∂L/∂cos_ij) / ‖w_j‖, ∂L/∂f_i = Σ_j Ĝ_ij w_j and
    ∂L/∂w_j = Σ_i Ĝ_ij f_i − w_j (Σ_i Ĝ_ij cos_ij) / ‖w_j‖.
    """

    @staticmethod
    def forward(
        ctx, features, centres, inverse_norms, target_columns, target_cos, head, state, chunk_classes, steps
    ):
        row_max = features.new_full(features.shape[:1], -math.inf, dtype=inverse_norms.dtype)
        row_sum = torch.zeros_like(row_max)
        for start, end in _chunks(centres.shape[0], chunk_classes):
            row_max, row_sum = steps.accumulate(
                features @ centres[start:end].T, inverse_norms[start:end], target_columns - start, head, state,
                row_max, row_sum,
            )
        shift = _finite_or_zero(all_reduce_max(row_max))
        log_sum_exp = shift + all_reduce_sum(row_sum * (row_max - shift).exp()).log()
        ctx.save_for_backward(features, centres, inverse_norms, target_columns, target_cos, log_sum_exp)
        ctx.head, ctx.state, ctx.chunk_classes, ctx.steps = head, state, chunk_classes, steps
        ctx.autocast = [
            (device, torch.get_autocast_dtype(device)) for device in ("cpu", "cuda") if torch.is_autocast_enabled(device)
        ]
        return target_cos.clone(), log_sum_exp

    @staticmethod
    def backward(ctx, grad_target_cos: Tensor, grad_log_sum_exp: Tensor):
        features, centres, inverse_norms, target_columns, target_cos, log_sum_exp = ctx.saved_tensors
        grad_features = torch.zeros_like(features)
        grad_centres = torch.empty_like(centres)
        with contextlib.ExitStack() as autocast:
            for device, dtype in ctx.autocast:  # recompute the products exactly as the forward did
                autocast.enter_context(torch.autocast(device, dtype))
            for start, end in _chunks(centres.shape[0], ctx.chunk_classes):
                chunk = centres[start:end]
                scaled, radial = ctx.steps.cosine_gradient(  # Ĝ and (Σ_i Ĝ_ij cos_ij) / ‖w_j‖
                    features @ chunk.T, inverse_norms[start:end], target_columns - start, ctx.head, ctx.state,
                    log_sum_exp, grad_log_sum_exp,
                )
                grad_features += scaled @ chunk
                grad_centres[start:end] = scaled.T @ features
                grad_centres[start:end].addcmul_(chunk, radial[:, None], value=-1)
        # The owned samples' target cosines t = f·w / ‖w‖: the same rule, a few rows added in place.
        target_rows, target_cols = _owned(target_columns)
        own, own_inverse_norms = centres[target_cols], inverse_norms[target_cols]
        scaled = (grad_target_cos * own_inverse_norms)[:, None]
        radial = scaled * (target_cos * own_inverse_norms)[:, None]
        grad_features.index_add_(0, target_rows, (scaled * own).to(grad_features.dtype))
        grad_centres.index_add_(0, target_cols, (scaled * features[target_rows] - radial * own).to(grad_centres.dtype))
        return grad_features, grad_centres, None, None, None, None, None, None, None


@dataclass(frozen=True)
class SoftmaxOptions:
    """How :class:`ModelParallelSoftmax` selects its classes in training and computes its
    logits: ``sample_rate`` < 1 (Partial FC) or ``knn_neighbours`` > 0 (KNN softmax), at most
    one of them; ``chunk_classes`` classes of a shard at a time; ``compile_chunks`` to fuse each
    chunk's element-wise work with ``torch.compile`` (see the class docstring)."""

    sample_rate: float = 1.0
    knn_neighbours: int = 0
    chunk_classes: int = 65536
    compile_chunks: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.knn_neighbours < 0:
            raise ValueError(f"knn_neighbours must be >= 0, got {self.knn_neighbours}")
        if self.knn_neighbours and self.sample_rate < 1.0:
            raise ValueError("choose one class selection: sample_rate < 1 or knn_neighbours > 0")
        if self.chunk_classes < 1:
            raise ValueError(f"chunk_classes must be >= 1, got {self.chunk_classes}")


class ModelParallelSoftmax(nn.Module):
    """Softmax loss with a margin head over class centres sharded across ranks.

    ``forward`` returns the mean loss over the global batch, the same on every rank, equal
    to the single-process full softmax with the same head. Gradients:

    - class centres: each rank gets the exact gradient of that loss for its own rows;
    - embeddings: the all-gather sends back to each rank the gradient of the loss w.r.t. its
      own embeddings, multiplied by the world size, because DDP averages the (replicated)
      backbone's gradients over ranks: the average is then the gradient of the global loss.

    The target logit comes from each sample's own centre; the normaliser's other classes are
    taken ``chunk_classes`` at a time (:class:`_ShardSoftmaxTerms`), so no rank holds the
    logits of its whole shard: temporaries are O(global batch × chunk_classes), and no
    normalised copy of the centres is made. Heads that sum over negatives (NPCFace) take one
    more pass over the chunks, without gradient. With ``compile_chunks`` (opt-in, off by default
until its CUDA test has passed on a GPU),
    the element-wise work between a chunk's products (normalise, margin, mask, exp, row sums;
    in the backward the head's derivative and the column sums) is compiled by
    ``torch.compile`` into fused kernels; the first steps then pay the compilation (seconds
    to a minute, once per process and chunk shape), and a C++ compiler (CPU) or Triton (GPU)
    is needed. ``compile_chunks=False`` runs the same code op by op.

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
        self, num_classes: int, embedding_size: int, head: MarginHead, options: SoftmaxOptions = SoftmaxOptions(),
        *, seed: int = 0,
    ) -> None:
        super().__init__()
        rank, world_size = world_info()
        self.num_classes = num_classes
        self.start, self.end = class_shard(num_classes, rank, world_size)
        self.options = options
        self.head = head
        self.weight = nn.Parameter(_initial_centres(num_classes, self.start, self.end, embedding_size, seed))

    def extra_repr(self) -> str:
        return (
            f"classes [{self.start}, {self.end}) of {self.num_classes}, {self.options}"
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
        if self.options.knn_neighbours:
            return self._nearest_classes(labels, positives)
        if self.options.sample_rate < 1.0:
            count = max(math.ceil(self.options.sample_rate * local_count), positives.numel())
            score = torch.rand(local_count, device=labels.device)
            score[positives] = 2.0
            return score.topk(count).indices.sort().values
        return torch.arange(local_count, device=labels.device)

    @torch.no_grad()
    def _nearest_classes(self, labels: Tensor, positives: Tensor) -> Tensor:
        """The batch's classes of this shard and, of each class of the batch, the local
        classes among its K nearest over all shards; two passes over the chunks."""
        classes = torch.unique(labels)
        owned = (classes >= self.start) & (classes < self.end)
        own_columns = torch.where(owned, classes - self.start, -1)  # -inf to itself: not its own neighbour
        centres = self.weight.new_zeros(classes.numel(), self.weight.shape[1])
        centres[owned] = F.normalize(self.weight[own_columns[owned]], dim=1)
        centres = all_reduce_sum(centres)
        inverse_norms = _inverse_norms(self.weight)

        def similarity(start: int, end: int) -> Tensor:
            cos = _cosines(centres, self.weight[start:end], inverse_norms[start:end])
            return cos.masked_fill(_is_target(own_columns - start, end - start), -math.inf)

        k = self.options.knn_neighbours
        local_top = centres.new_full((classes.numel(), k), -math.inf)
        for start, end in _chunks(self.end - self.start, self.options.chunk_classes):
            local_top = torch.cat([local_top, similarity(start, end)], dim=1).topk(k, dim=1).values
        _, world_size = world_info()
        candidates = all_gather(local_top).view(world_size, -1, k).transpose(0, 1).reshape(classes.numel(), -1)
        kth = candidates.topk(k, dim=1).values[:, -1]
        active = torch.zeros(self.end - self.start, dtype=torch.bool, device=labels.device)
        for start, end in _chunks(self.end - self.start, self.options.chunk_classes):
            active[start:end] = (similarity(start, end) >= kth[:, None]).any(0)
        active[positives] = True
        return active.nonzero().squeeze(1)

    @torch.no_grad()
    def _sum_over_negatives(
        self, features: Tensor, centres: Tensor, inverse_norms: Tensor, target_columns: Tensor,
        statistic: NegativeStatistic,
    ) -> Tensor:
        """A head's per-sample statistic summed over the negative classes of every shard."""
        no_classes = features.new_zeros(features.shape[0], 0)
        total = statistic(no_classes, no_classes.bool())  # zeros of the statistic's shape
        for start, end in _chunks(centres.shape[0], self.options.chunk_classes):
            cos = _cosines(features, centres[start:end], inverse_norms[start:end])
            total = total + statistic(cos, ~_is_target(target_columns - start, end - start))
        return all_reduce_sum(total)

    def forward(self, embeddings: Tensor, labels: Tensor, sample_weights: Optional[Tensor] = None) -> Tensor:
        """Mean loss over the global batch from this rank's embeddings [B, D] and labels [B];
        with ``sample_weights`` [B] (no gradient), the mean of the weighted per-sample losses."""
        return self.loss_from_terms(*self.logit_terms(embeddings, labels), sample_weights=sample_weights)

    def loss_from_terms(self, target_logit: Tensor, negatives: Tensor, sample_weights: Optional[Tensor] = None) -> Tensor:
        """The mean loss of :meth:`logit_terms` (``negatives`` may add other heads' classes):
        log p_y = z_y − log(e^{z_y} + Σ_{j≠y} e^{z_j}), through the head's loss."""
        losses = self.head.loss(target_logit - torch.logaddexp(target_logit, negatives))
        if sample_weights is not None:
            losses = losses * all_gather(sample_weights.detach().to(losses))
        return losses.mean()

    def logit_terms(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(z_y, log Σ_{j≠y} e^{z_j}) [N_global] of the global batch, every class of every shard
        summed in, both with gradient: the softmax loss, or one over the union of two heads'
        classes (RACT's ``bct_ract``)."""
        _, world_size = world_info()
        if world_size > 1:
            embeddings = scale_gradient(embeddings, float(world_size))
        features = F.normalize(all_gather_with_grad(embeddings), dim=1)
        labels = all_gather(labels)
        outside = (labels < 0) | (labels >= self.num_classes)
        if outside.any():  # every rank sees the gathered labels: every rank raises
            raise ValueError(f"labels outside [0, {self.num_classes}) in the global batch: "
                             f"{labels[outside].unique()[:10].tolist()}; the data and num_classes disagree")
        centres, column = self.weight, labels - self.start
        if self.training and (self.options.sample_rate < 1.0 or self.options.knn_neighbours):
            active = self.active_classes(labels)
            centres = centres[active]
            column = torch.searchsorted(active, column)
        owned = (labels >= self.start) & (labels < self.end)
        target_columns = torch.where(owned, column, -1)
        target_rows, own_columns = _owned(target_columns)
        with torch.no_grad():
            inverse_norms = _inverse_norms(centres)  # one pass, shared by the head's statistics
            own_cos = _target_cosines(features, centres, target_rows, own_columns)
            cos_y = self._all_target_cosines(own_cos, target_rows, labels.shape[0])
        sum_over_negatives = functools.partial(
            self._sum_over_negatives, features, centres, inverse_norms, target_columns
        )
        state = self.head.row_state(cos_y, sum_over_negatives)
        own_cos, negatives = _ShardSoftmaxTerms.apply(
            features, centres, inverse_norms, target_columns, own_cos, self.head, state, self.options.chunk_classes,
            _chunk_steps(self.options.compile_chunks),
        )
        return self.head.target_logit(self._all_target_cosines(own_cos, target_rows, labels.shape[0]), state), negatives

    @torch.no_grad()
    def predict(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """(class, cosine) [N] of the nearest class centre over all shards to each row of
        ``embeddings`` [N, D], a chunk of centres at a time; a collective: every rank calls it
        with the same embeddings (GLDv2 recognition)."""
        features = F.normalize(embeddings.to(self.weight), dim=1)
        inverse_norms = _inverse_norms(self.weight)
        best = features.new_full((features.shape[0],), -math.inf, dtype=inverse_norms.dtype)
        best_class = torch.zeros(features.shape[0], dtype=torch.long, device=features.device)
        for start, end in _chunks(self.end - self.start, self.options.chunk_classes):
            value, column = _cosines(features, self.weight[start:end], inverse_norms[start:end]).max(dim=1)
            better = value > best
            best, best_class = torch.where(better, value, best), torch.where(better, column + self.start + start, best_class)
        _, world_size = world_info()
        values, classes = all_gather(best).view(world_size, -1), all_gather(best_class).view(world_size, -1)
        winner = values.argmax(dim=0, keepdim=True)
        return classes.gather(0, winner)[0], values.gather(0, winner)[0]

    @staticmethod
    def _all_target_cosines(own_cos: Tensor, rows: Tensor, batch: int) -> Tensor:
        """cos θ_y [N] of the whole batch from each shard's ``own_cos`` of its ``rows``."""
        return all_reduce_sum(own_cos.new_zeros(batch).index_put((rows,), own_cos))


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


# Checkpoints keep the options in their hyperparameters and are read with weights_only=True.
torch.serialization.add_safe_globals([SoftmaxOptions])
