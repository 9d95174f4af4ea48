"""Collectives for the model-parallel softmax, with the gradients its loss needs.

All of them are the identity when torch.distributed is not initialised (one process).
The gradient rules assume the caller's setting: every rank computes the same global loss
from its own shard, each rank back-propagates its copy (see
:class:`~lightning_modules.distributed.model_parallel_softmax.ModelParallelSoftmax`).
"""

from __future__ import annotations

import torch
import torch._dynamo  # noqa: F401  before any process group exists, see below
import torch.distributed as dist
from torch import Tensor

# Importing torch._dynamo (torch.compile; torch.optim on its first step) after
# init_process_group keeps the default process group referenced (torch 2.14), so that
# destroy_process_group no longer stops gloo's worker threads. The reduce-scatter launched in
# a backward (all_gather_with_grad) holds a Python object that such a thread may then release
# while the interpreter exits: std::terminate, SIGABRT, in about one exit of ten on 2 gloo
# ranks. Importing it with this module, before any process group exists, avoids it.


def world_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in one process)."""
    if world_info()[1] == 1:
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _gather_equal(x: Tensor) -> Tensor:
    """Per-rank tensors of equal shape, concatenated along dim 0 in rank order."""
    world_size = dist.get_world_size()
    shape = torch.tensor(x.shape, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(f"all_gather needs the same shape on every rank, got {[tuple(s.tolist()) for s in shapes]}")
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_gather(x: Tensor) -> Tensor:
    """Concatenation of every rank's ``x`` along dim 0, without gradient (equal shapes)."""
    if world_info()[1] == 1:
        return x
    return _gather_equal(x.detach())


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.rows = x.shape[0]
        return _gather_equal(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Each rank holds the gradient of its own part of the loss w.r.t. the whole gathered
        # tensor; the sum over ranks is the full gradient, of which this rank needs its rows
        # only: a reduce-scatter (half the traffic of an all-reduce).
        grad = grad.contiguous()
        mine = grad.new_empty((ctx.rows, *grad.shape[1:]))
        dist.reduce_scatter_single(mine, grad)
        return mine


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Every rank's ``x`` (equal shapes) concatenated along dim 0; the backward sums the
    incoming gradients over ranks and returns this rank's slice (one reduce-scatter)."""
    if world_info()[1] == 1:
        return x
    return _AllGatherWithGrad.apply(x)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        total = x.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over ranks; the gradient passes through unchanged.

    That is the exact gradient when the sum feeds a computation every rank repeats
    identically (the softmax normaliser, the target logit): then each rank receives the whole
    gradient of the sum, which equals the gradient of its own summand.
    """
    if world_info()[1] == 1:
        return x
    return _AllReduceSum.apply(x)


def all_reduce_max(x: Tensor) -> Tensor:
    """Element-wise max of ``x`` over ranks, without gradient (a constant shift, as the
    max in the log-sum-exp trick)."""
    x = x.detach()
    if world_info()[1] == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


@torch.no_grad()
def broadcast_(tensors: list[Tensor], src: int) -> None:
    """Overwrite ``tensors`` in place on every rank with rank ``src``'s values (same shapes and
    order on every rank), e.g. to copy the best of several models to all ranks."""
    if world_info()[1] == 1:
        return
    for tensor in tensors:
        dist.broadcast(tensor.data, src)
