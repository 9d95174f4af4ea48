"""The sequence evaluation loop on the mini DAVIS through ``visionzoo test``: the first-frame
baseline's J&F equals the offline scorer's on the written result folder, the per-object table is
in results.json, and the result PNGs are index images with the annotations' frame names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.metrics.davis import global_results, score_results_folder
from lightning_modules.cli import VisionZooCLI

from conftest import CONFIGS


def _args(mini_davis: Path) -> list[str]:
    return ["--config", str(CONFIGS / "davis/stm.yaml"), "--config", str(CONFIGS / "davis/mini.yaml"),
            "--model", "lightning_modules.vos.baselines.FirstFrameCopy",
            "--config", str(CONFIGS / "trainer/cpu.yaml"), "--data.init_args.root", str(mini_davis)]


@pytest.mark.parametrize("year", [2017, 2016])
def test_first_frame_copy_scores_as_the_offline_scorer_of_its_result_folder(year, mini_davis, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    VisionZooCLI(args=["test", *_args(mini_davis), "--data.init_args.year", str(year)])
    run = Path(f"runs/davis/first_frame_copy/{year}_val")
    results = json.loads((run / "results.json").read_text())
    offline = global_results(score_results_folder(mini_davis, run / "davis_results", year=year))
    for name, value in offline.items():
        assert results["metrics"][name] == pytest.approx(value, abs=1e-12), name
    rows = results["tables"]["per_object"]
    assert len(rows) == (1 + 2 + 3 + 1 if year == 2017 else 4) and rows[0]["Sequence"] == "val-00_1"
    assert 0.1 < results["metrics"]["J&F-Mean"] < 0.9  # the objects move: copying the first frame is not enough
    frames = sorted(p.name for p in (run / "davis_results/val-00").iterdir())
    assert frames == [f"{t:05d}.png" for t in range(10)]
    with Image.open(run / "davis_results/val-00/00003.png") as image:
        assert image.mode == "P"
    # Pictures: 3 panels of frames 0, mid and last, and a GIF of every frame, per sequence.
    assert sorted(p.name for p in (run / "mask_overlays/val-00").glob("*.png")) == ["00000.png", "00004.png", "00009.png"]
    with Image.open(run / "mask_overlays/val-00/val-00.gif") as gif:
        assert gif.n_frames == 10 and gif.size == (80, 48)
    with Image.open(run / "mask_overlays/val-00/00004.png") as panel:
        assert panel.size[0] == 3 * 80  # frame | prediction | ground truth


def test_mask_overlay_colours_objects_and_leaves_the_background():
    from callbacks.mask_overlays import PALETTE, mask_overlay

    frame = np.full((2, 2, 3), 100, np.uint8)
    labels = np.array([[0, 1], [2, 255]], np.uint8)
    overlay = mask_overlay(frame, labels, alpha=0.5)
    assert (overlay[0, 0] == 100).all()
    np.testing.assert_array_equal(overlay[0, 1], ((100 + PALETTE[1].astype(float)) / 2).astype(np.uint8))
    np.testing.assert_array_equal(overlay[1, 1], [177, 177, 177])  # void drawn in white
