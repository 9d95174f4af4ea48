"""Running ``visionzoo`` in subprocesses (DDP, torchrun and kills need real processes), and
reading what a run wrote."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from conftest import REPO

# tests.fault_injection importable; output line by line (tests read the logs while a run goes on)
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visionzoo(
    *args: str, cwd: Path, check: bool = True, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``visionzoo <args>`` in ``cwd`` (``env`` added to :data:`ENV`); with ``check`` a non-zero
    exit fails with the output's tail."""
    command = [sys.executable, "-m", "lightning_modules.cli", *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})})
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def train_losses(run: Path) -> dict[int, str]:
    """``train/loss`` by logged step, as written (exact text, for bit-for-bit comparisons)."""
    return dict(train_rows(run))


def train_rows(run: Path) -> list[tuple[int, str]]:
    """Every ``train/loss`` row of ``metrics.csv`` as (step, loss text), in file order: a step
    written twice shows up twice."""
    return [(int(r["step"]), r["train/loss"]) for r in metrics(run) if r.get("train/loss")]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def mini_davis_scores(method_config: str, root: Path, cwd: Path, epochs: int) -> tuple[dict, dict]:
    """J&F metrics (``results.json``) of ``configs/davis/<method_config>.yaml`` trained for
    ``epochs`` on the mini DAVIS at ``root`` with the mini preset, and of the first-frame copy on
    the same val set, both through the CLI in this process, run directories under ``cwd``."""
    import json

    from conftest import CONFIGS
    from lightning_modules.cli import VisionZooCLI

    os.chdir(cwd)
    args = ["--config", str(CONFIGS / f"davis/{method_config}.yaml"), "--config", str(CONFIGS / "davis/mini.yaml"),
            "--config", str(CONFIGS / "trainer/cpu.yaml"), "--data.init_args.root", str(root)]
    VisionZooCLI(args=["fit", *args, "--trainer.max_epochs", str(epochs), "--trainer.limit_val_batches", "0"])
    VisionZooCLI(args=["test", *args, "--ckpt_path", "last"])
    VisionZooCLI(args=["test", *args, "--model", "lightning_modules.vos.baselines.FirstFrameCopy"])
    method = json.loads((cwd / f"runs/davis/{method_config}/2017_val/results.json").read_text())
    copy = json.loads((cwd / "runs/davis/first_frame_copy/2017_val/results.json").read_text())
    return method["metrics"], copy["metrics"]
