"""SeCo: the sampler's frame choice (query in one half, two sorted frames of the other half, the
order label), the images it returns, InfoNCE and the 2-way loss on hand-worked cases, the logits
shapes, the queue's pointer arithmetic, the key encoder's momentum update, MoCo-checkpoint
initialisation, the queue on 2 gloo ranks, and the paper config training a few steps on the mini
UCF101 set."""

from __future__ import annotations

import functools
import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from datamodules.clips import IMAGENET_MEAN, IMAGENET_STD, ColorAugment
from datamodules.formats.video import VideoReader
from datamodules.mini.ucf101 import write_avi
from datamodules.pretext.seco import SeCoFrames
from datamodules.clips import ClipSpec, VideoRecord
from datamodules.ucf101 import UCF101DataModule
from lightning_modules.cli import VisionZooCLI
from lightning_modules.nn.contrastive import (
    FeatureQueue, ProjectionHead, info_nce_logits, info_nce_loss, positive_top1, two_way_logits,
)
from lightning_modules.nn.video_encoder import VideoEncoder
from lightning_modules.video_ssl.seco import SeCo

from conftest import CONFIGS
from runner import free_port, metrics

TINY = {"backbone": "test_resnet", "pretrained": False, "queue_size": 10}


def _model(**overrides) -> SeCo:
    torch.manual_seed(0)
    return SeCo(**{**TINY, **overrides})


