"""Atomic checkpoint writes: a process killed in the middle of writing a checkpoint leaves the
previous file intact, and visionzoo installs the atomic writer by default."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from callbacks.checkpoint_io import AtomicCheckpointIO
from lightning_modules.cli import VisionZooCLI

from conftest import CONFIGS, REPO

DIE_HALFWAY = """
import io, os, signal, sys, torch
from callbacks.checkpoint_io import AtomicCheckpointIO

real_save = torch.save
def save_half_then_die(obj, file, *args, **kwargs):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    file.write(buffer.getvalue()[: buffer.tell() // 2])
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_half_then_die
AtomicCheckpointIO().save_checkpoint({"step": 2, "weight": torch.full((100_000,), 2.0)}, sys.argv[1])
"""


def test_a_kill_during_saving_leaves_the_previous_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "weight": torch.ones(100_000)}, target)

    killed = subprocess.run([sys.executable, "-c", DIE_HALFWAY, str(target)], cwd=REPO)
    assert killed.returncode == -9
    partials = list(tmp_path.glob(".last.ckpt.*.partial"))
    assert len(partials) == 1 and 0 < partials[0].stat().st_size  # the killed writer got half-way
    assert io.load_checkpoint(target)["step"] == 1  # the previous checkpoint, whole

    io.save_checkpoint({"step": 3, "weight": torch.full((100_000,), 3.0)}, target)
    assert io.load_checkpoint(target)["step"] == 3
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*.partial"))  # stale part removed


def test_an_error_during_saving_leaves_the_previous_checkpoint_and_no_part(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)

    def full_disk(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_visionzoo_installs_the_atomic_writer_unless_one_is_configured(mini_mvtec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(CONFIGS / "mvtec/msflow.yaml"), "--config", str(CONFIGS / "mvtec/mini.yaml"),
            "--config", str(CONFIGS / "trainer/cpu.yaml"), "--data.init_args.root", str(mini_mvtec)]
    cli = VisionZooCLI(args=args, run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    cli = VisionZooCLI(args=[*args, "--trainer.plugins", "lightning.pytorch.plugins.io.TorchCheckpointIO"], run=False)
    assert type(cli.trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO"


def _sharded_save(io: AtomicCheckpointIO, target, run_dir, step: int, value: float) -> None:
    """A one-rank checkpoint whose 'head' rows go to a shard file, as the recognizer saves."""
    from lightning_modules.distributed.sharded_state import SHARDS, write_shards

    descriptor = write_shards({"weight": torch.full((6, 2), value)}, start=0, num_rows=6, run_dir=run_dir, step=step)
    io.save_checkpoint({"step": step, SHARDS: descriptor}, target)


def test_a_sharded_checkpoint_keeps_its_shards_whole_when_the_next_save_fails(tmp_path, monkeypatch):
    from lightning_modules.distributed.sharded_state import SHARDS, read_rows

    target, io = tmp_path / "checkpoints/last.ckpt", AtomicCheckpointIO()
    _sharded_save(io, target, tmp_path, step=1, value=1.0)
    first = io.load_checkpoint(target)
    assert torch.equal(read_rows(first[SHARDS], 2, 5)["weight"], torch.ones(3, 2))

    real_save = torch.save

    def full_disk_on_the_checkpoint(obj, file, *args, **kwargs):
        if isinstance(obj, dict) and "step" in obj:
            raise OSError(28, "No space left on device")
        real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_on_the_checkpoint)
    with pytest.raises(OSError, match="No space left"):
        _sharded_save(io, target, tmp_path, step=2, value=2.0)
    monkeypatch.undo()
    kept = io.load_checkpoint(target)
    assert kept["step"] == 1 and torch.equal(read_rows(kept[SHARDS], 0, 6)["weight"], torch.ones(6, 2))

    _sharded_save(io, target, tmp_path, step=3, value=3.0)
    latest = io.load_checkpoint(target)
    assert torch.equal(read_rows(latest[SHARDS], 0, 6)["weight"], torch.full((6, 2), 3.0))
    assert [p.name for p in target.parent.glob("last.ckpt.shards-*")] == [latest[SHARDS]["folder"].split("/")[-1]]
    io.remove_checkpoint(target)
    assert not list(target.parent.iterdir())


def test_a_sharded_checkpoint_read_without_its_folder_says_how_to_load_it(tmp_path):
    from lightning_modules.distributed.sharded_state import SHARDS, read_rows

    target = tmp_path / "last.ckpt"
    _sharded_save(AtomicCheckpointIO(), target, tmp_path, step=1, value=1.0)
    with pytest.raises(ValueError, match="shard files beside it: load it through visionzoo"):
        read_rows(torch.load(target, weights_only=True)[SHARDS], 0, 6)


def test_a_full_disk_says_so_naming_the_checkpoint(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)

    def torch_on_a_full_disk(obj, file, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", torch_on_a_full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 0))
    with pytest.raises(OSError, match=rf"No space left on device while writing {target} \(0 MiB free"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target)["step"] == 1
