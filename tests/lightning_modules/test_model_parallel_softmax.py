"""Model-parallel softmax: equal to the single-process full softmax on 1, 2 and 4 gloo ranks.

One spawn per world size (module fixture) runs every case; each rank saves its results and
the tests compare them with a reference written here: one F.linear over all classes, the
head, cross entropy. The margin heads are also checked against their formulas on one device.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lightning_modules.distributed.comm import all_gather_with_grad, world_info
from lightning_modules.distributed.model_parallel_softmax import (
    ModelParallelSoftmax,
    SoftmaxOptions,
    _cosines,
    _inverse_norms,
    class_shard,
    gather_full_weight,
    shard_of,
)
from lightning_modules.nn.margins import (
    CombinedMarginHead,
    CurricularFaceHead,
    MarginHead,
    NPCFaceHead,
    SearchSoftmaxHead,
    SoftmaxHead,
    margin_cos,
)

from runner import free_port

WORLD_SIZES = (1, 2, 4)
NUM_CLASSES, DIM, IN_FEATURES, BATCH = 50, 6, 5, 12  # global batch, split over the ranks
SAMPLE_RATE, KNN = 0.5, 3
# Classes per chunk of logits: several chunks per shard (the last one partial), and one chunk.
CHUNKS = (4, 65536)

HEADS: dict[str, Callable[[], MarginHead]] = {
    "softmax": lambda: SoftmaxHead(64.0),
    "arcface": lambda: CombinedMarginHead(64.0, 1.0, 0.5, 0.0),
    "arcface_straight_through": lambda: CombinedMarginHead(64.0, 1.0, 0.5, 0.0, margin_gradient="straight_through"),
    "cosface": lambda: CombinedMarginHead(64.0, 1.0, 0.0, 0.4),
    "combined": lambda: CombinedMarginHead(64.0, 1.0, 0.3, 0.2),
    "curricularface": lambda: CurricularFaceHead(64.0, 0.5),
    "npcface": lambda: NPCFaceHead(),
    "search_softmax": lambda: SearchSoftmaxHead(32.0, -1.0),
}


def _problem() -> dict[str, Tensor]:
    """Inputs, labels, class centres and a Linear backbone, in float64; sample 0's centre
    points away from its embedding so that the margins' fallbacks are exercised."""
    g = torch.Generator().manual_seed(0)
    problem = {
        "x": torch.randn(BATCH, IN_FEATURES, generator=g, dtype=torch.float64),
        "labels": torch.randint(0, NUM_CLASSES, (BATCH,), generator=g),
        "weight": 0.01 * torch.randn(NUM_CLASSES, DIM, generator=g, dtype=torch.float64),
        "backbone.weight": torch.randn(DIM, IN_FEATURES, generator=g, dtype=torch.float64),
        "backbone.bias": torch.randn(DIM, generator=g, dtype=torch.float64),
    }
    embedding = _backbone(problem)(problem["x"][:1]).detach()[0]
    problem["weight"][problem["labels"][0]] = -0.01 * F.normalize(embedding, dim=0) + 1e-4 * problem["weight"][0]
    return problem


def _backbone(problem: dict[str, Tensor]) -> nn.Linear:
    backbone = nn.Linear(IN_FEATURES, DIM).double()
    backbone.load_state_dict({"weight": problem["backbone.weight"], "bias": problem["backbone.bias"]})
    return backbone


# ----------------------------------------------------------------------------- workers


