"""The perf scripts run end to end on tiny sizes and write their JSON (no timing asserted)."""

import json

from benchmarks.perf import model_parallel_softmax


def test_model_parallel_softmax_perf_script(tmp_path, capsys):
    out = tmp_path / "perf.json"
    model_parallel_softmax.main(["--classes", "300", "--batch", "4", "--dim", "16", "--world-sizes", "2",
                                 "--sample-rate", "0.5", "--chunk-classes", "64", "--precision", "bf16-mixed",
                                 "--steps", "1", "--device", "cpu", "--out", str(out), "--profile", str(tmp_path)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["kind"] for r in rows] == ["plain", "model_parallel", "partial_fc"]
    assert all(r["step_time_s"] > 0 and r["peak_memory_bytes"] > 0 for r in rows)
    assert "| 300 | 4 | 16 | 2 | model_parallel |" in capsys.readouterr().out
    tables = sorted(path.name for path in tmp_path.glob("*_r*.txt"))  # one per process of each case
    assert tables == [f"{kind}_C300_W2_bf16-mixed_r{rank}.txt" for kind in ("model_parallel", "partial_fc")
                      for rank in (0, 1)] + ["plain_C300_W2_bf16-mixed_r0.txt"]
    assert "aten::mm" in (tmp_path / "plain_C300_W2_bf16-mixed_r0.txt").read_text()


def test_retrieval_perf_script(tmp_path, capsys):
    from benchmarks.perf import retrieval

    out = tmp_path / "retrieval.json"
    retrieval.main(["--backbones", "test_resnet", "--image-size", "32", "--batch", "2", "--batches", "1", "--device", "cpu",
                    "--gallery", "2000", "--dims", "16", "--queries", "10", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["extract"][0]["images_per_s"] > 0
    assert [r["index"] for r in results["search"]] == ["flat", "ivf"]
    assert results["search"][0]["recall@100_of_flat"] == 1.0 and 0 < results["search"][1]["recall@100_of_flat"] <= 1
    assert "| 2000 | 16 | ivf |" in capsys.readouterr().out


def test_vos_inference_perf_script(tmp_path, capsys):
    from benchmarks.perf import vos_inference

    out = tmp_path / "vos.json"
    vos_inference.main(["--backbone", "test_resnet", "--height", "32", "--width", "48", "--lengths", "3",
                        "--memory-every", "5", "1", "--device", "cpu", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["frames"], r["memory_every"]) for r in rows] == [
        ("stm", 3, 5), ("stm", 3, 1), ("lcm", 3, 5), ("lcm", 3, 1)]
    assert all(r["frames_per_s"] > 0 for r in rows)
    assert "| lcm | 3 | 1 |" in capsys.readouterr().out


def test_tracking_perf_script(tmp_path, capsys):
    from benchmarks.perf import tracking

    out = tmp_path / "tracking.json"
    tracking.main(["--backbone", "dla46_c", "--no-deformable", "--height", "64", "--width", "96", "--objects", "5", "40",
                   "--frames", "3", "--device", "cpu", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["objects"]) for r in rows] == [("fairmot", 5), ("fairmot", 40), ("corrtracker", 5), ("corrtracker", 40)]
    assert all(r["detection_fps"] > 0 and r["association_fps"] > 0 and r["fps"] < r["detection_fps"] for r in rows)
    assert "| corrtracker | 40 |" in capsys.readouterr().out


def test_training_step_perf_script(tmp_path, capsys):
    from benchmarks.perf import training_step

    out = tmp_path / "training_step.json"
    training_step.main(["--backbone", "test_resnet", "--classes", "50", "--dim", "16", "--batch", "2", "--precision", "32",
                        "--steps", "2", "--warmup", "1", "--log-every", "1", "--device", "cpu", "--run-dir", str(tmp_path / "runs"),
                        "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == list(training_step.VARIANTS)
    assert all(r["ms_per_step"] > 0 and "overhead_vs_lightning" in r and "overhead_vs_raw" in r for r in rows)
    assert (tmp_path / "runs/visionzoo/metrics.csv").is_file()  # the run log of the visionzoo variant
    assert "| visionzoo_deferred_nan_guard |" in capsys.readouterr().out
