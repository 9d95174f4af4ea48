"""UCF101 evaluation protocols: the linear probe freezes the backbone (weights and BatchNorm
statistics) and trains its linear layer, fine-tuning trains everything; pretraining checkpoints
load strictly; clip outputs gathered from 2 gloo ranks (DistributedSampler padding, skipped
batches) give the single-process metrics; the configs run; and a linear probe and retrieval of a
briefly pretrained CSTP backbone beat chance on the mini set."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import lightning
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from benchmarks import leaderboard
from benchmarks.metrics.video import ClipTop1, VideoTop1, clip_top1, video_top1
from datamodules.corrupt import collate_dropping_skipped
from lightning_modules.cli import VisionZooCLI
from lightning_modules.nn.video_encoder import VideoEncoder
from lightning_modules.base import Evaluation
from lightning_modules.recipe import OptimizerRecipe
from lightning_modules.video_ssl.evaluation import VideoClassifier, load_backbone

from conftest import CONFIGS
from runner import free_port, metrics

TINY_CLIPS = ["--data.init_args.num_frames", "4", "--data.init_args.image_size", "32", "--data.init_args.resize", "36"]


class _Clips(Dataset):
    """Random tiny clips with labels, as UCF101 training batches."""

    def __init__(self, n: int = 8, classes: int = 3) -> None:
        generator = torch.Generator().manual_seed(0)
        self.video = torch.randn(n, 3, 4, 16, 16, generator=generator)
        self.label = torch.arange(n) % classes

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict:
        return {"video": self.video[i], "label": self.label[i]}


def _fit_a_few_steps(model: VideoClassifier, steps: int = 3, accumulate_grad_batches: int = 1) -> None:
    trainer = lightning.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                accumulate_grad_batches=accumulate_grad_batches)
    trainer.fit(model, train_dataloaders=DataLoader(_Clips(), batch_size=4))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]


def test_linear_probe_freezes_the_backbone_and_its_batchnorm_and_trains_the_linear_layer():
    torch.manual_seed(0)
    model = VideoClassifier(num_classes=3, freeze_backbone=True, feature_batchnorm=True, dropout=0.0,
                            optim=OptimizerRecipe(lr=0.1))
    assert model.method_name == "linear_probe"
    backbone, head = _snapshot(model.backbone), _snapshot(model.head)
    _fit_a_few_steps(model)
    assert _changed(backbone, model.backbone) == []  # weights, running means/variances, batch counts
    assert set(_changed(head, model.head)) == {"0.running_mean", "0.running_var", "0.num_batches_tracked",
                                               "2.weight", "2.bias"}  # the feature BatchNorm, the linear layer
    trained = {id(p) for group in model.trainer.optimizers[0].param_groups for p in group["params"]}
    assert trained == {id(p) for p in model.head.parameters()}
    model.train()
    assert model.training and model.head.training and not any(m.training for m in model.backbone.modules())


def test_finetuning_trains_the_backbone():
    torch.manual_seed(0)
    model = VideoClassifier(num_classes=3, optim=OptimizerRecipe(lr=0.1))
    assert model.method_name == "finetune"
    backbone = _snapshot(model.backbone)
    _fit_a_few_steps(model)
    changed = _changed(backbone, model.backbone)
    assert "network.stem.0.weight" in changed and "network.stem.1.running_mean" in changed
    model.train()
    assert all(m.training for m in model.backbone.modules())


@pytest.mark.parametrize("lr_batch_size, expected", [(64, 0.1 * 8 / 64), (None, 0.1)])
def test_learning_rate_scales_linearly_with_the_global_batch(lr_batch_size, expected):
    """Batches of 4 accumulated twice: a global batch of 8."""
    model = VideoClassifier(num_classes=3, freeze_backbone=True, optim=OptimizerRecipe(lr=0.1, lr_batch_size=lr_batch_size))
    _fit_a_few_steps(model, steps=1, accumulate_grad_batches=2)
    assert model.trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(expected)


def test_a_non_positive_lr_batch_size_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="optim: lr_batch_size"):
        VideoClassifier(num_classes=3, optim=OptimizerRecipe(lr=0.1, lr_batch_size=0))


def _pretraining_checkpoint(path: Path, encoder: VideoEncoder, **extra: torch.Tensor) -> str:
    """A Lightning-style checkpoint of a pretraining method: backbone, a momentum copy, a head."""
    state = {f"backbone.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"target_encoder.{k}": torch.zeros_like(v) for k, v in encoder.state_dict().items()})
    state.update({"projector.weight": torch.ones(4, 512)}, **extra)
    torch.save({"state_dict": state, "epoch": 3, "hyper_parameters": {"backbone": encoder.name}}, path)
    return str(path)


def test_pretrained_backbone_loads_from_a_pretraining_checkpoint(tmp_path):
    torch.manual_seed(1)
    pretrained = VideoEncoder("r2plus1d_10")
    checkpoint = _pretraining_checkpoint(tmp_path / "last.ckpt", pretrained)
    model = VideoClassifier(num_classes=5, pretrained_checkpoint=checkpoint)
    for name, value in pretrained.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], value), name


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_pretraining_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    hostile = _pretraining_checkpoint(tmp_path / "last.ckpt", VideoEncoder("r2plus1d_test"), payload=_RunsCode(marker))
    with pytest.raises(ValueError, match=r"last.ckpt: holds Python objects beyond tensors .*weights_only=True.*re-save"):
        VideoClassifier(num_classes=5, backbone="r2plus1d_test", pretrained_checkpoint=hostile)
    assert not marker.exists()


def test_pretraining_checkpoint_errors_name_the_file_and_the_keys(tmp_path):
    encoder = VideoEncoder("r2plus1d_10")
    no_backbone = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": {"model.fc.weight": torch.ones(2, 2)}}, no_backbone)
    with pytest.raises(ValueError, match=r"classifier.ckpt: no 'backbone\.\*' weights \(first keys: model.fc.weight\)"):
        load_backbone(encoder, str(no_backbone))

    extra = _pretraining_checkpoint(tmp_path / "extra.ckpt", encoder, **{"backbone.network.fc.weight": torch.ones(1)})
    with pytest.raises(ValueError, match=r"extra.ckpt: .*unexpected \(1\): network.fc.weight"):
        load_backbone(encoder, extra)

    state = {f"backbone.{k}": v for k, v in encoder.state_dict().items()}
    del state["backbone.network.layer4.0.shortcut.1.running_var"]
    torch.save({"state_dict": state}, tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match=r"missing.ckpt: .*; missing \(1\): network.layer4.0.shortcut.1.running_var\. Is"):
        load_backbone(encoder, str(tmp_path / "missing.ckpt"))

    other = _pretraining_checkpoint(tmp_path / "r2plus1d_18.ckpt", VideoEncoder("r2plus1d_18"))
    with pytest.raises(ValueError, match=r"do not fit backbone 'r2plus1d_10'; unexpected \(96\): .*; shape \(checkpoint "
                                         r"vs model\) \(6\): network.stem.0.weight \(45, 3, 1, 7, 7\) vs \(83, 3, 1, 7, 7\).*"
                                         r"Is --model.init_args.backbone the backbone the pretraining used\?"):
        load_backbone(encoder, other)


# ----------------------------------------------------------------------------- 2 gloo ranks

VIDEOS, CLIPS, CLASSES, CORRUPT = 7, 3, 4, {5, 6}


class _EvalClips(Dataset):
    """Clip k % CLIPS of video k // CLIPS, with fixed random logits; corrupt videos give None."""

    def __init__(self) -> None:
        self.logits = torch.randn(VIDEOS * CLIPS, CLASSES, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return VIDEOS * CLIPS

    def __getitem__(self, i: int) -> dict | None:
        video, clip = divmod(i, CLIPS)
        if video in CORRUPT:
            return None
        return {"logits": self.logits[i], "label": video % CLASSES, "video_index": video, "clip_index": clip,
                "eval_set": "test", "index": i}


def _evaluate(loader: DataLoader) -> tuple[dict[str, torch.Tensor], dict[str, float], int]:
    """The evaluation layer over the loader: the gathered clips, the metrics, the batches seen."""
    evaluation = Evaluation([ClipTop1(), VideoTop1()])
    batches = 0
    for batch in loader:
        if batch is not None:
            evaluation.update(batch)
            batches += 1
    gathered = evaluation.outputs.gather()["test"]
    assert evaluation.compute() == {"clip_top1": clip_top1(gathered["logits"], gathered["label"]),
                                    "video_top1": video_top1(gathered["logits"], gathered["label"], gathered["video_index"])}
    return gathered, evaluation.compute(), batches


def _gather_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        dataset = _EvalClips()
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)  # as Lightning's
        loader = DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=collate_dropping_skipped)
        gathered, scores, batches = _evaluate(loader)
        torch.save({"gathered": gathered, "scores": scores, "batches": batches, "seen": len(sampler)},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_clip_metrics_of_two_ranks_equal_the_single_process_ones(tmp_path):
    """21 clips on 2 ranks: the sampler pads rank 1 with a repeat of clip 0, the corrupt videos
    leave rank 0 with fewer clips than rank 1 and whole batches of None."""
    mp.spawn(_gather_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single, single_scores, _ = _evaluate(DataLoader(_EvalClips(), batch_size=2, collate_fn=collate_dropping_skipped))
    assert len(single["label"]) == (VIDEOS - len(CORRUPT)) * CLIPS and set(single_scores) == {"clip_top1", "video_top1"}
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [r["seen"] for r in ranks] == [11, 11] and [r["batches"] for r in ranks] == [4, 5]  # 22 = 21 + 1 repeat
    for result in ranks:
        assert result["scores"] == single_scores
        for name, value in single.items():
            assert torch.equal(result["gathered"][name], value), name


# ----------------------------------------------------------------------------- configs


def _config_args(name: str, mini_ucf101: Path) -> list[str]:
    return ["--config", str(CONFIGS / f"ucf101/{name}.yaml"), "--config", str(CONFIGS / "ucf101/mini.yaml"),
            "--config", str(CONFIGS / "trainer/cpu.yaml"), "--data.init_args.root", str(mini_ucf101)]


@pytest.mark.parametrize("name", ["linear_probe", "finetune"])
def test_classification_config_trains_a_few_steps_and_tests(name, mini_ucf101, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*_config_args(name, mini_ucf101), *TINY_CLIPS, "--data.init_args.test_clips", "2"]
    cli = VisionZooCLI(args=["fit", *args, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
                             "--trainer.log_every_n_steps", "1"])
    assert cli.model.hparams.num_classes == 5 and cli.model.method_name == name  # linked from classInd.txt
    run = Path(cli.trainer.default_root_dir)
    assert run == Path("runs/ucf101") / name / "split1"
    losses = [float(r["train/loss"]) for r in metrics(run) if r.get("train/loss")]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))

    VisionZooCLI(args=["test", *args, "--ckpt_path", "last", "--trainer.limit_test_batches", "2"])
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == name and results["checkpoint"].endswith("last.ckpt")
    assert set(results["metrics"]) == {"clip_top1", "video_top1"}


