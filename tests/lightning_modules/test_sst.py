"""Semi-Siamese Training: identity-pair sampling, the queue loss (targets are queue slots, false
negatives left out), the gallery's momentum update, and shuffle-BN across 2 gloo ranks."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from datamodules.ms1m import IdentityPairDataset
from datamodules.resumable import AugmentationRNG
from lightning_modules.cli import VisionZooCLI
from lightning_modules.distributed.shuffle_bn import shuffled_batchnorm_forward
from lightning_modules.face.sst import SemiSiameseTraining
from lightning_modules.nn.momentum import momentum_encoder_mode
from lightning_modules.nn.margins import CombinedMarginHead

from conftest import CONFIGS
from runner import free_port, metrics


class _NumberedImages(AugmentationRNG, Dataset):
    """Image i is the tensor [i]: a pair shows which images it was made of."""

    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.tensor([float(i)])}


def test_identity_pairs_are_two_different_images_of_one_identity():
    members = [[0, 1, 2], [3, 4], [5], [6]]
    pairs = IdentityPairDataset(_NumberedImages(), members)
    assert len(pairs) == 4
    seen = set()
    for _ in range(20):
        for identity, own in enumerate(members):
            item = pairs[identity]
            first, second = int(item["image"]), int(item["image2"])
            assert item["label"] == identity and first in own and second in own
            assert first != second or len(own) == 1  # one image: used twice
            seen.add((identity, first, second))
    assert len({s for s in seen if s[0] == 0}) > 2  # the pair is drawn at random


def test_identity_without_images_is_an_error():
    with pytest.raises(ValueError, match="1 identities have no image"):
        IdentityPairDataset(_NumberedImages(), [[0], []])


def _model(**options) -> SemiSiameseTraining:
    defaults = dict(num_classes=10, backbone="test_resnet", embedding_size=8, queue_size=8)
    return SemiSiameseTraining(**{**defaults, **options})


def test_queue_loss_targets_the_batch_slots_and_leaves_out_false_negatives():
    torch.manual_seed(0)
    model = _model(head=CombinedMarginHead(s=10.0, m1=1.0, m2=0.0, m3=0.3))  # CosFace margin
    model.queue_identity.copy_(torch.tensor([5, 1, -1, 2, 5, -1, 1, -1]))
    probe = F.normalize(torch.randn(2, 8), dim=1)
    gallery = F.normalize(torch.randn(2, 8), dim=1)
    identity = torch.tensor([5, 2])
    slots = torch.tensor([2, 3])  # the batch's slots (slot 3 held identity 2 before)

    loss = model._queue_loss(probe, gallery, slots, slots, identity, identity)

    prototypes = model.queue.clone()
    prototypes[slots] = gallery
    expected = []
    for i, (target, keep) in enumerate([(2, [1, 2, 3, 5, 6, 7]), (3, list(range(8)))]):
        cos = probe[i] @ prototypes.T
        logits = 10.0 * cos
        logits[target] -= 10.0 * 0.3
        # identity 5 (sample 0) also sits in slots 0 and 4: left out; identity 2 is only in its target slot
        kept = torch.tensor(keep)
        expected.append(-(logits[target] - torch.logsumexp(logits[kept], 0)))
    torch.testing.assert_close(loss, torch.stack(expected).mean())


def test_the_official_loss_sums_both_terms_and_faceX_zoo_halves_it():
    batch = {"image": torch.randn(4, 3, 112, 112), "image2": torch.randn(4, 3, 112, 112), "label": torch.arange(4)}
    losses = {}
    for terms in ("sum", "mean"):
        torch.manual_seed(0)
        losses[terms] = _model(loss_terms=terms).training_step(batch, 0)
    torch.testing.assert_close(losses["sum"], 2 * losses["mean"])
    with pytest.raises(ValueError, match="loss_terms"):
        _model(loss_terms="max")


def test_enqueue_writes_the_slots_and_moves_the_pointer():
    model = _model()
    prototypes = F.normalize(torch.randn(4, 8), dim=1)
    slots = model._batch_slots(4)
    model._enqueue(prototypes, slots, torch.tensor([7, 8, 9, 0]))
    model._enqueue(prototypes, model._batch_slots(4), torch.tensor([1, 2, 3, 4]))
    torch.testing.assert_close(model.queue, torch.cat([prototypes, prototypes]))
    assert model.queue_identity.tolist() == [7, 8, 9, 0, 1, 2, 3, 4] and int(model.queue_pointer) == 0
    with pytest.raises(ValueError, match="multiple of the global batch"):
        model._batch_slots(3)


def test_gallery_follows_the_probe_by_momentum_and_keeps_batchnorm_training():
    model = _model(gallery_momentum=0.9)
    before = [p.clone() for p in model.gallery.parameters()]
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    model.after_optimizer_step()
    for old, new, probe in zip(before, model.gallery.parameters(), model.backbone.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * probe)
    assert not any(p.requires_grad for p in model.gallery.parameters())
    momentum_encoder_mode(model.gallery)
    modes = {type(m).__name__: m.training for m in model.gallery.modules() if not list(m.children())}
    assert modes["BatchNorm2d"] and not modes.get("Dropout", False)


def _shuffle_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        per_sample = nn.Linear(3, 2)
        batchnorm = nn.BatchNorm1d(3)
        images = torch.randn(world_size * 4, 3)
        mine = images[rank * 4 : (rank + 1) * 4]
        generator = torch.Generator().manual_seed(1)
        shuffled = shuffled_batchnorm_forward(per_sample, mine, generator)
        normalised = shuffled_batchnorm_forward(batchnorm, mine, generator)
        torch.save({"shuffled": shuffled, "direct": per_sample(mine), "normalised": normalised,
                    "local_bn": batchnorm(mine)}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_shuffle_bn_returns_each_rank_its_own_samples_normalised_with_other_ranks(tmp_path):
    mp.spawn(_shuffle_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["shuffled"], result["direct"])  # un-permuted back in place
        assert not torch.allclose(result["normalised"], result["local_bn"])  # statistics of a mixed batch


@pytest.mark.slow
def test_sst_learns_the_mini_set(mini_ms1m, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = VisionZooCLI(args=[
        "fit", "--config", str(CONFIGS / "ms1m/sst_r50.yaml"), "--config", str(CONFIGS / "ms1m/mini.yaml"),
        "--config", str(CONFIGS / "trainer/cpu.yaml"), "--data.init_args.root", str(mini_ms1m),
        "--trainer.max_epochs", "40", "--trainer.check_val_every_n_epoch", "40",  # 80 steps of 32 identities
        # The mini preset's warm-up is 2 steps; the measured 0.68 was with the first at half the
        # rate (from 0, arcface_torch's rule: 0.60). A queue filled by the first steps matters here.
        "--model.init_args.optim.warmup_start_factor", "0.5",
    ])
    accuracy = [float(r["val/acc"]) for r in metrics(Path(cli.trainer.default_root_dir)) if r.get("val/acc")]
    assert accuracy[-1] > 0.62, accuracy  # chance is 0.5 (unseen identities); measured 0.68
