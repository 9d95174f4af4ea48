"""The margin-softmax recognizer on the mini MS1M set: every ms1m config trains, DDP on two
CPU processes learns (verification accuracy far above chance), and a checkpoint written by 4
ranks resumes on 2 and 1 ranks, one written by 1 process on 2, with the same next steps, every
rank saving and loading only its slice of the class centres and their momentum."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lightning_modules.cli import VisionZooCLI
from lightning_modules.distributed.model_parallel_softmax import class_shard
from lightning_modules.distributed.sharded_state import SHARDS, read_checkpoint

from conftest import CONFIGS
from runner import free_port, metrics, visionzoo

# Measured after 10 mini epochs on one process: cosface 0.86, curricularface 0.87, npcface 0.85,
# knn_softmax 0.87; the bar leaves room for other platforms' floating-point differences.
LEARNED = {"cosface": 0.75, "curricularface": 0.75, "npcface": 0.75, "knn_softmax": 0.75}
MS1M_CONFIGS = sorted(p for p in (CONFIGS / "ms1m").glob("*.yaml") if p.name != "mini.yaml")


def _args(config: Path, mini_ms1m: Path) -> list[str]:
    return ["--config", str(config), "--config", str(CONFIGS / "ms1m/mini.yaml"), "--data.init_args.root", str(mini_ms1m)]


@pytest.mark.parametrize("config", MS1M_CONFIGS, ids=lambda p: p.stem)
def test_ms1m_config_trains_a_few_steps(config, mini_ms1m, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = VisionZooCLI(args=["fit", *_args(config, mini_ms1m), "--config", str(CONFIGS / "trainer/cpu.yaml"),
                             "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1"])
    model = cli.model
    assert model.hparams.num_classes == 64  # linked from the property file
    losses = [float(r["train/loss"]) for r in metrics(Path(cli.trainer.default_root_dir)) if r.get("train/loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert Path(cli.trainer.default_root_dir) == Path("runs/ms1m") / model.method_name / "ms1m"
    assert model.method_name == config.stem.removesuffix("_r50")  # knn_softmax is not an arcface run


@pytest.mark.slow
def test_arcface_ddp_on_two_cpu_processes_learns_the_mini_set(mini_ms1m, tmp_path):
    visionzoo("fit", *_args(CONFIGS / "ms1m/arcface_r50.yaml", mini_ms1m),
               "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp", cwd=tmp_path)
    run = tmp_path / "runs/ms1m/arcface/ms1m"
    accuracy = [float(r["val/acc"]) for r in metrics(run) if r.get("val/acc")]
    assert accuracy[-1] > 0.8, accuracy  # chance is 0.5
    assert (run / "checkpoints/last.ckpt").is_file()

    visionzoo("test", *_args(CONFIGS / "ms1m/arcface_r50.yaml", mini_ms1m), "--config", str(CONFIGS / "trainer/cpu.yaml"),
               "--ckpt_path", "last", cwd=tmp_path)
    import json

    results = json.loads((run / "results.json").read_text())
    assert results["benchmark"] == "ms1m" and results["method"] == "arcface"
    assert results["metrics"]["acc"] == pytest.approx(accuracy[-1], abs=0.02)
    assert set(results["metrics"]) >= {"lfw_acc", "cfp_fp_acc", "agedb_30_acc"}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cosface", "curricularface", "npcface", "knn_softmax"])
def test_each_margin_head_learns_the_mini_set(method, mini_ms1m, tmp_path, monkeypatch):
    """One process, 10 epochs of the mini preset (240 steps): the verification accuracy of
    identities never trained on is far above chance (0.5)."""
    monkeypatch.chdir(tmp_path)
    cli = VisionZooCLI(args=["fit", *_args(CONFIGS / f"ms1m/{method}_r50.yaml", mini_ms1m),
                             "--config", str(CONFIGS / "trainer/cpu.yaml"),
                             "--trainer.max_epochs", "10", "--trainer.check_val_every_n_epoch", "10"])
    accuracy = [float(r["val/acc"]) for r in metrics(Path(cli.trainer.default_root_dir)) if r.get("val/acc")]
    assert len(accuracy) == 1 and accuracy[0] > LEARNED[method], accuracy


def _resume_and_step(rank: int, world_size: int, port: int, checkpoint: str, out: str) -> None:
    """One rank: load the checkpoint as Lightning does (``on_load_checkpoint``, the state dict,
    the optimizer state), then take two SGD steps on a fixed global batch of 32 split over the
    ranks, averaging the backbone's gradients as DDP does. BatchNorm runs in eval mode so that
    its statistics do not depend on the per-rank batch. Writes both losses."""
    import torch.distributed as dist

    from lightning_modules.face.recognizer import MarginSoftmaxRecognizer
    from lightning_modules.nn.margins import CombinedMarginHead

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    state = read_checkpoint(checkpoint, weights_only=False)
    hyper_parameters = {k: v for k, v in state["hyper_parameters"].items() if not k.startswith("_")}  # _class_path
    model = MarginSoftmaxRecognizer(**hyper_parameters, head=CombinedMarginHead(s=16.0))
    model.on_load_checkpoint(state)
    model.load_state_dict(state["state_dict"])
    optimizer = torch.optim.SGD(model.optimizer_parameter_groups(), lr=0.0, momentum=0.9)
    optimizer.load_state_dict(state["optimizer_states"][0])
    model.eval()
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(32, 3, 112, 112, generator=generator), torch.randint(64, (32,), generator=generator)
    per_rank = 32 // world_size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = model.softmax(model(images[mine]), labels[mine])
        loss.backward()
        for parameter in model.backbone.parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                parameter.grad /= world_size
        optimizer.step()
        losses.append(loss.item())
    Path(f"{out}.{rank}").write_text(" ".join(map(str, losses)))
    dist.destroy_process_group()


def _fit_and_check_shards(mini_ms1m: Path, cwd: Path, devices: int) -> Path:
    """A short fit on ``devices`` DDP ranks; its last.ckpt holds no class centres, and each rank's
    shard file beside it holds that rank's rows of the centres and of their momentum, no more."""
    visionzoo("fit", *_args(CONFIGS / "ms1m/arcface_r50.yaml", mini_ms1m), "--trainer.accelerator", "cpu",
               "--trainer.strategy", "ddp", "--trainer.devices", str(devices), "--data.init_args.batch_size", "8",
               "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "0",
               cwd=cwd)
    saved = cwd / "runs/ms1m/arcface/ms1m/checkpoints/last.ckpt"
    state = read_checkpoint(saved, weights_only=False)
    assert "softmax.weight" not in state["state_dict"]
    assert all("momentum_buffer" not in s or s["momentum_buffer"].shape[0] != 64
               for s in state["optimizer_states"][0]["state"].values())
    shards = sorted(Path(state[SHARDS]["folder"]).iterdir())
    assert [p.name for p in shards] == [f"rank{r}-of-{devices}.pt" for r in range(devices)]
    assert list(saved.parent.glob("last.ckpt.shards-*")) == [Path(state[SHARDS]["folder"])]  # older ones removed
    for rank, shard in enumerate(shards):
        content = torch.load(shard, weights_only=True)
        start, stop = class_shard(64, rank, devices)
        assert (content["start"], content["stop"]) == (start, stop)
        assert content["weight"].shape == content["momentum"].shape == (stop - start, 128)
    return saved