def test_retrieval_config_tests_without_a_fit_checkpoint_and_reaches_the_leaderboard(mini_ucf101, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*_config_args("retrieval", mini_ucf101), *TINY_CLIPS, "--data.init_args.test_clips", "1"]
    VisionZooCLI(args=["test", *args, "--trainer.limit_test_batches", "3"])  # 24 gallery, 24 query clips
    results = json.loads(Path("runs/ucf101/retrieval/split1/results.json").read_text())
    assert results["method"] == "retrieval" and results["checkpoint"] is None
    assert results["config"]["model"]["init_args"]["center"] is True
    assert results["dataset"]["gallery"] == "trainlist01" and results["dataset"]["query"] == "testlist01"
    assert list(results["metrics"]) == ["R@1", "R@5", "R@10", "R@20", "R@50"]
    assert all(0.0 <= v <= 1.0 for v in results["metrics"].values())

    names, rows = leaderboard.leaderboard_rows(leaderboard.collect_results(Path("runs")), {})["ucf101"]
    assert names == ["R@1", "R@5", "R@10", "R@20", "R@50"] and rows[0][:2] == ["retrieval", "split1"]

    with pytest.raises(ValueError, match="test_gallery true"):
        VisionZooCLI(args=["test", *args, "--data.init_args.test_gallery", "false", "--trainer.limit_test_batches", "1"])


