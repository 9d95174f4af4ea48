"""``visionzoo predict``: every benchmark's methods write their per-sample arrays as ``.npy`` with
the sample paths beside them, in dataset order, the same on 2 gloo ranks as in one process."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import CONFIGS
from lightning_modules.cli import VisionZooCLI
from runner import visionzoo

CPU = ["--config", str(CONFIGS / "trainer/cpu.yaml")]


def _read(folder: Path) -> dict[str, object]:
    files = {p.stem: np.load(p) for p in folder.glob("*.npy")}
    return {**files, "paths": (folder / "paths.txt").read_text().splitlines()}


def test_msflow_predicts_the_maps_of_every_test_image_in_order(tmp_path, monkeypatch):
    from datamodules.mini.mvtec import write_mvtec

    data = tmp_path / "mvtec"
    write_mvtec(data, categories=["weave"], n_train=4, n_test_good=3, n_test_per_defect=1, seed=0)
    monkeypatch.chdir(tmp_path)
    cli = VisionZooCLI(args=["predict", "--config", str(CONFIGS / "mvtec/msflow.yaml"), "--config",
                             str(CONFIGS / "mvtec/mini.yaml"), *CPU, "--data.init_args.root", str(data),
                             "--data.init_args.image_size", "64", "--data.init_args.batch_size", "3",
                             "--ckpt_path", "none"])  # the untrained model: the rows, not the weights, are tested
    run = Path(cli.trainer.default_root_dir)
    predicted = _read(run / "predictions/test")
    samples = cli.datamodule.test_samples
    assert predicted["paths"] == [str(sample.image) for sample in samples]
    assert predicted["index"].tolist() == list(range(len(samples)))
    assert predicted["anomaly_map"].shape == predicted["detection_map"].shape == (len(samples), 64, 64)
    # The rows are the maps of those images: recompute the last one.
    dataset = cli.trainer.predict_dataloaders.dataset
    cli.model.eval()
    with torch.no_grad():
        expected = cli.model.anomaly_maps(dataset[len(samples) - 1]["image"][None])
    np.testing.assert_allclose(predicted["anomaly_map"][-1], expected["anomaly_map"][0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(predicted["image_score"][-1], expected["image_score"][0].numpy(), rtol=1e-5)


def test_a_face_model_embeds_a_users_image_folder(mini_ms1m, tmp_path, monkeypatch):
    faces = tmp_path / "my_faces"
    generator = np.random.default_rng(0)
    names = ["alice/1.jpg", "alice/2.png", "bob/1.jpg", "carol.png", "notes.txt"]
    for name in names:
        (faces / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            (faces / name).write_text("not a face")
        else:
            cv2.imwrite(str(faces / name), generator.integers(0, 255, (120, 100, 3), dtype=np.uint8))
    monkeypatch.chdir(tmp_path)
    cli = VisionZooCLI(args=["predict", "--config", str(CONFIGS / "ms1m/arcface_r50.yaml"), "--config",
                             str(CONFIGS / "ms1m/mini.yaml"), *CPU, "--data.init_args.root", str(mini_ms1m),
                             "--data.init_args.predict_root", str(faces), "--data.init_args.batch_size", "2",
                             "--ckpt_path", "none"])
    predicted = _read(Path(cli.trainer.default_root_dir) / "predictions/predict")
    assert predicted["paths"] == [str(faces / name) for name in sorted(names[:4])]
    embeddings = predicted["embedding"]
    assert embeddings.shape == (4, 128)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    item = cli.trainer.predict_dataloaders[0].dataset[2]
    cli.model.eval()
    with torch.no_grad():
        expected = cli.model.prediction_outputs({k: v[None] for k, v in item.items() if torch.is_tensor(v)})
    np.testing.assert_allclose(embeddings[2], expected["embedding"][0].numpy(), rtol=1e-4, atol=1e-6)


def test_a_predict_folder_without_images_is_an_error_naming_it(mini_ms1m, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"data.predict_root {tmp_path / 'empty'}: no .jpg"):
        VisionZooCLI(args=["predict", "--config", str(CONFIGS / "ms1m/arcface_r50.yaml"), "--config",
                           str(CONFIGS / "ms1m/mini.yaml"), *CPU, "--data.init_args.root", str(mini_ms1m),
                           "--data.init_args.predict_root", str(tmp_path / "empty"), "--ckpt_path", "none"])


@pytest.mark.slow
def test_clip_features_on_two_ranks_equal_one_process(mini_ucf101, tmp_path):
    """35 test videos and 90 gallery videos, one clip each: neither divides by 2."""
    args = ["--config", str(CONFIGS / "ucf101/retrieval.yaml"), "--config", str(CONFIGS / "ucf101/mini.yaml"),
            "--data.init_args.root", str(mini_ucf101), "--data.init_args.num_frames", "4",
            "--data.init_args.image_size", "32", "--data.init_args.resize", "36", "--data.init_args.test_clips", "1"]
    visionzoo("predict", *args, *CPU, "--trainer.default_root_dir", str(tmp_path / "one"), cwd=tmp_path)
    visionzoo("predict", *args, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
              "--trainer.default_root_dir", str(tmp_path / "two"), cwd=tmp_path)
    for name, videos in (("test", 35), ("gallery", 90)):
        one, two = _read(tmp_path / "one/predictions" / name), _read(tmp_path / "two/predictions" / name)
        assert one["features"].shape == (videos, 512) and one["paths"] == two["paths"]
        assert len(set(one["paths"])) == videos
        np.testing.assert_allclose(two["features"], one["features"], rtol=1e-5, atol=1e-6)


def test_a_retrieval_model_embeds_the_revisited_queries_and_database(mini_revisited, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = VisionZooCLI(args=["predict", "--config", str(CONFIGS / "gldv2/revisited_eval.yaml"), *CPU,
                             "--data.init_args.root", str(mini_revisited), "--data.init_args.image_size", "32",
                             "--data.init_args.num_workers", "0", "--model.init_args.backbone", "test_resnet",
                             "--model.init_args.embedding_size", "16", "--ckpt_path", "none"])
    run = Path(cli.trainer.default_root_dir)
    queries, database = _read(run / "predictions/query"), _read(run / "predictions/database")
    assert queries["embedding"].shape == (10, 16) and database["embedding"].shape == (90, 16)
    assert database["paths"][0].endswith("roxford5k/jpg/roxford5k_000000.jpg")
    np.testing.assert_allclose(np.linalg.norm(queries["embedding"], axis=1), 1.0, rtol=1e-5)
