"""FairMOT (card 6a): the focal loss at a single positive, the centre targets and their decoding
back to the boxes, the neck's shapes with and without deformable convolutions, the embedding
scale, the uncertainty weighting, and the classifier rebuilt from a checkpoint's shape."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.mot.fairmot import FairMOT
from lightning_modules.nn.centernet import DLASeg, center_targets, decode_centers, focal_loss, gaussian_radius


def test_focal_loss_at_a_single_positive_is_its_log_term():
    """One positive cell with p = 0.3 and negatives far from any centre (target 0) at p = 1e-4
    (the clamp): the loss is −(1 − p)² log p − Σ p² log(1 − p) over the negatives."""
    p = 0.3
    logits = torch.full((1, 1, 4, 4), -30.0)
    logits[0, 0, 1, 2] = math.log(p / (1 - p))
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 1, 2] = 1.0
    expected = -(1 - p) ** 2 * math.log(p) - 15 * (1e-4 ** 2) * math.log(1 - 1e-4)
    assert focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    assert focal_loss(torch.full((1, 1, 4, 4), -30.0), torch.zeros(1, 1, 4, 4)).item() >= 0  # no object: negatives only


def test_centre_targets_decode_back_to_the_boxes():
    boxes = torch.tensor([[8.0, 12.0, 28.0, 60.0], [60.0, 20.0, 84.0, 80.0]])
    size = (24, 32)
    target = center_targets(boxes, stride=4, size=size)
    heatmap = target["heatmap"]
    assert heatmap.shape == (1, 24, 32) and int((heatmap == 1).sum()) == 2
    assert gaussian_radius(12, 5) > 0
    # perfect head outputs: heatmap logits peaked at the centres, distances and offsets at them
    logits = torch.where(heatmap == 1, torch.tensor(10.0), torch.tensor(-10.0))
    ltrb, offset = torch.zeros(4, *size), torch.zeros(2, *size)
    ltrb.flatten(1)[:, target["index"]] = target["ltrb"].T
    offset.flatten(1)[:, target["index"]] = target["offset"].T
    scores, decoded, _ = decode_centers(logits, ltrb, offset, top_k=2)
    assert (scores > 0.99).all()
    found = sorted((decoded * 4).tolist())
    torch.testing.assert_close(torch.tensor(found), boxes, atol=1e-4, rtol=0)


@pytest.mark.parametrize("deformable", [True, False])
def test_the_neck_merges_to_stride_four(deformable):
    neck = DLASeg("dla46_c", pretrained=False, deformable=deformable)
    assert neck(torch.randn(1, 3, 64, 96)).shape == (1, 64, 16, 24)
    assert any(name.endswith("offset_mask.weight") for name, _ in neck.named_parameters()) == deformable


def test_embedding_scale_and_uncertainty_weighting():
    model = FairMOT(backbone="dla46_c", pretrained=False, deformable=False, head_channels=16, embedding_dim=8, num_ids=50)
    assert model.embedding_scale == pytest.approx(math.sqrt(2) * math.log(49))
    images = torch.randn(2, 3, 64, 96)
    boxes = [torch.tensor([[8.0, 8.0, 20.0, 40.0]]), torch.tensor([[40.0, 10.0, 56.0, 50.0], [70.0, 8.0, 86.0, 48.0]])]
    ids = [torch.tensor([3]), torch.tensor([7, 11])]
    losses = model.losses(model(images), boxes, ids)
    s_det, s_id = -1.85, -1.05
    detection = losses["heatmap"] + 0.1 * losses["box"] + losses["offset"]
    expected = 0.5 * (math.exp(-s_det) * detection + math.exp(-s_id) * losses["identity"] + s_det + s_id)
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["identity"].item() > 0 and losses["box"].item() > 0 and losses["offset"].item() > 0
    losses["loss"].backward()
    assert model.identity_uncertainty.grad is not None and model.classifier.weight.grad.abs().sum() > 0
    empty = model.losses(model(images), [torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2)
    assert torch.isfinite(empty["loss"])


def test_the_classifier_takes_the_checkpoint_shape():
    model = FairMOT(backbone="dla46_c", pretrained=False, deformable=False, head_channels=16, embedding_dim=8, num_ids=10)
    state = {"state_dict": {"classifier.weight": torch.zeros(30, 8), "classifier.bias": torch.zeros(30)}}
    model.on_load_checkpoint(state)
    assert model.classifier.out_features == 30 and model.embedding_scale == pytest.approx(math.sqrt(2) * math.log(29))
