"""CSTP: the overlap crop covers r_s of the crop area at every corner, the temporal offset shares
r_t of the frames, both clips share one pace, the heads take the sampler's labels, the BYOL loss,
the per-step EMA of the target, the schedule against the code's scheduler, and the UCF101 config
trains a few steps on the mini set."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning import Trainer
from torch.utils.data import DataLoader, Dataset

from datamodules.clips import clip_indices
from datamodules.pretext.cstp import (
    OVERLAP_RATES, PACES, STORClips, draw_overlap_crop, draw_pace_label, draw_temporal_pair, overlap_crop_box,
    temporal_offset,
)
from datamodules.clips import ClipSpec, VideoRecord
from lightning_modules.cli import VisionZooCLI
from lightning_modules.nn.byol import symmetric_byol_loss
from lightning_modules.nn.stor_heads import STORHeads
from lightning_modules.nn.schedules import lr_factor
from lightning_modules.video_ssl.cstp import CSTP

from conftest import CONFIGS
from runner import metrics


def _mask(box, height, width) -> np.ndarray:
    top, left, h, w = box
    mask = np.zeros((height + 2 * h, width + 2 * w), bool)  # room for boxes partly outside
    mask[top + h : top + 2 * h, left + w : left + 2 * w] = True
    return mask


def _measured_overlap(box1, box2) -> float:
    """Pixels of crop 1 inside crop 2, over the crop area (the code's rate, not IoU)."""
    height = max(box1[0], box2[0]) + box1[2]
    width = max(box1[1], box2[1]) + box1[3]
    return float((_mask(box1, height, width) & _mask(box2, height, width)).sum()) / (box1[2] * box1[3])


@pytest.mark.parametrize("corner", [0, 1, 2, 3], ids=["top_left", "top_right", "bottom_left", "bottom_right"])
def test_overlap_crop_covers_the_rate_of_the_crop_area(corner):
    generator = torch.Generator().manual_seed(corner)
    for box in [(40, 50, 60, 80), (30, 30, 37, 45), (50, 60, 64, 64)]:
        top, left, h, w = box
        for rate in OVERLAP_RATES:
            low = math.ceil(rate * w)
            for overlap_width in {low, w, int(torch.randint(low, w + 1, (), generator=generator))}:
                second = overlap_crop_box(box, rate, corner, overlap_width)
                assert second[2:] == (h, w)  # same size
                assert _measured_overlap(box, second) == pytest.approx(rate, abs=1 / h)
                up, leftward = corner in (0, 1), corner in (0, 2)
                assert (second[0] <= top) == up or second[0] == top
                assert (second[1] <= left) == leftward or second[1] == left


def test_drawn_overlap_crops_lie_in_the_frame_and_match_their_label():
    generator = torch.Generator().manual_seed(0)
    labels = set()
    for _ in range(200):
        box = (40, 50, 50, 60)  # in a 130 x 160 frame: room for every rate at every corner
        second, label = draw_overlap_crop(box, 130, 160, OVERLAP_RATES, generator)
        top, left, h, w = second
        assert 0 <= top and top + h <= 130 and 0 <= left and left + w <= 160
        assert _measured_overlap(box, second) == pytest.approx(OVERLAP_RATES[label], abs=1 / h)
        labels.add(label)
    assert labels == set(range(5))
    # A crop filling the frame can only be repeated: label 0.
    assert draw_overlap_crop((0, 0, 90, 120), 90, 120, OVERLAP_RATES, generator) == ((0, 0, 90, 120), 0)


@pytest.mark.parametrize("num_frames", [16, 8])
@pytest.mark.parametrize("pace", PACES)
def test_temporal_offset_shares_the_rate_of_the_frames(num_frames, pace):
    for rate in OVERLAP_RATES:
        offset = temporal_offset(rate, num_frames, pace)
        assert offset % pace == 0
        first = set(clip_indices(100, num_frames, pace, 10_000))
        for second_start in (100 + offset, 100 - offset):
            shared = len(first & set(clip_indices(second_start, num_frames, pace, 10_000))) / num_frames
            assert shared == pytest.approx(rate, abs=1 / num_frames)
    assert [temporal_offset(r, 16, 1) for r in OVERLAP_RATES] == [0, 3, 6, 9, 12]  # 13/16 … 4/16 shared


def test_temporal_pairs_lie_in_the_video_on_both_sides_and_short_videos_get_label_0():
    generator = torch.Generator().manual_seed(0)
    sides, labels = set(), set()
    for _ in range(300):
        start1, start2, label = draw_temporal_pair(120, 16, 2, OVERLAP_RATES, generator)
        assert 0 <= min(start1, start2) and max(start1, start2) + 30 < 120
        assert abs(start2 - start1) == temporal_offset(OVERLAP_RATES[label], 16, 2)
        sides.add(np.sign(start2 - start1))
        labels.add(label)
    assert sides == {-1, 0, 1} and labels == set(range(5))
    assert draw_temporal_pair(20, 16, 2, OVERLAP_RATES, generator) == (0, 0, 0)


def test_pace_is_capped_by_the_video_length():
    generator = torch.Generator().manual_seed(0)
    drawn = {draw_pace_label(40, 8, PACES, generator) for _ in range(100)}
    assert drawn == {0, 1, 2}  # 7·8 > 40
    assert {draw_pace_label(10, 8, PACES, generator) for _ in range(20)} == {0}


class _FakeVideo:
    """A video of random frames that remembers which frame indices were read."""

    def __init__(self, length: int) -> None:
        self.data = np.random.default_rng(0).integers(0, 256, (length, 72, 96, 3), dtype=np.uint8)
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.data)

    def frames(self, indices):
        self.read = list(indices)
        return self.data[self.read]


