"""The losses of the compatible upgrades beyond BCT against hand-worked small cases: RACT's
masking of the anchor's class and its two negative sets, its triplet variant, and its loss on 2
gloo ranks equal to one process's on the concatenated batch; AdvBCT's gradient reversal (sign
and scale, and its schedule), class statistics with the 1.5·IQR filter, the elastic radius
moving toward T, the boundary loss averaged over the violators only, and UniBCT's prototype refinement; the
Anti-Collapse coding rate against an explicit logdet and its Proxy-Anchor alignment by hand."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lightning_modules.nn.compatibility import (ElasticBoundary, GradientReversal, ResidualTransformation, boundary_loss,
                                                class_statistics, ract_contrastive_loss, ract_triplet_loss,
                                                refine_prototypes, reversal_coefficient)
from lightning_modules.nn.anti_collapse import AntiCollapseLoss, coding_rate, proxy_anchor_loss
from lightning_modules.retrieval.ract import gathered_ract_loss

from runner import free_port


def _unit(*angles: float) -> torch.Tensor:
    return torch.tensor([[math.cos(a), math.sin(a)] for a in angles])


def test_ract_positive_is_the_own_old_feature_and_negatives_are_both_sets_of_other_classes():
    """Anchors 0 and 1 share class 0, anchor 2 is class 1. For anchor 0 every entry of class 0
    (its own new feature, anchor 1's old and new features) is masked: its negatives are o_2 and
    n_2 only. τ = 0.5."""
    new, old = _unit(0.0, 0.3, 2.0), _unit(0.1, 0.5, 1.5)
    labels = torch.tensor([0, 0, 1])
    tau = 0.5

    def term(i: int, negatives: list[torch.Tensor]) -> float:
        positive = float(new[i] @ old[i]) / tau
        others = [float(new[i] @ x) / tau for x in negatives]
        return -positive + math.log(math.exp(positive) + sum(math.exp(v) for v in others))

    expected = (term(0, [old[2], new[2]]) + term(1, [old[2], new[2]]) + term(2, [old[0], old[1], new[0], new[1]])) / 3
    loss = ract_contrastive_loss(new, old, labels, new, old, labels, temperature=tau)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # top-1: anchor 2 keeps its closest old (o_1) and closest new (n_1) negative only
    top1 = ract_contrastive_loss(new, old, labels, new, old, labels, temperature=tau, topk=1)
    expected_top1 = (term(0, [old[2], new[2]]) + term(1, [old[2], new[2]]) + term(2, [old[1], new[1]])) / 3
    assert top1.item() == pytest.approx(expected_top1, rel=1e-5)


def test_ract_triplet_ranks_the_positive_distance_under_both_hardest_negatives():
    new, old = _unit(0.0, 2.0), _unit(0.2, 2.5)
    labels = torch.tensor([0, 1])
    d = lambda a, b: float((a - b).norm())  # noqa: E731
    expected = 0.0
    for negatives in (old, new):
        expected += (max(0.0, d(new[0], old[0]) - d(new[0], negatives[1]) + 0.8)
                     + max(0.0, d(new[1], old[1]) - d(new[1], negatives[0]) + 0.8)) / 2
    loss = ract_triplet_loss(new, old, labels, new, old, labels, margin=0.8, topk=10)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def _ract_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        data = torch.load(Path(out_dir) / "data.pt")
        rows = slice(rank * 4, (rank + 1) * 4)
        new = data["new"][rows].clone().requires_grad_(True)
        loss = gathered_ract_loss(F.normalize(new, dim=1), data["old"][rows], data["labels"][rows], temperature=0.05, topk=5)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": new.grad}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ract_on_two_ranks_equals_one_process_on_the_concatenated_batch(tmp_path):
    """The mean of the ranks' losses equals the one-process loss, and each rank's gradient
    (averaged by DDP: halved) equals the one-process gradient of its rows."""
    generator = torch.Generator().manual_seed(0)
    new = torch.randn(8, 6, generator=generator)
    old = F.normalize(torch.randn(8, 6, generator=generator), dim=1)
    labels = torch.tensor([0, 1, 2, 0, 3, 1, 4, 5])
    torch.save({"new": new, "old": old, "labels": labels}, tmp_path / "data.pt")
    mp.spawn(_ract_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = new.clone().requires_grad_(True)
    reference = gathered_ract_loss(F.normalize(single, dim=1), old, labels, temperature=0.05, topk=5)
    reference.backward()
    assert ((ranks[0]["loss"] + ranks[1]["loss"]) / 2).item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]) / 2, single.grad)


def test_gradient_reversal_flips_and_scales_the_gradient_and_its_schedule():
    x = torch.randn(3, 4, requires_grad=True)
    out = GradientReversal()(x, 0.25)
    torch.testing.assert_close(out, x)
    (out * torch.arange(12.0).view(3, 4)).sum().backward()
    torch.testing.assert_close(x.grad, -0.25 * torch.arange(12.0).view(3, 4))
    assert reversal_coefficient(0.0) == 0.0
    assert reversal_coefficient(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert 0.999 < reversal_coefficient(0.99) < 1.0


def test_class_statistics_keep_the_raw_mean_and_filter_radius_outliers():
    # class 0: seven features near axis 0 and one far out; class 1: two features; class 2: none
    angles = [0.0, 0.02, -0.02, 0.03, -0.03, 0.01, -0.01, 1.2]
    features = torch.cat([_unit(*angles) * 3.0, _unit(2.0, 2.2)])  # scaled: normalised first
    labels = torch.tensor([0] * 8 + [1, 1])
    centres, radii, counts = class_statistics(features, labels, 3)
    unit = _unit(*angles)
    torch.testing.assert_close(centres[0], unit.mean(dim=0))  # not re-normalised
    assert centres[0].norm() < 1.0
    radius = (unit - unit.mean(dim=0)).norm(dim=1)
    assert radii[0].item() == pytest.approx(float(radius[:7].max()), rel=1e-5)  # the far one is an outlier
    assert counts.tolist() == [7, 2, 0] and radii[2] == 0
    two = _unit(2.0, 2.2)
    assert radii[1].item() == pytest.approx(float((two - two.mean(0)).norm(dim=1).max()), rel=1e-5)  # < 4: unfiltered


def test_the_elastic_radius_moves_toward_the_threshold_and_only_violators_average():
    boundary = ElasticBoundary(3, threshold=1.0)
    with torch.no_grad():
        boundary.weight.copy_(torch.tensor([0.0, 0.0, 20.0]))
    radii = torch.tensor([0.6, 1.4, 0.2])
    moved = boundary(radii, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(moved, torch.tensor([0.8, 1.2, 1.0]), atol=1e-6, rtol=0)  # halfway, halfway, all the way
    new = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # normalised inside
    centres = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    loss = boundary_loss(new, centres, torch.tensor([0.5, 2.0, 1.0]))
    # distances 1, 1, sqrt(2); excesses 0.5, 0, sqrt(2) - 1: two violators
    assert loss.item() == pytest.approx((0.5 + math.sqrt(2) - 1) / 2, rel=1e-6)
    assert boundary_loss(new, centres, torch.full((3,), 5.0)).item() == 0.0


def test_prototype_refinement_is_a_softmax_weighted_mean_over_the_nearest_prototypes():
    prototypes = _unit(0.0, 0.2, 1.5, 3.0)
    refined = refine_prototypes(prototypes, neighbours=1, temperature=0.5, chunk=3)
    # prototype 0's nearest other is 1: weights softmax([1, cos 0.2] / 0.5)
    weights = torch.softmax(torch.tensor([1.0, math.cos(0.2)]) / 0.5, dim=0)
    expected = F.normalize(weights[0] * prototypes[0] + weights[1] * prototypes[1], dim=0)
    torch.testing.assert_close(refined[0], expected)
    torch.testing.assert_close(refined.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(refine_prototypes(prototypes, neighbours=0), prototypes)  # no neighbours: unchanged


def test_coding_rate_against_an_explicit_logdet_in_both_forms():
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    d, m, eps = 6, 4, 0.5
    columns = 0.5 * torch.linalg.slogdet(torch.eye(m, dtype=torch.float64) + m / (d * eps) * (z.T @ z).double())[1]
    rows = 0.5 * torch.linalg.slogdet(torch.eye(d, dtype=torch.float64) + d / (m * eps) * (z @ z.T).double())[1]
    assert coding_rate(z, eps).item() == pytest.approx(columns.item(), rel=1e-5)
    assert coding_rate(z, eps, over="rows").item() == pytest.approx(rows.item(), rel=1e-5)
    assert coding_rate(z, eps, gamma=2.0).item() > coding_rate(z, eps).item()


def test_proxy_anchor_by_hand_and_the_anti_collapse_total():
    embeddings, proxies = _unit(0.0, 0.1, 2.0), _unit(0.05, 1.9, 3.0)
    labels = torch.tensor([0, 0, 1])
    s = embeddings @ proxies.T
    alpha, delta = 64.0, 0.1
    positive = [math.log1p(float(torch.exp(-alpha * (s[[0, 1], 0] - delta)).sum()))] * 2 + \
               [math.log1p(float(torch.exp(-alpha * (s[2, 1] - delta))))]
    negative = [math.log1p(float(torch.exp(alpha * (s[2, 0] + delta)))),
                math.log1p(float(torch.exp(alpha * (s[[0, 1], 1] + delta)).sum())),
                math.log1p(float(torch.exp(alpha * (s[:, 2] + delta)).sum()))]
    expected = sum(positive) / 3 + sum(negative) / 3  # duplicates counted; every proxy in the negative mean
    assert proxy_anchor_loss(embeddings, labels, proxies).item() == pytest.approx(expected, rel=1e-5)
    loss = AntiCollapseLoss(3, 2)
    with torch.no_grad():
        loss.proxies.copy_(proxies)
    total, alignment, rate = loss(embeddings, labels)
    batch_rate = coding_rate(F.normalize(proxies[[0, 1]], dim=1).T)  # the batch's classes 0 and 1 only
    assert rate.item() == pytest.approx(batch_rate.item(), rel=1e-6)
    assert total.item() == pytest.approx(0.0035 * alignment.item() + math.exp(-batch_rate.item()), rel=1e-6)
    total.backward()
    assert loss.proxies.grad[2].abs().sum() > 0 and loss.proxies.grad[0].abs().sum() > 0


def test_sample_weights_average_the_weighted_per_sample_losses():
    """DMU's weighted influence loss: with weights w the sharded softmax returns Σ w_i·L_i / B;
    uniform weights give the plain mean, a one-hot weight picks one sample's loss over B."""
    from lightning_modules.distributed.model_parallel_softmax import ModelParallelSoftmax
    from lightning_modules.nn.margins import CombinedMarginHead

    torch.manual_seed(0)
    softmax = ModelParallelSoftmax(7, 5, CombinedMarginHead(s=16.0, m2=0.3)).double()
    embeddings, labels = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 3, 3, 6])
    plain = softmax(embeddings, labels)
    assert softmax(embeddings, labels, sample_weights=torch.ones(4)).item() == pytest.approx(plain.item())
    per_sample = torch.stack([4 * softmax(embeddings, labels, sample_weights=torch.eye(4)[i]) for i in range(4)])
    assert per_sample.mean().item() == pytest.approx(plain.item())
    weights = torch.tensor([0.0, 0.5, 1.0, 0.25])
    weighted = softmax(embeddings, labels, sample_weights=weights)
    assert weighted.item() == pytest.approx(float((weights.double() * per_sample).sum() / 4))