def _run_sharded(problem: dict[str, Tensor], head: MarginHead, train: bool, **options) -> dict:
    """One forward/backward on this rank; backbone gradients averaged as DDP does."""
    rank, world_size = world_info()
    backbone = _backbone(problem)
    model = ModelParallelSoftmax(NUM_CLASSES, DIM, head, SoftmaxOptions(**options)).double().train(train)
    selection = {key: value for key, value in options.items() if key != "chunk_classes"}
    start, end = class_shard(NUM_CLASSES, rank, world_size)
    with torch.no_grad():
        model.weight.copy_(problem["weight"][start:end])
    rows = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    result = {}
    if selection:
        torch.manual_seed(100 + rank)
        result["active"] = model.active_classes(problem["labels"]) + start
    torch.manual_seed(100 + rank)  # forward draws the same classes
    loss = model(backbone(problem["x"][rows]), problem["labels"][rows])
    loss.backward()
    for parameter in backbone.parameters():
        dist.all_reduce(parameter.grad)
        parameter.grad /= world_size
    result.update(
        loss=loss.detach(),
        backbone_grads=[p.grad for p in backbone.parameters()],
        weight_grad=gather_full_weight(model.weight.grad),
        buffers={name: b.clone() for name, b in head.named_buffers()},
    )
    return result


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
    )
    try:
        problem = _problem()
        results: dict = {
            "world_info": world_info(),
            "heads": {
                (name, train, chunk): _run_sharded(problem, make_head(), train, chunk_classes=chunk)
                for name, make_head in HEADS.items()
                for train in (True, False)
                for chunk in CHUNKS
            },
            "partial_fc": _run_sharded(problem, HEADS["arcface"](), True, sample_rate=SAMPLE_RATE, chunk_classes=4),
            "knn": _run_sharded(problem, HEADS["npcface"](), True, knn_neighbours=KNN, chunk_classes=4),
        }
        classifier = ModelParallelSoftmax(NUM_CLASSES, DIM, SoftmaxHead(), SoftmaxOptions(chunk_classes=3)).double()
        start, end = class_shard(NUM_CLASSES, rank, world_size)
        with torch.no_grad():
            classifier.weight.copy_(problem["weight"][start:end])
        results["predict"] = classifier.predict(_backbone(problem)(problem["x"]).detach())
        from lightning_modules.distributed import model_parallel_softmax

        model_parallel_softmax._INIT_BLOCK_ROWS = 7  # several init blocks, cut by the shards
        initial = ModelParallelSoftmax(NUM_CLASSES, DIM, SoftmaxHead(), seed=3).weight
        momentum = torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(7))
        results["checkpoint"] = {
            "initial": gather_full_weight(initial),
            "momentum": gather_full_weight(shard_of(momentum, rank, world_size)),
        }
        if world_size > 1:
            try:
                all_gather_with_grad(torch.zeros(rank + 1, 2))
            except ValueError as error:
                results["unequal_gather_error"] = str(error)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list[dict]]:
    """{world size: per-rank results}; a failure in any rank fails the tests."""
    results = {}
    for world_size in WORLD_SIZES:
        out_dir = tmp_path_factory.mktemp(f"world{world_size}")
        mp.spawn(_worker, args=(world_size, free_port(), str(out_dir)), nprocs=world_size, join=True)
        results[world_size] = [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]
    return results


# --------------------------------------------------------------------------- reference


def _reference(problem: dict[str, Tensor], head: MarginHead, train: bool, classes: Tensor | None = None) -> dict:
    """Single-process softmax over all classes (or over ``classes``, sorted global ids)."""
    backbone = _backbone(problem)
    weight = problem["weight"].clone().requires_grad_()
    classes = torch.arange(NUM_CLASSES) if classes is None else classes
    labels = torch.searchsorted(classes, problem["labels"])
    cos = F.linear(F.normalize(backbone(problem["x"]), dim=1), F.normalize(weight[classes], dim=1))
    logits = head.double().train(train)(cos, labels)
    loss = head.loss(-F.cross_entropy(logits, labels, reduction="none")).mean()
    loss.backward()
    return {
        "loss": loss.detach(),
        "backbone_grads": [p.grad for p in backbone.parameters()],
        "weight_grad": weight.grad,
        "buffers": dict(head.named_buffers()),
    }


def _assert_equal_to_reference(ranks: list[dict], expected: dict, what: str) -> None:
    close = dict(rtol=1e-5, atol=1e-12)
    for rank, result in enumerate(ranks):
        where = f"{what}, rank {rank}"
        torch.testing.assert_close(result["loss"], expected["loss"], **close, msg=lambda m: f"{where} loss: {m}")
        for got, want in zip(result["backbone_grads"], expected["backbone_grads"]):
            torch.testing.assert_close(got, want, **close, msg=lambda m: f"{where} backbone grad: {m}")
        torch.testing.assert_close(
            result["weight_grad"], expected["weight_grad"], **close, msg=lambda m: f"{where} weight grad: {m}"
        )
        for name, buffer in expected["buffers"].items():
            torch.testing.assert_close(result["buffers"][name], buffer, **close, msg=lambda m: f"{where} {name}: {m}")