def test_sampler_gives_two_clips_with_one_pace_and_labels_true_to_the_frames():
    spec = ClipSpec(num_frames=8, frame_stride=3, image_size=32, resize=40)
    sampler = STORClips()
    generator = torch.Generator().manual_seed(0)
    record = VideoRecord(Path("UCF-101/c/v.avi"), 0, "c/v.avi", Path("."))
    paces = set()
    for _ in range(30):
        video = _FakeVideo(50)
        sample = sampler(video, record, spec, generator)
        assert sample["clip1"].shape == sample["clip2"].shape == (3, 8, 32, 32)
        assert sample["clip1"].dtype == torch.float32
        first, second = video.read[:8], video.read[8:]
        pace = PACES[sample["pace_label"]]
        assert set(np.diff(first)) == set(np.diff(second)) == {pace}  # one pace, not frame_stride
        shared = len(set(first) & set(second)) / 8
        assert shared == pytest.approx(OVERLAP_RATES[sample["temporal_label"]], abs=1 / 8)
        assert 0 <= sample["spatial_label"] < 5
        assert {sample["rotation_label1"], sample["rotation_label2"]} <= {0, 1, 2, 3}
        paces.add(pace)
    assert paces == {1, 2, 4}  # 7·8 > 50


def test_heads_accept_the_sampler_labels():
    heads = STORHeads(features=512)
    f1, f2 = torch.randn(6, 512), torch.randn(6, 512)
    logits = heads(f1, f2)
    assert logits["spatial"].shape == logits["temporal"].shape == (6, 5)
    assert all(logits[k].shape == (6, 5) for k in ("pace1", "pace2", "rotation1", "rotation2"))  # 5-way, as the code
    labels = {"spatial": [0, 1, 2, 3, 4, 0], "temporal": [4, 3, 2, 1, 0, 0], "pace1": [0, 1, 2, 3, 0, 1],
              "pace2": [0, 1, 2, 3, 0, 1], "rotation1": [3, 2, 1, 0, 0, 0], "rotation2": [0, 0, 1, 1, 2, 3]}
    losses = [F.cross_entropy(logits[k], torch.tensor(v)) for k, v in labels.items()]
    assert all(torch.isfinite(loss) for loss in losses)


def test_byol_loss_is_zero_for_identical_directions_and_eight_for_opposite():
    v = F.normalize(torch.randn(4, 16), dim=1)
    assert symmetric_byol_loss(v, v, v, v) == pytest.approx(torch.zeros(4), abs=1e-6)
    assert symmetric_byol_loss(3 * v, v, v, 2 * v) == pytest.approx(torch.zeros(4), abs=1e-6)  # scale-free
    assert symmetric_byol_loss(v, v, -v, -v) == pytest.approx(torch.full((4,), 8.0), abs=1e-5)