def test_bct_ract_is_one_softmax_over_the_old_classes_and_the_new_ones_but_the_own():
    """RACT's ``bct_ract`` from the two sharded heads' terms against the authors' form written
    out: CE over [old logits (target with the margin), new logits with the own class at -1e9],
    the target the own old class; and its gradient reaches the new centres through the
    negatives."""
    from lightning_modules.distributed.model_parallel_softmax import ModelParallelSoftmax
    from lightning_modules.nn.margins import CombinedMarginHead, margin_cos
    from lightning_modules.retrieval.ract import bct_ract_loss

    torch.manual_seed(0)
    head = CombinedMarginHead(s=16.0, m2=0.3)
    old, new = (ModelParallelSoftmax(6, 5, head).double() for _ in range(2))
    old.weight.data, new.weight.data = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    embeddings, labels = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 2, 2, 5])
    loss = bct_ract_loss(old, embeddings, labels, new.logit_terms(embeddings, labels)[1])

    features = F.normalize(embeddings, dim=1)
    old_logits = 16.0 * features @ F.normalize(old.weight, dim=1).T
    target = labels[:, None]
    old_logits = old_logits.scatter(1, target, 16.0 * margin_cos(old_logits.gather(1, target) / 16.0, 1.0, 0.3, 0.0))
    new_logits = (16.0 * features @ F.normalize(new.weight, dim=1).T).scatter(1, target, -1e9)
    expected = F.cross_entropy(torch.cat([old_logits, new_logits], dim=1), labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    loss.backward()
    assert new.weight.grad.abs().sum() > 0 and old.weight.grad.abs().sum() > 0


def test_the_forward_transformation_starts_as_the_identity():
    features = F.normalize(torch.randn(6, 8), dim=1)
    torch.testing.assert_close(ResidualTransformation(8, 16, 2).train()(features), features)
