"""HCPN and HGPU (cards 3-4): the co-attention's shapes and normalisations, the soft attention
summing to one, the gated context as the identity at initialisation, the attentional fusion of a
feature with itself, the hard-negative weights and the weighted BCE against hand-worked cases,
the contour targets, the unshared branches, HGPU's frame-frame third node, the pair inference
order, the dense CRF, and on the mini DAVIS 2016 with its flow a J&F well above the
all-foreground and centre-prior references for each method."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamodules.davis_zero_shot import hard_negatives
from lightning_modules.nn.co_attention import (AttentionalFusion, CoAttention, GatedContext, HGPUNetwork,
                                               hard_negative_bce, mask_contour)
from lightning_modules.nn.dense_crf import dense_crf
from lightning_modules.vos.hcpn import HCPN
from lightning_modules.vos.hgpu import HGPU

TINY = {"backbone": "test_resnet", "pretrained": False, "decoder_width": 16, "side_width": 8}


def test_co_attention_keeps_shapes_and_normalises_and_its_soft_attention_sums_to_one():
    torch.manual_seed(0)
    attention = CoAttention(32, stacks=5)
    a, b = torch.randn(2, 32, 4, 6), torch.randn(2, 32, 4, 6)
    assert attention.affinity(a, b).shape == (2, 24, 24)
    a_hat, b_hat, a_soft, b_soft = attention(a, b)
    assert a_hat.shape == a.shape and b_hat.shape == b.shape and a_soft.shape == a.shape
    torch.testing.assert_close(a_hat.norm(dim=1), torch.ones(2, 4, 6))
    weights = attention.map_a(a).flatten(2).softmax(-1)
    torch.testing.assert_close(CoAttention.soft_attention(a, attention.map_a), weights.view(2, 1, 4, 6) * a)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 1))
    one = CoAttention(32, stacks=1)
    assert sum(p.numel() for p in one.parameters()) == sum(p.numel() for p in attention.parameters())


def test_one_stack_is_soft_attention_then_co_attention_by_hand():
    torch.manual_seed(1)
    attention = CoAttention(16, stacks=1)
    a, b = torch.randn(1, 16, 3, 3), torch.randn(1, 16, 3, 3)
    sa = a * attention.map_a(a).flatten(2).softmax(-1).view(1, 1, 3, 3)
    sb = b * attention.map_b(b).flatten(2).softmax(-1).view(1, 1, 3, 3)
    affinity = torch.tanh(attention.project_b(sb).flatten(2)[0].T @ attention.project_a(sa).flatten(2)[0])  # [HW_b, HW_a]
    expected_a = F.normalize((sa.flatten(2)[0] @ affinity.T).view(1, 16, 3, 3), dim=1)
    expected_b = F.normalize((sb.flatten(2)[0] @ affinity).view(1, 16, 3, 3), dim=1)
    a_hat, b_hat, _, _ = attention(a, b)
    torch.testing.assert_close(a_hat, expected_a)
    torch.testing.assert_close(b_hat, expected_b)


def test_gated_context_is_the_identity_at_init_and_fusing_a_feature_with_itself_returns_it():
    x = torch.randn(2, 12, 5, 5)
    torch.testing.assert_close(GatedContext(12)(x), x)
    fusion = AttentionalFusion(12).train()
    torch.testing.assert_close(fusion(x, x), x)
    y = torch.randn(2, 12, 5, 5)
    out = fusion(x, y)
    low, high = torch.minimum(x, y), torch.maximum(x, y)
    assert ((out >= low - 1e-6) & (out <= high + 1e-6)).all()  # a per-element convex combination


def test_hard_negatives_weigh_background_far_from_the_object_and_without_edges():
    mask = np.zeros((40, 40), np.uint8)
    mask[15:25, 15:25] = 1
    edges = np.zeros((40, 40), np.uint8)
    edges[:, 35:] = 255  # strong edges on the right
    n = hard_negatives(mask, edges)
    weight = 1 + n
    assert (weight >= 1).all() and (weight[mask == 1] == 1).all()
    assert n[2, 2] == pytest.approx(1.0)  # no edge, far from the object
    assert n[20, 38] == 0  # on the edges (the 5x5 dilation reaches 2 pixels: column 33 is weighted)
    assert n[20, 12] == 0 and n[20, 8] == pytest.approx(1.0)  # within 5 (+2) pixels of the object: 0


def test_weighted_bce_by_hand_and_uniform_weights_are_plain_bce():
    p = torch.tensor([[[[0.9, 0.2], [0.4, 0.7]]]])
    target = torch.tensor([[[1, 0], [255, 0]]])
    hard = torch.tensor([[[0.0, 0.5], [0.0, 1.0]]])
    terms = [-np.log(0.9) * 1.0, -np.log(0.8) * 1.5, 0.0, -np.log(0.3) * 2.0]
    assert hard_negative_bce(p, target, hard).item() == pytest.approx(sum(terms) / 4, rel=1e-5)
    target = torch.tensor([[[1, 0], [1, 0]]])
    torch.testing.assert_close(hard_negative_bce(p, target, torch.zeros(1, 2, 2)), F.binary_cross_entropy(p[:, 0], target.float()))


def test_the_contour_target_is_the_two_pixel_band_across_the_boundary():
    mask = torch.zeros(1, 10, 10, dtype=torch.long)
    mask[0, 3:7, 3:7] = 1
    contour = mask_contour(mask)[0]
    expected = torch.zeros(10, 10, dtype=torch.long)
    expected[2:8, 2:8] = 1
    expected[4:6, 4:6] = 0
    torch.testing.assert_close(contour, expected)


def test_the_branches_do_not_share_weights_and_hgpu_s_third_node_is_the_frame_pair(monkeypatch):
    network = HGPUNetwork("test_resnet", pretrained=False, stacks=1, decoder_width=16, side_width=8).eval()
    first = [next(stem.parameters()) for stem in network.encoder.stems]
    assert first[0] is not first[1] and first[0] is not first[2] and first[1] is not first[2]
    frames = [torch.randn(1, 3, 64, 64) for _ in range(3)]
    seen = []
    original = network.encoder.next_stage
    monkeypatch.setattr(network.encoder, "next_stage", lambda level, x: seen.append(x) or original(level, x))
    with torch.no_grad():
        network(*frames)
        h1, h2, _ = network.encoder.res2(frames)
        torch.testing.assert_close(seen[0][2], network.readout(0, h1, h2))  # res3 of branch 3 reads (I_t, I_t+1)


def test_each_frame_takes_the_first_mask_of_its_own_pair_and_the_last_the_second(monkeypatch):
    model = HGPU(**TINY, crf=False)
    calls = []

    def segment_pair(frame1, frame2, flow):
        calls.append((int(frame1[0, 0, 0]), int(frame2[0, 0, 0]), int(flow[0, 0, 0])))
        return np.full(frame1.shape[:2], 0.9), np.full(frame1.shape[:2], 0.1)

    monkeypatch.setattr(model, "segment_pair", segment_pair)
    frames = np.stack([np.full((4, 4, 3), t, np.uint8) for t in range(4)])

    class Item:
        pass

    item = Item()
    item.frames, item.flows = frames, frames + 10
    masks = [model.step_sequence(item, t, frames[t]) for t in range(4)]
    assert calls == [(0, 1, 10), (1, 2, 11), (2, 3, 12), (2, 3, 12)]
    assert [int(m.max()) for m in masks] == [1, 1, 1, 0]


def test_the_dense_crf_snaps_a_blurred_probability_to_the_object():
    frame = np.full((48, 64, 3), 40, np.uint8)
    frame[12:36, 16:48] = 220
    truth = (frame[..., 0] > 100).astype(np.uint8)
    probability = np.clip(F.avg_pool2d(torch.tensor(truth, dtype=torch.float32)[None, None], 15, 1, 7)[0, 0].numpy()
                          + np.random.default_rng(0).normal(0, 0.15, truth.shape), 0, 1)
    def iou(mask):
        return (mask & truth).sum() / (mask | truth).sum()
    assert iou(dense_crf(frame, probability)) > iou((probability > 0.5).astype(np.uint8)) + 0.02


def test_the_decoder_learns_at_the_full_rate_and_the_encoder_at_its_scale():
    model = HCPN(**TINY)
    groups = model.optimizer_parameter_groups()
    decoder = {id(p) for p in model.network.decoder.parameters()}
    for group in groups:
        assert all((id(p) in decoder) == ("lr_scale" not in group) for p in group["params"])
        assert group.get("lr_scale", 0.1) == 0.1
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["hcpn", "hgpu"])
def test_frame_pair_methods_segment_the_moving_objects_far_better_than_the_references(method, mini_davis, tmp_path, monkeypatch):
    """Each method from scratch on the mini DAVIS 2016 train pairs with their flow (15 epochs,
    about a minute), its val J&F with and without the dense CRF, and the all-foreground and
    centre-prior references, computed here. Measured: HCPN 0.88 (CRF-free 0.73), HGPU 0.83
    (0.83), against 0.51 and 0.24."""
    from lightning_modules.cli import VisionZooCLI

    from conftest import CONFIGS

    monkeypatch.chdir(tmp_path)
    args = ["--config", str(CONFIGS / f"davis/{method}.yaml"), "--config", str(CONFIGS / "davis/mini_frame_pairs.yaml"),
            "--config", str(CONFIGS / "trainer/cpu.yaml"), "--data.init_args.root", str(mini_davis),
            "--data.init_args.flow_root", str(mini_davis / "FlowImages/480p")]
    VisionZooCLI(args=["fit", *args, "--trainer.limit_val_batches", "0"])
    scores = {}

    def score(name: str) -> float:
        return json.loads(Path(f"runs/davis/{name}/2016_val_zero_shot/results.json").read_text())["metrics"]["J&F-Mean"]

    VisionZooCLI(args=["test", *args, "--ckpt_path", "last", "--model.init_args.crf", "false"])
    scores["crf_free"] = score(method)
    VisionZooCLI(args=["test", *args, "--ckpt_path", "last"])
    scores[method] = score(method)
    for reference, name in (("AllForeground", "all_foreground"), ("CentrePrior", "centre_prior")):
        VisionZooCLI(args=["test", *args, "--model", f"lightning_modules.vos.baselines.{reference}"])
        scores[name] = score(name)
    print(scores)
    best_reference = max(scores["all_foreground"], scores["centre_prior"])
    assert scores[method] >= best_reference + 0.2, scores
    assert scores["crf_free"] >= best_reference + 0.15, scores
    assert len(list(Path(f"runs/davis/{method}/2016_val_zero_shot/davis_results/val-00").glob("*.png"))) == 10