def _batch(batch_size: int = 4, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = {name: torch.randn(batch_size, 3, size, size, generator=generator)
              for name in ("query", "positive", "other_early", "other_late")}
    return {**images, "order_label": torch.randint(2, (batch_size,), generator=generator)}


# ----------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("length", [2, 3, 5, 30, 31])
def test_frame_choice_puts_both_other_frames_in_the_opposite_half_sorted(length):
    generator = torch.Generator().manual_seed(length)
    half = length // 2
    labels, queries = set(), set()
    for _ in range(300):
        query, early, late, label = SeCoFrames.frame_choice(length, generator)
        query_half = 0 if query < half else 1
        assert label == query_half  # 0: the query comes first
        for other in (early, late):
            assert 0 <= other < length and (0 if other < half else 1) == 1 - query_half
        assert early <= late
        labels.add(label)
        queries.add(query)
    assert labels == {0, 1} and queries == set(range(length))  # every frame can be the query


def test_frame_choice_needs_two_frames():
    with pytest.raises(ValueError, match="at least 2 frames"):
        SeCoFrames.frame_choice(1, torch.Generator())


def test_sampler_returns_four_augmented_views_of_the_chosen_frames(tmp_path):
    """Frame t of the video is uniformly grey at 8·t; with the colour augmentation off each
    view's brightness names the frame it was cut from."""
    path = tmp_path / "numbered.avi"
    write_avi(path, np.stack([np.full((48, 64, 3), 8 * t, np.uint8) for t in range(30)]))
    video = VideoReader(path)
    spec = ClipSpec(num_frames=1, frame_stride=1, image_size=24, resize=40)
    plain = SeCoFrames(color=ColorAugment(p_jitter=0.0, p_gray=0.0, p_blur=0.0))
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        sample = plain(video, VideoRecord(path, 0, path.name, path.parent), spec, generator)
        query, early, late = sample["frame_index"].tolist()
        assert sample["order_label"] == int(query >= 15) and early <= late
        brightness = {}
        for name in ("query", "positive", "other_early", "other_late"):
            assert sample[name].shape == (3, 24, 24) and sample[name].dtype == torch.float32
            pixels = sample[name] * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
            brightness[name] = float(pixels.mean()) * 255 / 8
        np.testing.assert_allclose([brightness[n] for n in ("query", "positive", "other_early", "other_late")],
                                   [query, query, early, late], atol=0.6)
    augmented = SeCoFrames()(video, VideoRecord(path, 0, path.name, path.parent), spec, torch.Generator().manual_seed(1))
    assert not torch.equal(augmented["query"], augmented["positive"])  # two augmentations of one frame


def test_datamodule_batches_seco_samples(mini_ucf101):
    datamodule = UCF101DataModule(str(mini_ucf101), image_size=32, resize=40, batch_size=4, num_workers=0,
                                  train_sampler=SeCoFrames())
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    for name in ("query", "positive", "other_early", "other_late"):
        assert batch[name].shape == (4, 3, 32, 32)
    assert batch["order_label"].shape == (4,) and batch["frame_index"].shape == (4, 3)


# ----------------------------------------------------------------------------- losses and queue


def test_info_nce_on_a_hand_worked_case():
    query = torch.tensor([[1.0, 0.0]])
    positive = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits = info_nce_logits(query, positive, queue, temperature=0.5)
    torch.testing.assert_close(logits, torch.tensor([[1.2, 2.0, 0.0]]))
    expected = -1.2 + math.log(math.exp(1.2) + math.exp(2.0) + 1.0)  # = 1.260373
    assert abs(float(info_nce_loss(logits)) - expected) < 1e-6 and abs(expected - 1.260373) < 1e-6
    assert float(positive_top1(logits)) == 0.0  # the first queue entry is closer than the positive


def test_two_way_loss_on_a_hand_worked_case():
    query = torch.tensor([[1.0, 0.0]])
    same_frame = torch.tensor([[0.6, 0.8]])
    others = (torch.tensor([[0.0, 1.0]]), torch.tensor([[-1.0, 0.0]]))
    logits = two_way_logits(query, same_frame, others, temperature=0.5)
    torch.testing.assert_close(logits, torch.tensor([[1.2, 0.0], [1.2, -2.0]]))
    expected = (math.log(1 + math.exp(-1.2)) + math.log(1 + math.exp(-3.2))) / 2
    assert abs(float(info_nce_loss(logits)) - expected) < 1e-6


def test_projection_head_is_moco_v2_mlp_with_unit_outputs():
    head = ProjectionHead(16, 8)
    assert [type(m) for m in head.fc] == [nn.Linear, nn.ReLU, nn.Linear] and head.fc[0].out_features == 16
    torch.testing.assert_close(head(torch.randn(5, 16)).norm(dim=1), torch.ones(5))
    assert len(ProjectionHead(16, 8, mlp=False).fc) == 1


def test_queue_pointer_wraps_with_3b_insertions():
    queue = FeatureQueue(10, 2)
    for step in range(1, 5):  # 3B = 3 keys per step (B = 1): pointer 3, 6, 9, then 2 after wrapping
        queue.enqueue(torch.full((3, 2), float(step)))
        assert int(queue.pointer) == (3 * step) % 10
    assert queue.queue[[9, 0, 1], 0].tolist() == [4.0, 4.0, 4.0] and queue.queue[2, 0] == 1.0
    keys = torch.arange(12.0)[:, None].repeat(1, 2)  # 3B = 12 > K: key i lands in slot (2 + i) % 10
    queue.enqueue(keys)
    assert int(queue.pointer) == 4
    assert queue.queue[:, 0].tolist() == [8.0, 9.0, 10.0, 11.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]


def test_queue_start_is_about_unit_norm_and_negatives_are_a_copy():
    queue = FeatureQueue(4096, 128, torch.Generator().manual_seed(0))
    assert abs(float(queue.queue.norm(dim=1).mean()) - 1.0) < 0.02
    negatives = queue.negatives()
    queue.enqueue(torch.zeros(2, 128))
    assert negatives[0].abs().sum() > 0 and queue.queue[0].abs().sum() == 0


# ----------------------------------------------------------------------------- the module


def test_logits_shapes_and_the_step_enqueues_all_three_keys():
    model = _model()
    batch = _batch(batch_size=4)
    q_inter, q_intra, q_order = model.query_features(batch["query"])
    keys = [model.key_features(batch[name]) for name in ("positive", "other_early", "other_late")]
    inter = model.inter_logits(q_inter, tuple(k[0] for k in keys), model.queue.negatives())
    intra = model.intra_logits(q_intra, keys[0][1], (keys[1][1], keys[2][1]))
    assert inter.shape == (12, 1 + 10) and intra.shape == (8, 2)
    assert model.order_logits(q_order, keys[1][2], keys[2][2]).shape == (4, 2)
    # inter: row block j holds q against key j (frames of the same video are positives)
    for j, key in enumerate(keys):
        torch.testing.assert_close(inter[4 * j : 4 * j + 4, 0], (q_inter * key[0]).sum(1) / 0.1)
    torch.testing.assert_close(intra[4:, 0], intra[:4, 0])  # q·k1 against k2 then against k3
    torch.testing.assert_close(intra[4:, 1], (q_intra * keys[2][1]).sum(1) / 0.1)

    # one step writes k1, k2, k3 (12 keys) into a queue of 10: the pointer wraps to 2
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss) and int(model.queue.pointer) == 2
    written = torch.cat([k[0] for k in keys])[2:]  # 12 keys from slot 0: keys 10, 11 overwrite slots 0, 1
    torch.testing.assert_close(model.queue.queue[2:], written[:8])
    torch.testing.assert_close(model.queue.queue[:2], written[8:])


