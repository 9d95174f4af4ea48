"""GLDv2 and revisited Oxford/Paris readers: the two training lists, the label remapping, missing
and malformed inputs named, the retrieval split, query crops, R1M distractors."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.formats.images import read_image
from datamodules.gldv2 import GLDv2DataModule, RevisitedDataModule, hashed_path, read_training_list, evaluation_image


def test_both_training_lists_give_the_same_images_and_sparse_ids_are_remapped(mini_gldv2):
    clean = read_training_list(mini_gldv2 / "train_clean.csv")
    full = read_training_list(mini_gldv2 / "train.csv")
    assert set(clean) < set(full) and len(full) == 240 and len(clean) == 200  # clean drops one photo a landmark
    datamodule = GLDv2DataModule(str(mini_gldv2), num_workers=0, image_size=32)
    assert datamodule.num_classes == 40 and datamodule.landmark_ids[:3] == [3, 10, 17]  # ids 7k + 3, remapped 0..39
    datamodule.setup("fit")
    path, label = datamodule.train_dataset.samples[0]
    assert path == hashed_path(mini_gldv2, "train", clean[0][0]) and label == 0
    sample = datamodule.train_dataset[0]
    assert sample["image"].shape == (3, 32, 32) and sample["label"] == 0
    assert datamodule.state_dict() == {"landmark_ids": datamodule.landmark_ids}
    half = GLDv2DataModule(str(mini_gldv2), class_fraction=0.5)
    assert half.landmark_ids == datamodule.landmark_ids[:20] and half.run_name == "train_clean_0.5"
    with pytest.raises(ValueError, match="other landmark ids"):
        half.load_state_dict(datamodule.state_dict())


def test_retrieval_split_has_the_solution_queries_and_the_index(mini_gldv2):
    datamodule = GLDv2DataModule(str(mini_gldv2), num_workers=0, image_size=32)
    datamodule.setup("test")
    sets = datamodule.eval_sets()
    assert list(sets) == ["test", "index"] and len(sets["index"]) == 100
    assert len(sets["test"]) == 40  # 13 Public + 27 Private; the 6 Ignored queries are not extracted
    assert len(datamodule.solution["public"]) + len(datamodule.solution["private"]) == 40
    assert GLDv2DataModule(str(mini_gldv2), queries="all").query_ids.__len__() == 46


def _copy(mini: Path, tmp_path: Path) -> Path:
    root = tmp_path / "gldv2"
    shutil.copytree(mini, root)
    return root


def test_missing_training_images_are_listed_or_skipped_and_counted(mini_gldv2, tmp_path, caplog):
    root = _copy(mini_gldv2, tmp_path)
    gone = [hashed_path(root, "train", identifier) for identifier, _ in read_training_list(root / "train_clean.csv")[:7]]
    for path in gone:
        path.unlink()
    with pytest.raises(FileNotFoundError, match=r"7 of the 200 training images listed in .*train_clean\.csv are missing") as error:
        GLDv2DataModule(str(root)).setup("fit")
    assert str(gone[0]) in str(error.value) and "skip_missing" in str(error.value)
    datamodule = GLDv2DataModule(str(root), skip_missing=True)
    datamodule.setup("fit")
    assert len(datamodule.train_dataset) == 193 and datamodule.describe()["missing_training_images"] == 7
    assert "7 listed training images are missing" in caplog.text


def test_malformed_rows_and_missing_files_name_the_file(mini_gldv2, tmp_path):
    root = _copy(mini_gldv2, tmp_path)
    with open(root / "train.csv", "a") as f:
        f.write("abc,http://x\n")
    with pytest.raises(ValueError, match=r"train\.csv line 242: expected 3 fields"):
        GLDv2DataModule(str(root), train_file="train.csv").num_classes
    (root / "train_clean.csv").write_text("landmark_id,images\nx12,abc\n")
    with pytest.raises(ValueError, match=r"train_clean\.csv line 2: landmark_id must be an integer"):
        GLDv2DataModule(str(root)).num_classes
    (root / "index.csv").unlink()
    with pytest.raises(FileNotFoundError, match="index.csv"):
        GLDv2DataModule(str(root)).setup("test")


def test_revisited_queries_are_cropped_to_their_box_and_not_in_the_database(mini_revisited):
    datamodule = RevisitedDataModule(str(mini_revisited), num_workers=0, image_size=64)
    datamodule.setup("test")
    sets = datamodule.eval_sets()
    gnd = datamodule.ground_truth
    assert len(sets["query"]) == 10 and len(sets["database"]) == len(gnd["imlist"]) == 90
    query_names = {Path(p).stem for p in sets["query"].paths}
    assert not query_names & {Path(p).stem for p in sets["database"].paths}
    x1, y1, x2, y2 = (int(v) for v in gnd["gnd"][0]["bbx"])
    full = read_image(sets["query"].paths[0])
    assert full.shape[:2] == (128, 128) and (x2 - x1, y2 - y1) == (64, 64)
    torch.testing.assert_close(sets["query"][0]["image"], evaluation_image(np.ascontiguousarray(full[y1:y2, x1:x2]), 64))
    with_r1m = RevisitedDataModule(str(mini_revisited), distractors=True)
    assert len(with_r1m.eval_sets()["database"]) == 110 and with_r1m.run_name == "roxford5k+1m"


def test_revisited_layout_errors_name_what_is_missing(mini_revisited, tmp_path):
    with pytest.raises(FileNotFoundError, match="gnd_rparis6k.pkl"):
        RevisitedDataModule(str(mini_revisited), dataset="rparis6k").setup("test")
    root = tmp_path / "revisited"
    shutil.copytree(mini_revisited, root)
    with open(root / "roxford5k/gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": [{"bbx": [0, 0, 1, 1]}]}, f)
    with pytest.raises(ValueError, match=r"gnd\[0\] needs bbx, easy, hard and junk"):
        RevisitedDataModule(str(root)).setup("test")
    shutil.copy(mini_revisited / "roxford5k/gnd_roxford5k.pkl", root / "roxford5k/gnd_roxford5k.pkl")
    (root / "revisitop1m/revisitop1m.txt").unlink()
    with pytest.raises(FileNotFoundError, match="revisitop1m.txt"):
        RevisitedDataModule(str(root), distractors=True).setup("test")
    (root / "roxford5k/jpg/roxford5k_000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="roxford5k_000003.jpg"):
        RevisitedDataModule(str(root)).setup("test")


def test_old_new_splits_are_drawn_by_seed_and_written_to_the_run_directory(mini_gldv2, tmp_path):
    full = GLDv2DataModule(str(mini_gldv2), num_workers=0)
    by_class = [GLDv2DataModule(str(mini_gldv2), class_fraction=0.3, split_seed=seed) for seed in (0, 0, 1)]
    assert by_class[0].landmark_ids == by_class[1].landmark_ids != by_class[2].landmark_ids
    assert len(by_class[0].landmark_ids) == 12 and set(by_class[0].landmark_ids) < set(full.landmark_ids)
    assert by_class[0].landmark_ids != full.landmark_ids[:12] and by_class[0].run_name == "train_clean_0.3_seed0"
    by_data = GLDv2DataModule(str(mini_gldv2), image_fraction=0.4, split_seed=3)
    per_landmark = {}
    for identifier, landmark in by_data._training_list:
        per_landmark.setdefault(landmark, []).append(identifier)
    assert by_data.landmark_ids == full.landmark_ids and all(len(ids) == 2 for ids in per_landmark.values())  # 5 photos each
    first = GLDv2DataModule(str(mini_gldv2), image_fraction=0.4)._training_list
    assert set(by_data._training_list) != set(first)

    class Trainer:
        default_root_dir, is_global_zero = str(tmp_path / "run"), True

    by_data.trainer = Trainer()
    by_data.setup("fit")
    rows = (tmp_path / "run/training_split.csv").read_text().splitlines()
    assert rows[0] == "id,landmark_id" and sorted(rows[1:]) == sorted(f"{i},{l}" for i, l in by_data._training_list)
