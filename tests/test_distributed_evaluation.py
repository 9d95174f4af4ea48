"""``visionzoo test`` on 2 gloo ranks gives the metrics of one process, on every benchmark.

The DistributedSampler splits a test set over the ranks and pads the last rank's share with
repeats when the set does not divide by the world size; the evaluation layer must gather every
rank's items, count each once and keep the dataset order. Each case here has such a set:

- MVTec AD: 13 test images of one category (5 good, 2 per defect);
- UCF101 retrieval: 35 query videos against 90 gallery videos, one clip each (two eval sets);
- MS1M verification: the mini ``.bin`` sets (pairs of images: an even count, but the two images
  of every pair land on different ranks);
- GLDv2 retrieval: 40 queries against 100 index images, scored per Public/Private split, and the
  compatibility table of a model upgrade (every image embedded by two models);
- DAVIS: 4 sequences through the sequence loop, each on one rank (2 and 2 by length), the
  per-object rows gathered in sequence order;
- MOT17: the 4 half-split sequences of a trained mini FairMOT, tracked on one rank each and
  scored by TrackEval after the gather.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import CONFIGS
from runner import visionzoo

pytestmark = pytest.mark.slow

TWO_RANKS = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
ONE_PROCESS = ["--config", str(CONFIGS / "trainer/cpu.yaml")]


def _test_metrics(args: list[str], cwd: Path, root: Path, extra: list[str]) -> dict[str, float]:
    visionzoo("test", *args, *extra, "--trainer.default_root_dir", str(root), cwd=cwd)
    results = json.loads((root / "results.json").read_text())
    return results["metrics"]


def _assert_same(single: dict[str, float], two: dict[str, float]) -> None:
    assert single.keys() == two.keys()
    # The same items in the same order; only a convolution's float rounding may depend on how
    # many images share a batch (1e-6 of a metric is far below any reported digit).
    for name in single:
        assert two[name] == pytest.approx(single[name], abs=1e-6, nan_ok=True), name


def test_mvtec_test_on_two_ranks_equals_one_process(tmp_path):
    from datamodules.mini.mvtec import write_mvtec

    data = tmp_path / "mvtec"
    write_mvtec(data, categories=["weave"], n_train=8, n_test_good=5, n_test_per_defect=2, seed=0)
    args = ["--config", str(CONFIGS / "mvtec/msflow.yaml"), "--config", str(CONFIGS / "mvtec/mini.yaml"),
            "--data.init_args.root", str(data), "--data.init_args.image_size", "64", "--data.init_args.batch_size", "4"]
    run = tmp_path / "fit"
    visionzoo("fit", *args, *ONE_PROCESS, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(run), cwd=tmp_path)
    checkpoint = ["--ckpt_path", str(run / "checkpoints/last.ckpt")]
    single = _test_metrics(args, tmp_path, tmp_path / "single", [*ONE_PROCESS, *checkpoint])
    two = _test_metrics(args, tmp_path, tmp_path / "two", [*TWO_RANKS, *checkpoint])
    assert set(single) == {"image_auroc", "image_auroc_max", "pixel_auroc", "aupro"}
    _assert_same(single, two)
    # The official-format maps: one per test image, whatever the world size.
    tiffs = sorted(p.relative_to(tmp_path / "two" / "mvtec_anomaly_maps") for p in (tmp_path / "two").rglob("*.tiff"))
    assert len(tiffs) == 13 and tiffs == sorted(p.relative_to(tmp_path / "single" / "mvtec_anomaly_maps")
                                                for p in (tmp_path / "single").rglob("*.tiff"))


def test_ucf101_retrieval_on_two_ranks_equals_one_process(mini_ucf101, tmp_path):
    args = ["--config", str(CONFIGS / "ucf101/retrieval.yaml"), "--config", str(CONFIGS / "ucf101/mini.yaml"),
            "--data.init_args.root", str(mini_ucf101), "--data.init_args.num_frames", "4",
            "--data.init_args.image_size", "32", "--data.init_args.resize", "36", "--data.init_args.test_clips", "1"]
    single = _test_metrics(args, tmp_path, tmp_path / "single", ONE_PROCESS)
    two = _test_metrics(args, tmp_path, tmp_path / "two", TWO_RANKS)
    assert list(single) == ["R@1", "R@5", "R@10", "R@20", "R@50"]
    _assert_same(single, two)


def test_ms1m_verification_on_two_ranks_equals_one_process(mini_ms1m, tmp_path):
    args = ["--config", str(CONFIGS / "ms1m/arcface_r50.yaml"), "--config", str(CONFIGS / "ms1m/mini.yaml"),
            "--data.init_args.root", str(mini_ms1m)]
    run = tmp_path / "fit"
    visionzoo("fit", *args, *ONE_PROCESS, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
              "--trainer.default_root_dir", str(run), cwd=tmp_path)
    checkpoint = ["--ckpt_path", str(run / "checkpoints/last.ckpt")]
    single = _test_metrics(args, tmp_path, tmp_path / "single", [*ONE_PROCESS, *checkpoint])
    two = _test_metrics(args, tmp_path, tmp_path / "two", [*TWO_RANKS, *checkpoint])
    assert {"lfw_acc", "lfw_std", "cfp_fp_acc", "agedb_30_acc", "acc"} <= set(single)
    _assert_same(single, two)


def test_gldv2_retrieval_and_compatibility_on_two_ranks_equal_one_process(mini_gldv2, tmp_path):
    args = ["--config", str(CONFIGS / "gldv2/baseline_r50.yaml"), "--config", str(CONFIGS / "gldv2/mini.yaml"),
            "--data.init_args.root", str(mini_gldv2), "--data.init_args.batch_size", "16"]
    run = tmp_path / "fit"
    visionzoo("fit", *args, *ONE_PROCESS, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(run), cwd=tmp_path)
    checkpoint = ["--ckpt_path", str(run / "checkpoints/last.ckpt")]
    upgrade = [*checkpoint, "--model.init_args.old_checkpoint", str(run / "checkpoints/last.ckpt")]
    single = _test_metrics(args, tmp_path, tmp_path / "single", [*ONE_PROCESS, *upgrade])
    two = _test_metrics(args, tmp_path, tmp_path / "two", [*TWO_RANKS, *upgrade])
    assert {"new_old/mAP@100_public", "new_old/mAP@100_private", "negative_flip_rate"} <= set(single)
    _assert_same(single, two)
    # The same model as old and new: the cross-test is the self-test, nothing flips.
    assert single["new_old/mAP@100_private"] == pytest.approx(single["old_old/mAP@100_private"])
    assert single["negative_flip_rate"] == 0.0


def test_davis_sequence_evaluation_on_two_ranks_equals_one_process(mini_davis, tmp_path):
    args = ["--config", str(CONFIGS / "davis/stm.yaml"), "--config", str(CONFIGS / "davis/mini.yaml"),
            "--model", "lightning_modules.vos.baselines.FirstFrameCopy",
            "--data.init_args.root", str(mini_davis)]
    single = _test_metrics(args, tmp_path, tmp_path / "single", ONE_PROCESS)
    two = _test_metrics(args, tmp_path, tmp_path / "two", TWO_RANKS)
    assert "J&F-Mean" in single
    _assert_same(single, two)
    tables = [json.loads((tmp_path / run / "results.json").read_text())["tables"] for run in ("single", "two")]
    assert tables[0] == tables[1]  # every object once, in sequence order
    written = sorted(p.relative_to(tmp_path / "two/davis_results") for p in (tmp_path / "two/davis_results").rglob("*.png"))
    assert len(written) == 10 + 11 + 12 + 10


def test_mot17_sequence_evaluation_on_two_ranks_equals_one_process(trained_mini_fairmot, mini_mot17, tmp_path):
    """The same tracks, counted the same: every count (TP, FP, FN, id switches, IDTP ...) equal;
    the localisation scores (LocA, MOTP, HOTA's IoU-weighted terms) within 1e-4, as a box's
    float rounding differs with the threads each process gets, and a result file holds 2 decimals."""
    checkpoint = trained_mini_fairmot / "runs/mot17/fairmot/val_half/checkpoints/last.ckpt"
    args = ["--config", str(CONFIGS / "mot17/fairmot_dla34.yaml"), "--config", str(CONFIGS / "mot17/mini.yaml"),
            "--data.init_args.root", str(mini_mot17), "--ckpt_path", str(checkpoint)]
    single = _test_metrics(args, tmp_path, tmp_path / "single", ONE_PROCESS)
    two = _test_metrics(args, tmp_path, tmp_path / "two", TWO_RANKS)
    assert single["MOTA"] > 0.3 and single.keys() == two.keys()
    counts = ("CLR_TP", "CLR_FN", "CLR_FP", "IDSW", "Frag", "MT", "PT", "ML", "IDTP", "IDFN", "IDFP")
    assert {k: single[k] for k in counts} == {k: two[k] for k in counts}
    for name in single:
        assert two[name] == pytest.approx(single[name], abs=1e-4), name
    tables = [json.loads((tmp_path / run / "results.json").read_text())["tables"]["per_sequence"] for run in ("single", "two")]
    assert [row["Sequence"] for row in tables[0]] == [row["Sequence"] for row in tables[1]]  # each once, in order
    for row_single, row_two in zip(*tables):
        assert {k: row_single[k] for k in counts} == {k: row_two[k] for k in counts}
    assert sorted(p.name for p in (tmp_path / "two/mot_results").glob("*.txt")) == sorted(
        p.name for p in (tmp_path / "single/mot_results").glob("*.txt"))
