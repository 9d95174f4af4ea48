"""The official-file writers keep the previous submission whole when a test cannot make one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from callbacks.submission import MVTecTIFFMaps


def _trainer(run: Path) -> SimpleNamespace:
    return SimpleNamespace(default_root_dir=str(run), is_global_zero=True, strategy=SimpleNamespace(barrier=lambda *a: None))


def _batch(tmp_path: Path, mask_size: int) -> dict:
    return {"path": [str(tmp_path / "data/weave/test/hole/000.png")], "mask": torch.zeros(1, mask_size, mask_size)}


def test_maps_at_the_ground_truth_size_replace_the_previous_submission(tmp_path):
    writer, trainer = MVTecTIFFMaps(), _trainer(tmp_path / "run")
    for value in (1.0, 2.0):
        writer.on_test_start(trainer, None)
        writer.on_test_batch_end(trainer, None, {"anomaly_map": torch.full((1, 16, 16), value)}, _batch(tmp_path, 16), 0)
        writer.on_test_end(trainer, None)
    import tifffile

    written = tmp_path / "run/mvtec_anomaly_maps/weave/test/hole/000.tiff"
    assert tifffile.imread(written).shape == (16, 16) and float(tifffile.imread(written).max()) == 2.0


def test_maps_not_at_the_ground_truth_size_write_nothing_and_keep_the_previous_submission(tmp_path, caplog):
    writer, trainer = MVTecTIFFMaps(), _trainer(tmp_path / "run")
    writer.on_test_start(trainer, None)
    writer.on_test_batch_end(trainer, None, {"anomaly_map": torch.ones(1, 16, 16)}, _batch(tmp_path, 16), 0)
    writer.on_test_end(trainer, None)
    previous = sorted((tmp_path / "run/mvtec_anomaly_maps").rglob("*"))

    caplog.set_level("INFO", logger="lightning.pytorch.utilities.rank_zero")
    writer.on_test_start(trainer, None)  # the authors' protocol: maps at the input resolution
    writer.on_test_batch_end(trainer, None, {"anomaly_map": torch.ones(1, 8, 8)}, _batch(tmp_path, 16), 0)
    writer.on_test_end(trainer, None)
    assert sorted((tmp_path / "run/mvtec_anomaly_maps").rglob("*")) == previous
    assert not (tmp_path / "run/.mvtec_anomaly_maps.partial").exists()
    assert "no submission written" in caplog.text and "8x8, not at the ground truth's size 16x16" in caplog.text