# ------------------------------------------------------------------------ distributed


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_every_head_equals_single_process_softmax(runs, world_size):
    problem = _problem()
    for rank, result in enumerate(runs[world_size]):
        assert result["world_info"] == (rank, world_size)
    for name, make_head in HEADS.items():
        for train in (True, False):
            expected = _reference(problem, make_head(), train)
            for chunk in CHUNKS:
                ranks = [result["heads"][name, train, chunk] for result in runs[world_size]]
                what = f"{name} (train={train}, chunks of {chunk} classes) on {world_size} ranks"
                _assert_equal_to_reference(ranks, expected, what)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_curricularface_t_is_updated_from_the_global_batch(runs, world_size):
    expected = _reference(_problem(), CurricularFaceHead(), train=True)["buffers"]["t"]
    assert expected != 0
    for result in runs[world_size]:
        for chunk in CHUNKS:
            assert torch.allclose(result["heads"]["curricularface", True, chunk]["buffers"]["t"], expected, rtol=1e-12)
            assert result["heads"]["curricularface", False, chunk]["buffers"]["t"] == 0  # eval leaves t


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_partial_fc_keeps_positives_and_equals_softmax_over_active_classes(runs, world_size):
    problem = _problem()
    labels = problem["labels"]
    ranks = [result["partial_fc"] for result in runs[world_size]]
    for rank, result in enumerate(ranks):
        start, end = class_shard(NUM_CLASSES, rank, world_size)
        active = result["active"]
        positives = torch.unique(labels[(labels >= start) & (labels < end)])
        assert torch.isin(positives, active).all()
        assert ((active >= start) & (active < end)).all() and active.unique().numel() == active.numel()
        assert active.numel() == max(math.ceil(SAMPLE_RATE * (end - start)), positives.numel())
        assert active.numel() > positives.numel()  # some negatives are sampled
    active = torch.cat([result["active"] for result in ranks])
    inactive = torch.ones(NUM_CLASSES, dtype=torch.bool).index_fill(0, active, False)
    assert (ranks[0]["weight_grad"][inactive] == 0).all()
    expected = _reference(problem, HEADS["arcface"](), True, classes=active)
    _assert_equal_to_reference(ranks, expected, f"Partial FC on {world_size} ranks")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_knn_softmax_selects_the_global_top_k_neighbours(runs, world_size):
    problem = _problem()
    classes = torch.unique(problem["labels"])
    centres = F.normalize(problem["weight"], dim=1)
    similarity = centres[classes] @ centres.T
    similarity[torch.arange(classes.numel()), classes] = -math.inf
    expected_active = torch.unique(torch.cat([classes, similarity.topk(KNN, dim=1).indices.flatten()]))
    ranks = [result["knn"] for result in runs[world_size]]
    active = torch.cat([result["active"] for result in ranks])
    assert torch.equal(active, expected_active)
    expected = _reference(problem, HEADS["npcface"](), True, classes=active)
    _assert_equal_to_reference(ranks, expected, f"KNN softmax on {world_size} ranks")


def test_checkpoint_round_trip_across_world_sizes(runs):
    """Shards gathered on 4, 2 and 1 ranks give the same full tensors; the centres' initial
    values do not depend on the world size."""
    momentum = torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(7))
    initial = runs[1][0]["checkpoint"]["initial"]
    assert initial.shape == (NUM_CLASSES, DIM) and 0.005 < initial.std() < 0.02
    for world_size in WORLD_SIZES:
        for result in runs[world_size]:
            assert torch.equal(result["checkpoint"]["momentum"], momentum)
            assert torch.equal(result["checkpoint"]["initial"], initial)
    for world_size in WORLD_SIZES:
        shards = [shard_of(momentum, rank, world_size) for rank in range(world_size)]
        assert torch.equal(torch.cat(shards), momentum)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_predicted_class_is_the_nearest_centre_over_all_shards(runs, world_size):
    problem = _problem()
    cosines = F.normalize(_backbone(problem)(problem["x"]), dim=1) @ F.normalize(problem["weight"], dim=1).T
    expected_scores, expected_classes = cosines.detach().max(dim=1)
    for rank in runs[world_size]:
        classes, scores = rank["predict"]
        assert torch.equal(classes, expected_classes)
        torch.testing.assert_close(scores, expected_scores)


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_gather_of_unequal_sizes_is_a_clear_error(runs, world_size):
    for result in runs[world_size]:
        assert "same shape on every rank" in result["unequal_gather_error"]