# ----------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_linear_probe_and_retrieval_of_a_pretrained_backbone_beat_chance(mini_ucf101, tmp_path, monkeypatch):
    """CSTP pretraining on the mini set (2 epochs), then the linear probe (fit + test) and retrieval
    of its backbone through the CLI; 5 classes, chance 0.2. Measured: probe video top-1 0.71, R@1
    0.69 (CSTP cropping the decoded frames; 0.57 and 0.77 cropping resized ones). The probe trains on crops of area 0.6-1
    rather than the protocol's 0.2-1: at 32 pixels a small crop doubles the shapes' size, which the
    frozen features of so short a pretraining do not absorb in 12 epochs."""
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    pretrain = VisionZooCLI(args=["fit", *_config_args("cstp", mini_ucf101), *TINY_CLIPS,
                                  "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "0"])
    checkpoint = str(Path(pretrain.trainer.default_root_dir) / "checkpoints/last.ckpt")
    evaluation = [*TINY_CLIPS, "--model.init_args.pretrained_checkpoint", checkpoint, "--run_name", "cstp"]

    probe = [*_config_args("linear_probe", mini_ucf101), *evaluation, "--trainer.max_epochs", "12",
             "--trainer.limit_val_batches", "0", "--data.init_args.train_sampler", "datamodules.clips.ClipSampler",
             "--data.init_args.train_sampler.init_args.crop_scale", "[0.6, 1.0]"]
    VisionZooCLI(args=["fit", *probe])
    VisionZooCLI(args=["test", *probe, "--ckpt_path", "last"])
    VisionZooCLI(args=["test", *_config_args("retrieval", mini_ucf101), *evaluation])
    elapsed = time.monotonic() - start

    probe_metrics = json.loads(Path("runs/ucf101/linear_probe/cstp/results.json").read_text())["metrics"]
    retrieval_metrics = json.loads(Path("runs/ucf101/retrieval/cstp/results.json").read_text())["metrics"]
    print(f"linear probe {probe_metrics}, retrieval {retrieval_metrics}, {elapsed:.0f} s")
    assert probe_metrics["video_top1"] >= 0.45, probe_metrics
    assert retrieval_metrics["R@1"] >= 0.4, retrieval_metrics


@pytest.mark.slow
def test_seco_pretraining_lifts_the_linear_probe_above_a_random_backbone(mini_ucf101, tmp_path, monkeypatch):
    """SeCo on a tiny 2-D ResNet (test_resnet, queue 256, 15 epochs), then the same linear probe
    on its backbone and on the randomly initialised one (the baseline, in this test). Measured:
    probe video top-1 0.83 against 0.74 (5 classes, 35 test videos, chance 0.2)."""
    monkeypatch.chdir(tmp_path)
    tiny = [*TINY_CLIPS, "--model.init_args.backbone", "test_resnet"]
    pretrain = VisionZooCLI(args=["fit", *_config_args("seco", mini_ucf101), *tiny, "--model.init_args.queue_size", "256",
                                  "--trainer.max_epochs", "15"])
    checkpoint = str(Path(pretrain.trainer.default_root_dir) / "checkpoints/last.ckpt")
    top1 = {}
    for start in ("seco", "random"):
        probe = [*_config_args("linear_probe", mini_ucf101), *tiny, "--run_name", start, "--trainer.max_epochs", "12",
                 "--trainer.limit_val_batches", "0", "--data.init_args.train_sampler", "datamodules.clips.ClipSampler",
                 "--data.init_args.train_sampler.init_args.crop_scale", "[0.6, 1.0]"]
        if start == "seco":
            probe += ["--model.init_args.pretrained_checkpoint", checkpoint]
        VisionZooCLI(args=["fit", *probe])
        VisionZooCLI(args=["test", *probe, "--ckpt_path", "last"])
        top1[start] = json.loads(Path(f"runs/ucf101/linear_probe/{start}/results.json").read_text())["metrics"]["video_top1"]
    assert top1["seco"] >= top1["random"] + 0.05, top1


def test_corrupt_videos_skipped_at_test_time_are_named_in_results_and_marked_on_the_leaderboard(
        mini_ucf101, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "ucf101"
    shutil.copytree(mini_ucf101, root)
    name = (root / "ucfTrainTestlist/testlist01.txt").read_text().splitlines()[3].split()[0]
    corrupt = root / "UCF-101" / name
    corrupt.write_bytes(b"RIFF" + bytes(range(256)) * 8)
    monkeypatch.chdir(tmp_path)
    args = [*_config_args("retrieval", root), *TINY_CLIPS, "--data.init_args.test_clips", "1",
            "--data.init_args.skip_corrupt", "true"]
    VisionZooCLI(args=["test", *args])
    results = json.loads(Path("runs/ucf101/retrieval/split1/results.json").read_text())
    assert results["skipped_corrupt"] == 1 and results["skipped_items"] == [str(corrupt)]
    rows = leaderboard.leaderboard_rows(leaderboard.collect_results(Path("runs")), {})["ucf101"][1]
    assert rows[0][1] == "split1 (1 corrupt samples skipped)"
