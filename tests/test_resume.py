"""Exact resume: a run interrupted at any step and resumed ends with the same weights, bit for
bit, as an uninterrupted run, and its ``metrics.csv`` has every training step once with the
same losses. MS1M mini with everything that draws random numbers switched on: shuffling, 2
DataLoader workers with random flips, dropout, Partial-FC class sampling, a per-step LR
schedule; interruptions mid-epoch, at an epoch boundary and in the second epoch, by SIGKILL and
SIGTERM after a checkpoint and by SIGUSR1 (save at a batch boundary, then ``--ckpt_path last``)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS
from runner import assert_same_weights, final_weights, train_losses, train_rows, visionzoo

STEPS_PER_EPOCH = 12  # 768 mini images / batch 64


def _config(tmp_path: Path, mini_ms1m: Path, interruption: tuple[str, int] | None, every_step: bool = True) -> list[str]:
    """With ``every_step`` a checkpoint after every step; without, visionzoo's default: after
    each validation (here at the end of every epoch)."""
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"every_n_train_steps": 1, "save_last": True}}] if every_step else []
    if interruption:
        signal_name, step = interruption
        callbacks.append({"class_path": "tests.fault_injection.SignalAtStep",
                          "init_args": {"global_step": step, "signal_name": signal_name}})
    overrides = {
        "model": {"init_args": {"softmax_options": {"sample_rate": 0.5}, "dropout": 0.2}},
        "data": {"init_args": {"root": str(mini_ms1m), "batch_size": 64, "num_workers": 2}},
        "trainer": {"max_epochs": 2, "deterministic": True, "check_val_every_n_epoch": 1,
                    "log_every_n_steps": 1, "callbacks": callbacks},
    }
    path = tmp_path / f"overrides-{interruption}-{every_step}.yaml"
    path.write_text(yaml.safe_dump(overrides))
    return ["--config", str(CONFIGS / "ms1m/arcface_r50.yaml"), "--config", str(CONFIGS / "ms1m/mini.yaml"),
            "--config", str(CONFIGS / "trainer/cpu.yaml"), "--config", str(path)]


@pytest.fixture(scope="module")
def uninterrupted(mini_ms1m, tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    visionzoo("fit", *_config(tmp_path, mini_ms1m, None), "--trainer.default_root_dir", "run", cwd=tmp_path)
    return tmp_path / "run"


@pytest.mark.slow
@pytest.mark.parametrize("signal_name, step", [
    ("SIGKILL", 5),                     # mid-epoch
    ("SIGKILL", STEPS_PER_EPOCH),       # at the epoch boundary, before validation
    ("SIGTERM", STEPS_PER_EPOCH + 5),   # mid-way through the second epoch
    ("SIGUSR1", 9),                     # preemption: hpc_ckpt at a batch boundary, then stop
])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(signal_name, step, uninterrupted, mini_ms1m, tmp_path):
    first = visionzoo("fit", *_config(tmp_path, mini_ms1m, (signal_name, step)),
                      "--trainer.default_root_dir", "run", cwd=tmp_path, check=False)
    run = tmp_path / "run"
    if signal_name == "SIGKILL":
        assert first.returncode == -signal.SIGKILL
    if signal_name in ("SIGUSR1", "SIGTERM"):  # a checkpoint at the batch boundary; SIGTERM exits non-zero
        assert (run / "hpc_ckpt_1.ckpt").is_file(), first.stderr[-3000:]
        assert first.returncode == (0 if signal_name == "SIGUSR1" else 128 + signal.SIGTERM)
    assert max(train_losses(run), default=-1) < 2 * STEPS_PER_EPOCH - 1  # it did stop early (SIGTERM: gracefully)

    resumed = visionzoo("fit", *_config(tmp_path, mini_ms1m, None), "--trainer.default_root_dir", "run",
                        "--ckpt_path", "last", cwd=tmp_path)
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    assert_same_weights(final_weights(run), final_weights(uninterrupted))
    assert train_rows(run) == train_rows(uninterrupted)  # every step once, in order, same losses


@pytest.mark.slow
def test_a_run_resumed_from_its_validation_checkpoint_logs_every_step_once(uninterrupted, mini_ms1m, tmp_path):
    """The default checkpoint is written when the epoch's validation ends, inside its last batch,
    before Lightning counts that batch for its loggers; resumed, Lightning repeated that step."""
    first = visionzoo("fit", *_config(tmp_path, mini_ms1m, ("SIGKILL", STEPS_PER_EPOCH + 3), every_step=False),
                      "--trainer.default_root_dir", "run", cwd=tmp_path, check=False)
    assert first.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    visionzoo("fit", *_config(tmp_path, mini_ms1m, None, every_step=False), "--trainer.default_root_dir", "run",
              "--ckpt_path", "last", cwd=tmp_path)
    assert_same_weights(final_weights(run), final_weights(uninterrupted))
    assert train_rows(run) == train_rows(uninterrupted)


def test_ckpt_path_last_starts_fresh_without_a_checkpoint(mini_ms1m, tmp_path):
    result = visionzoo("fit", *_config(tmp_path, mini_ms1m, None), "--trainer.default_root_dir", "run",
                       "--ckpt_path", "last", "--trainer.max_steps", "2", cwd=tmp_path)
    assert "Restored" not in result.stdout + result.stderr
    assert sorted(train_losses(tmp_path / "run")) == [0, 1]