_GLOO_THREADS_AFTER_DESTROY = """
import os, socket, torch
import lightning_modules.distributed.comm  # what a training script imports before the group
import torch.distributed as dist

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
import torch._dynamo  # as torch.optim does on its first step
dist.destroy_process_group()
names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
print(sum("gloo" in name for name in names))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names from /proc")
def test_destroying_the_process_group_stops_gloo_threads():
    """With the collectives imported before the group exists, a later import of torch._dynamo
    does not keep the group alive: destroy_process_group stops its gloo threads, which, left
    running, can abort the process at exit (see ``comm``'s note)."""
    result = subprocess.run([sys.executable, "-c", _GLOO_THREADS_AFTER_DESTROY], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "0", result.stdout


# ------------------------------------------------------------------------ one process


def test_class_shards_are_contiguous_and_near_equal():
    assert [class_shard(10, rank, 4) for rank in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [class_shard(3, rank, 4) for rank in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 3)]
    assert class_shard(7, 0, 1) == (0, 7)


def test_collectives_are_identities_on_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert world_info() == (0, 1)
    assert all_gather_with_grad(x) is x


class _LargeAllocations(TorchDispatchMode):
    """Records the shapes of the tensors that operations allocate (not views, not in-place
    results) with more than ``min_numel`` elements."""

    def __init__(self, min_numel: int) -> None:
        super().__init__()
        self.min_numel = min_numel
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                if tensor.numel() > self.min_numel:
                    self.shapes.append(tuple(tensor.shape))
        return out


@pytest.mark.parametrize("name", ["arcface", "curricularface", "npcface"])
def test_only_the_centres_gradient_is_allocated_whole(name):
    """Forward and backward in chunks of 4 classes allocate one tensor larger than the chunks
    [N, 4], the embeddings [N, D] and per-class vectors [C]: the centres' gradient [C, D],
    once. The logits of the batch with all classes [N, C] would be twice its size."""
    problem = _problem()
    chunk = 4
    small = max(BATCH * chunk, BATCH * DIM, NUM_CLASSES)
    assert BATCH * NUM_CLASSES > NUM_CLASSES * DIM > small
    model = ModelParallelSoftmax(NUM_CLASSES, DIM, HEADS[name](), SoftmaxOptions(chunk_classes=chunk)).double()
    embeddings = _backbone(problem)(problem["x"]).detach().requires_grad_()
    with _LargeAllocations(min_numel=small) as allocations:
        model(embeddings, problem["labels"]).backward()
    assert allocations.shapes == [(NUM_CLASSES, DIM)]


def _step_with_compiled_chunks(
    problem: dict[str, Tensor], name: str, compiled: bool, device: str = "cpu", dtype=torch.float64
) -> tuple[Tensor, ...]:
    """Loss, embedding gradient and centres' gradient of one training step in chunks of 4,
    on ``device`` in ``dtype``, returned on the CPU in float64."""
    model = ModelParallelSoftmax(NUM_CLASSES, DIM, HEADS[name](), SoftmaxOptions(chunk_classes=4, compile_chunks=compiled))
    model = model.to(device, dtype)
    with torch.no_grad():
        model.weight.copy_(problem["weight"])
    embeddings = _backbone(problem)(problem["x"]).detach().to(device, dtype).requires_grad_()
    loss = model(embeddings, problem["labels"].to(device))
    loss.backward()
    return tuple(t.detach().cpu().double() for t in (loss, embeddings.grad, model.weight.grad))


@pytest.mark.parametrize("name", HEADS)
def test_compiled_chunks_equal_the_eager_ones(name):
    """torch.compile's fused chunks give the loss and gradients of the op-by-op chunks (the
    default): two graphs (forward and backward steps), each for the full chunks and
    for the last, partial one."""
    torch._dynamo.reset()
    counters.clear()
    problem = _problem()
    eager = _step_with_compiled_chunks(problem, name, compiled=False)
    assert counters["stats"]["unique_graphs"] == 0
    compiled = _step_with_compiled_chunks(problem, name, compiled=True)
    assert counters["stats"]["unique_graphs"] == 4  # compiled, not fallen back to eager
    for got, want, what in zip(compiled, eager, ("loss", "embedding grad", "centre grad")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14, msg=lambda m: f"{name} {what}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", HEADS)
def test_cuda_chunks_equal_the_cpu_ones(name):
    """On a GPU the compiled chunks (compile_chunks=True), the backward's inside autograd's device
    thread: float64 equals the CPU's op-by-op chunks to rounding, float32 (full-precision
    matmuls) to float32's."""
    assert torch.get_float32_matmul_precision() == "highest", "TF32 products would need a looser tolerance"
    problem = _problem()
    cpu = _step_with_compiled_chunks(problem, name, compiled=False)
    torch._dynamo.reset()  # a fresh cache per head: past dynamo's recompile limit it would run eager
    counters.clear()
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        cuda = _step_with_compiled_chunks(problem, name, compiled=True, device="cuda", dtype=dtype)
        for got, want, what in zip(cuda, cpu, ("loss", "embedding grad", "centre grad")):
            atol = rtol * want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name} {dtype} {what}: {m}")
    # float64: 4 graphs (as on CPU); float32: one more per step, with dynamic shapes (6 on CPU too)
    assert counters["stats"]["unique_graphs"] == 6


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_chunked_backward_recomputes_the_logits_under_the_forward_autocast(compiled):
    """Under bf16 autocast the chunks' gradients equal autograd through the same bf16 logits
    computed whole, up to the target cosine, which the model-parallel head takes in fp32
    (0.3% of the largest gradient). Recomputing the logits in fp32 would be 30% off."""
    problem = {key: value.float() if value.is_floating_point() else value for key, value in _problem().items()}
    labels = problem["labels"]
    embeddings = _backbone(problem).float()(problem["x"]).detach()
    results = []
    for chunk in (4, None):
        head = CurricularFaceHead()
        weight = problem["weight"].clone().requires_grad_()
        x = embeddings.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunk:
                model = ModelParallelSoftmax(NUM_CLASSES, DIM, head, SoftmaxOptions(chunk_classes=chunk, compile_chunks=compiled))
                model.weight = nn.Parameter(weight)
                loss = model(x, labels)
            else:
                loss = F.cross_entropy(head(_cosines(F.normalize(x, dim=1), weight, _inverse_norms(weight)), labels), labels)
        loss.backward()
        results.append((loss, x.grad, model.weight.grad if chunk else weight.grad))
    assert results[0][1].abs().max() > 1e-3
    for chunked, whole, what in zip(results[0], results[1], ("loss", "embedding grad", "centre grad")):
        tolerance = 0.02 * whole.abs().max().item()  # measured 0.003; fp32 recomputation gives 0.3
        torch.testing.assert_close(chunked, whole, rtol=0, atol=tolerance, msg=lambda m: f"{what}: {m}")


def test_margin_target_logits_follow_the_formulas():
    cos = torch.tensor([0.5, -0.95], dtype=torch.float64)
    arc = margin_cos(cos, 1.0, 0.5, 0.0)
    assert torch.allclose(arc[0], torch.tensor(math.cos(math.pi / 3 + 0.5), dtype=torch.float64))
    assert torch.allclose(arc[1], torch.tensor(-0.95 - 0.5 * math.sin(math.pi - 0.5), dtype=torch.float64))
    assert torch.equal(margin_cos(cos, 1.0, 0.0, 0.4), cos - 0.4)  # CosFace exactly
    logits = CombinedMarginHead(64.0, 1.0, 0.3, 0.2)(torch.tensor([[0.5, 0.2]]), torch.tensor([0]))
    assert torch.allclose(logits, 64 * torch.tensor([[math.cos(math.pi / 3 + 0.3) - 0.2, 0.2]]))


def test_arcface_margin_gradient_exact_and_straight_through():
    """Exact: d/dcos of cos(θ + m) = sin(θ + m)/sin θ, and the fallback's 1 past π. Straight
    through (arcface_torch since Dec 2022): the value cos(θ + m) everywhere, no fallback, and the
    plain cosine's gradient."""
    cos = torch.tensor([0.5, -0.95], dtype=torch.float64)
    gradients = {}
    for kind in ("exact", "straight_through"):
        x = cos.clone().requires_grad_(True)
        logit = CombinedMarginHead(2.0, 1.0, 0.5, 0.0, margin_gradient=kind).target_logit(x, None)
        logit.sum().backward()
        gradients[kind] = (logit.detach(), x.grad)
    theta = torch.acos(cos)
    exact_value, exact_grad = gradients["exact"]
    torch.testing.assert_close(exact_value[0], 2 * torch.cos(theta[0] + 0.5))
    torch.testing.assert_close(exact_grad, 2 * torch.stack([torch.sin(theta[0] + 0.5) / torch.sin(theta[0]),
                                                            torch.tensor(1.0, dtype=torch.float64)]))
    straight_value, straight_grad = gradients["straight_through"]
    torch.testing.assert_close(straight_value, 2 * torch.cos(theta + 0.5))  # θ + m > π: no fallback
    assert straight_value[1] > exact_value[1]
    torch.testing.assert_close(straight_grad, torch.full_like(cos, 2.0))
    with pytest.raises(ValueError, match="margin_gradient"):
        CombinedMarginHead(margin_gradient="paper")


@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.0, 0.3, 0.2)])
def test_margin_target_logit_is_monotonic_in_cos(margins):
    cos = torch.linspace(-1, 1, 4001, dtype=torch.float64)
    assert (margin_cos(cos, *margins).diff() >= 0).all()