class _FakeSTORBatches(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        generator = torch.Generator().manual_seed(i)
        return {"clip1": torch.randn(3, 4, 32, 32, generator=generator), "clip2": torch.randn(3, 4, 32, 32, generator=generator),
                "spatial_label": i % 5, "temporal_label": (i + 1) % 5, "pace_label": i % 4,
                "rotation_label1": i % 4, "rotation_label2": (i + 2) % 4}


@pytest.mark.parametrize("accumulate_grad_batches", [1, 2])
def test_target_is_an_ema_of_the_online_network_updated_every_step(accumulate_grad_batches, tmp_path):
    """One optimizer step over 4 samples, in one batch or accumulated over two: one EMA update."""
    torch.manual_seed(0)
    model = CSTP(backbone="test_resnet", hidden_dim=64, projection_dim=32)  # a tiny timm net, averaged over frames
    with torch.no_grad():  # make the target differ from the online network
        for p in [*model.target_encoder.parameters(), *model.target_projector.parameters()]:
            p.add_(torch.randn_like(p))
    old = [p.clone() for p in [*model.target_encoder.parameters(), *model.target_projector.parameters()]]
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      accumulate_grad_batches=accumulate_grad_batches)
    trainer.fit(model, DataLoader(_FakeSTORBatches(), batch_size=4 // accumulate_grad_batches))
    online = [*model.backbone.parameters(), *model.projector.parameters()]
    target = [*model.target_encoder.parameters(), *model.target_projector.parameters()]
    assert not torch.equal(online[0], old[0])
    for t, o, before in zip(target, online, old, strict=True):
        torch.testing.assert_close(t, 0.996 * before + 0.004 * o)
    assert not any(p.requires_grad for p in target)


def test_target_starts_from_its_own_draw_as_the_code_or_a_copy_as_the_byol_paper():
    torch.manual_seed(0)
    independent = CSTP(backbone="r2plus1d_test", hidden_dim=64, projection_dim=32)
    pairs = list(zip([*independent.backbone.parameters(), *independent.projector.parameters()],
                     [*independent.target_encoder.parameters(), *independent.target_projector.parameters()], strict=True))
    assert all(o.shape == t.shape for o, t in pairs)
    assert all(not torch.equal(o, t) for o, t in pairs if o.dim() > 1)  # every weight its own draw
    copied = CSTP(backbone="r2plus1d_test", hidden_dim=64, projection_dim=32, target_init="copy")
    assert all(torch.equal(o, t) for o, t in zip(copied.backbone.parameters(), copied.target_encoder.parameters()))


def test_glorot_option_draws_every_weight_from_the_codes_bound():
    """U(−b, b), b = √(6 / (fan_in + fan_out)), the fans of a convolution counting its receptive
    field; BatchNorm's γ too (fan n/2 each way), so some start below 0."""
    torch.manual_seed(0)
    model = CSTP(backbone="r2plus1d_test", hidden_dim=64, projection_dim=32, weight_init="glorot")
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d))]
    assert layers
    for layer in layers:
        receptive = layer.weight[0][0].numel()
        bound = math.sqrt(6.0 / ((layer.weight.shape[0] + layer.weight.shape[1]) * receptive))
        assert bound * 0.8 < float(layer.weight.abs().max()) <= bound
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm3d))]
    assert norms and all(float(m.weight.abs().max()) <= math.sqrt(6.0 / (2 * (m.num_features // 2))) for m in norms)
    assert all((m.weight < 0).any() for m in norms if m.num_features >= 16)
    with pytest.raises(ValueError, match="glorot"):
        CSTP(backbone="r2plus1d_test", weight_init="glorot", pretrained=True)


def _code_scheduler_lr(epoch: int, n_epochs: int, max_lr: float, min_lr: float) -> float:
    """CosineAnnealingWarmupRestarts(first_cycle_steps=n_epochs, warmup_steps=0.5·n_epochs) at epoch
    ``epoch`` (from 0), one cycle (main_byol.py)."""
    warmup = 0.5 * n_epochs
    if epoch < warmup:
        return (max_lr - min_lr) * epoch / warmup + min_lr
    return min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * (epoch - warmup) / (n_epochs - warmup))) / 2


def test_schedule_is_the_codes_one_cycle_warmup_cosine_at_epoch_boundaries():
    n_epochs, steps_per_epoch, lr, min_lr = 300, 7, 0.03, 1e-5
    for epoch in [0, 1, 75, 149, 150, 151, 225, 299]:
        total = n_epochs * steps_per_epoch
        factor = lr_factor(epoch * steps_per_epoch, schedule="cosine", warmup_steps=0.5 * total, total_steps=total,
                           start_factor=min_lr / lr, end_factor=min_lr / lr)
        assert lr * factor == pytest.approx(_code_scheduler_lr(epoch, n_epochs, lr, min_lr), rel=1e-9)


def test_ucf101_config_trains_a_few_steps(mini_ucf101, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = VisionZooCLI(args=["fit", "--config", str(CONFIGS / "ucf101/cstp.yaml"), "--config", str(CONFIGS / "ucf101/mini.yaml"),
                             "--config", str(CONFIGS / "trainer/cpu.yaml"), "--data.init_args.root", str(mini_ucf101),
                             "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
                             # smaller than the mini preset's 8 x 64² clips, for a 2-core CPU
                             "--data.init_args.batch_size", "4", "--data.init_args.image_size", "32"])
    run = Path(cli.trainer.default_root_dir)
    assert run == Path("runs/ucf101/cstp/split1")
    rows = [r for r in metrics(run) if r.get("train/loss")]
    assert len(rows) == 3
    for name in ("loss", "loss_byol", "loss_spatial", "loss_temporal", "loss_pace", "loss_rotation",
                 "acc_spatial", "acc_temporal", "acc_pace", "acc_rotation"):
        assert all(math.isfinite(float(r[f"train/{name}"])) for r in rows), name
    assert cli.trainer.gradient_clip_val == 18