def test_losses_train_the_query_side_only():
    model = _model()
    model.training_step(_batch(), 0).backward()
    assert all(p.grad is None for p in model.key_encoder.parameters())
    for name in ("backbone", "fc_inter", "fc_intra", "fc_order", "order_classifier"):
        assert all(p.grad is not None for p in getattr(model, name).parameters()), name


def test_key_encoder_follows_by_momentum_and_copies_at_alpha_0():
    model = _model(key_momentum=0.9)
    online = [p for name in ("backbone", "fc_inter", "fc_intra", "fc_order") for p in getattr(model, name).parameters()]
    assert all(torch.equal(k, o) for k, o in zip(model.key_encoder.parameters(), online, strict=True))  # starts as a copy
    with torch.no_grad():
        for p in online:
            p.add_(1.0)
    before = [p.clone() for p in model.key_encoder.parameters()]
    model.after_optimizer_step()
    for old, new, query in zip(before, model.key_encoder.parameters(), online, strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * query)
    with torch.no_grad():
        for p in online:
            p.mul_(-2.0)
    model.update_key_encoder(momentum=0.0)
    assert all(torch.equal(k, o) for k, o in zip(model.key_encoder.parameters(), online, strict=True))
    assert not any(p.requires_grad for p in model.key_encoder.parameters())
    model.key_features(_batch()["positive"])
    modes = {type(m).__name__: m.training for m in model.key_encoder.modules() if not list(m.children())}
    assert modes["BatchNorm2d"] and not modes["Linear"]


def test_moco_checkpoint_initialises_backbone_and_all_three_heads(tmp_path):
    torch.manual_seed(1)
    encoder = timm.create_model("test_resnet", num_classes=0)
    mlp = nn.Sequential(nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 128))
    state = {f"module.encoder_q.{k}": v for k, v in encoder.state_dict().items()}
    state |= {f"module.encoder_q.fc.{k}": v for k, v in mlp.state_dict().items()}
    state |= {f"module.encoder_k.{k}": v + 1 for k, v in encoder.state_dict().items()} | {"module.queue": torch.randn(128, 8)}
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state}, tmp_path / "moco_v2.pth.tar")
    model = _model(weights=str(tmp_path / "moco_v2.pth.tar"))
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(model.backbone.network.state_dict()[name], value)
        torch.testing.assert_close(model.key_encoder["backbone"].network.state_dict()[name], value)
    for head in ("fc_inter", "fc_intra", "fc_order"):
        torch.testing.assert_close(getattr(model, head).fc[2].weight, mlp[2].weight)
        torch.testing.assert_close(model.key_encoder[head].fc[0].bias, mlp[0].bias)


def test_backbone_encodes_clips_by_averaging_frames():
    model = _model()
    model.eval()
    clip = torch.randn(2, 3, 4, 32, 32)
    frames = clip.transpose(1, 2).reshape(8, 3, 32, 32)
    torch.testing.assert_close(model(clip), model.backbone.forward_frames(frames).view(2, 4, -1).mean(1))