@pytest.mark.parametrize("name", list(HEADS))
def test_gradients_are_finite_at_cos_plus_minus_one(name):
    head = HEADS[name]().double()
    cos = torch.tensor([[1.0, -1.0, 0.3], [-1.0, 1.0, 0.0], [0.2, 1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 2])
    logits = head(cos, labels)
    head.loss(-F.cross_entropy(logits, labels, reduction="none")).sum().backward()
    assert torch.isfinite(logits).all() and torch.isfinite(cos.grad).all()


def test_curricularface_hand_case():
    head = CurricularFaceHead(s=1.0, m=0.5).double()
    cos = torch.tensor([[0.6, 0.5, -0.8]], dtype=torch.float64)
    logits = head(cos, torch.tensor([0]))
    t = 0.01 * 0.6
    threshold = math.cos(math.acos(0.6) + 0.5)  # 0.107: 0.5 is hard, -0.8 is not
    assert torch.allclose(head.t, torch.tensor(t, dtype=torch.float64))
    expected = [math.cos(math.acos(0.6) + 0.5), 0.5 * (t + 0.5), -0.8]
    assert threshold < 0.5
    assert torch.allclose(logits, torch.tensor([expected], dtype=torch.float64))


def test_npcface_hand_case():
    head = NPCFaceHead(s=2.0, m=0.5)
    cos = torch.tensor([[0.3, 0.5, 0.1, -0.2], [-0.1, 0.2, 0.0, 0.0]], dtype=torch.float64)
    logits = head(cos, torch.tensor([0, 0]))
    # Row 0: threshold cos(acos 0.3 + 0.5) = -0.194, hard = {0.5, 0.1}, m' = 0.4 + 0.2 * 0.3.
    margin = 0.4 + 0.2 * 0.3
    row0 = [math.cos(math.acos(0.3) + margin), 1.1 * 0.5 + 0.2, 1.1 * 0.1 + 0.2, -0.2]
    # Row 1: cos θ_y <= 0 keeps the target; every negative is above cos(acos(-0.1) + 0.5).
    row1 = [-0.1, 1.1 * 0.2 + 0.2, 0.2, 0.2]
    assert torch.allclose(logits, 2.0 * torch.tensor([row0, row1], dtype=torch.float64))


def test_search_softmax_loss_matches_formula_and_stays_finite_when_p_underflows():
    head = SearchSoftmaxHead(s=32.0, a=-1.0)
    alpha = -math.exp(32.0 / 3)
    p = torch.tensor([0.3, 0.9, 1.0], dtype=torch.float64)
    assert torch.allclose(head.loss(p.log()), -torch.log(p / (alpha * p + 1 - alpha)))
    log_p = torch.tensor([-1e4, -800.0, 0.0], dtype=torch.float64, requires_grad=True)  # exp(-1e4) == 0
    loss = head.loss(log_p)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(log_p.grad).all()
    assert torch.allclose(loss[0], torch.tensor(1e4 + math.log(1 - alpha), dtype=torch.float64))
    with pytest.raises(ValueError, match="a <= 0"):
        head.a = 0.5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sample_rate": 0.0}, "sample_rate must be in"),
        ({"knn_neighbours": -1}, "knn_neighbours must be >= 0"),
        ({"sample_rate": 0.5, "knn_neighbours": 3}, "choose one class selection"),
        ({"chunk_classes": 0}, "chunk_classes must be >= 1"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        SoftmaxOptions(**options)


@pytest.mark.parametrize("label", [-1, NUM_CLASSES])
def test_a_label_outside_the_classes_is_an_error_naming_it(label):
    model = ModelParallelSoftmax(NUM_CLASSES, DIM, SoftmaxHead())
    with pytest.raises(ValueError, match=rf"labels outside \[0, {NUM_CLASSES}\) in the global batch: \[{label}\]"):
        model(torch.randn(3, DIM), torch.tensor([0, label, 1]))