def _losses_after_resume(saved: Path, world_size: int, out: str) -> list[float]:
    import torch.multiprocessing as mp

    mp.start_processes(_resume_and_step, args=(world_size, free_port(), str(saved), out), nprocs=world_size, start_method="spawn")
    per_rank = [[float(v) for v in Path(f"{out}.{r}").read_text().split()] for r in range(world_size)]
    assert all(p == per_rank[0] for p in per_rank)  # the global loss, the same on every rank
    return per_rank[0]


@pytest.mark.slow
def test_checkpoint_of_4_ranks_resumes_on_2_and_1_with_the_same_next_steps(mini_ms1m, tmp_path):
    """Loading on 4, 2 and 1 ranks gives the same next two steps (the second one depends on the
    resharded momentum)."""
    saved = _fit_and_check_shards(mini_ms1m, tmp_path, devices=4)
    losses = {w: _losses_after_resume(saved, w, str(tmp_path / f"losses_w{w}")) for w in (4, 2, 1)}
    assert losses[4][0] != losses[4][1]  # the step changed the model
    for world_size in (2, 1):
        assert losses[world_size] == pytest.approx(losses[4], rel=1e-5), losses


@pytest.mark.slow
def test_checkpoint_of_one_process_resumes_on_2_ranks_with_the_same_next_steps(mini_ms1m, tmp_path):
    saved = _fit_and_check_shards(mini_ms1m, tmp_path, devices=1)
    losses = {w: _losses_after_resume(saved, w, str(tmp_path / f"losses_w{w}")) for w in (1, 2)}
    assert losses[2] == pytest.approx(losses[1], rel=1e-5), losses