def test_lr_scales_with_the_global_batch_and_warms_up_from_a_hundredth():
    from lightning_modules.nn.schedules import lr_factor

    factor = functools.partial(lr_factor, schedule="cosine", warmup_steps=10, total_steps=110, start_factor=0.01, end_factor=1e-6 / 0.2)
    assert factor(0) == pytest.approx(0.01) and factor(5) == pytest.approx(0.505) and factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx((1e-6 + (0.2 - 1e-6) * 0.5) / 0.2) and factor(110) == pytest.approx(1e-6 / 0.2)


# ----------------------------------------------------------------------------- two ranks


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        model = _model(queue_size=32)  # same weights and queue on both ranks (same seeds)
        batch = _batch(batch_size=4, seed=10 + rank)
        shuffle_state = model._shared_generator.get_state()
        keys = [model.key_features(batch[name])[0] for name in ("positive", "other_early", "other_late")]
        model._shared_generator.set_state(shuffle_state)  # the step draws the same permutations
        model.training_step(batch, 0)
        torch.save({"queue": model.queue.queue, "pointer": model.queue.pointer, "keys": keys},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_enqueue_the_keys_of_both_in_the_same_order(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert int(ranks[0]["pointer"]) == int(ranks[1]["pointer"]) == 24  # 3 keys x 4 samples x 2 ranks
    torch.testing.assert_close(ranks[0]["queue"], ranks[1]["queue"])
    # rows: k1 of rank 0, k1 of rank 1, k2 of rank 0, k2 of rank 1, k3 of rank 0, k3 of rank 1
    expected = torch.cat([ranks[r]["keys"][j] for j in range(3) for r in range(2)])
    torch.testing.assert_close(ranks[0]["queue"][:24], expected)
    assert not torch.allclose(ranks[0]["keys"][0], ranks[1]["keys"][0])
    torch.testing.assert_close(ranks[0]["queue"][24:], _model(queue_size=32).queue.queue[24:])  # untouched


# ----------------------------------------------------------------------------- the config


def test_config_trains_a_few_steps_on_the_mini_set_and_says_which_start_it_uses(mini_ucf101, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO", logger="lightning.pytorch.utilities.rank_zero")
    cli = VisionZooCLI(args=[
        "fit", "--config", str(CONFIGS / "ucf101/seco.yaml"), "--config", str(CONFIGS / "ucf101/mini.yaml"),
        "--config", str(CONFIGS / "trainer/cpu.yaml"), "--data.init_args.root", str(mini_ucf101),
        "--model.init_args.backbone", "test_resnet", "--model.init_args.pretrained", "false",
        "--model.init_args.queue_size", "64", "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "1",
    ])
    run = Path(cli.trainer.default_root_dir)
    assert run == Path("runs/ucf101/seco/split1")
    assert "SeCo starts from random weights (not the paper's MoCo-v2 start); for the paper's start give " \
           "--model.init_args.weights" in caplog.text
    rows = [r for r in metrics(run) if r.get("train/loss")]
    assert len(rows) == 6
    for term in ("train/loss", "train/loss_inter", "train/loss_intra", "train/loss_order", "train/inter_top1"):
        assert all(math.isfinite(float(r[term])) for r in rows), term
    first = rows[0]  # L = L_inter + L_intra + L_order, weights 1
    total = sum(float(first[f"train/loss_{t}"]) for t in ("inter", "intra", "order"))
    assert float(first["train/loss"]) == pytest.approx(total, rel=1e-5)
    state = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert int(state["queue.pointer"]) == (6 * 3 * 8) % 64  # 3 keys per sample, batch 8, 6 steps
    encoder = VideoEncoder("test_resnet")  # what the evaluation protocols load: backbone.*
    encoder.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    assert encoder(torch.randn(2, 3, 4, 32, 32)).shape == (2, 96)
