"""MOTChallenge reader: every gt.txt column, the errors naming file and line, the half split,
one detector folder per sequence, ids unique across sequences, variable boxes per image, and
other data without detector suffixes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from datamodules.mot17 import (MOT17DataModule, collate_frames, letterbox, pedestrian_rows, read_ground_truth,
                               read_seqinfo, scan_sequence, split_half)


def test_every_gt_column_is_read_and_training_keeps_considered_pedestrians(mini_mot17):
    folder = mini_mot17 / "train/MOT17-02-FRCNN"
    info = read_seqinfo(folder / "seqinfo.ini")
    assert (info.frame_rate, info.length, info.width, info.height, info.image_ext) == (30.0, 24, 160, 96, ".jpg")
    gt = read_ground_truth(folder / "gt/gt.txt", info.length)
    assert gt.shape[1] == 9 and set(np.unique(gt[:, 7])) == {1, 3, 7}  # pedestrians, a car, a static person
    assert set(np.unique(gt[:, 6])) == {0, 1} and ((gt[:, 8] >= 0) & (gt[:, 8] <= 1)).all() and (gt[:, 8] < 1).any()
    kept = pedestrian_rows(gt)
    assert (kept[:, 7] == 1).all() and (kept[:, 6] == 1).all() and len(kept) < len(gt)


def _copy(mini_mot17, tmp_path):
    root = tmp_path / "MOT17"
    shutil.copytree(mini_mot17, root)
    return root


def test_errors_name_the_file_and_line(mini_mot17, tmp_path):
    root = _copy(mini_mot17, tmp_path)
    folder = root / "train/MOT17-02-FRCNN"
    lines = (folder / "gt/gt.txt").read_text().splitlines()
    (folder / "gt/gt.txt").write_text("\n".join(lines[:2] + ["3,1,4.0,10.8,14.0"] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"MOT17-02-FRCNN/gt/gt\.txt:3: '3,1,4\.0,10\.8,14\.0'; expected 9 numbers"):
        scan_sequence(folder, require_gt=True)
    (folder / "gt/gt.txt").write_text("\n".join(lines[:4] + ["99,1,4.0,10.8,14.0,36.0,1,1,1"]) + "\n")
    with pytest.raises(ValueError, match=r"gt\.txt:5: frame 99 beyond seqLength 24"):
        scan_sequence(folder, require_gt=True)
    (folder / "gt/gt.txt").write_text("\n".join(lines) + "\n")
    ini = (folder / "seqinfo.ini").read_text()
    (folder / "seqinfo.ini").write_text(ini.replace("frameRate=30\n", ""))
    with pytest.raises(ValueError, match=r"seqinfo\.ini: missing key\(s\) frameRate"):
        scan_sequence(folder, require_gt=True)
    (folder / "seqinfo.ini").write_text(ini)
    (folder / "img1/000007.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"img1/000007\.jpg: missing"):
        scan_sequence(folder, require_gt=True)


def test_half_split_trains_on_the_first_half_and_scores_the_second_renumbered(mini_mot17):
    sequence = scan_sequence(mini_mot17 / "train/MOT17-04-FRCNN", require_gt=True)  # 26 frames
    train, val = split_half(sequence)
    assert len(train.frames) == 14 and len(val.frames) == 12 and val.frames[0].name == "000015.jpg"
    assert train.ground_truth[:, 0].max() <= 14 and val.ground_truth[:, 0].min() == 1 and val.ground_truth[:, 0].max() == 12
    original = sequence.ground_truth[sequence.ground_truth[:, 0] == 15]
    np.testing.assert_array_equal(val.ground_truth[val.ground_truth[:, 0] == 1][:, 1:], original[:, 1:])


def test_one_detector_folder_per_sequence_and_ids_unique_across_sequences(mini_mot17):
    data = MOT17DataModule(str(mini_mot17), image_size=(96, 160), num_workers=0)
    data.setup("fit")
    assert [s.name for s in data.eval_sequences.sequences] == ["MOT17-02-FRCNN", "MOT17-04-FRCNN", "MOT17-05-FRCNN",
                                                                "MOT17-09-FRCNN"]
    ids_per_sequence = [np.unique(np.concatenate([b[:, 4] for b in frames.values()])) for frames in data.train_frames.boxes_by_frame]
    assert sum(len(ids) for ids in ids_per_sequence) == data.num_ids == len(np.unique(np.concatenate(ids_per_sequence)))
    batch = collate_frames([data.train_frames[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 96, 160) and len(batch["boxes"]) == 3
    for boxes, ids in zip(batch["boxes"], batch["track_ids"]):
        assert boxes.shape == (len(ids), 4) and (boxes[:, 2:] > boxes[:, :2]).all() and (ids < data.num_ids).all()
    every = MOT17DataModule(str(mini_mot17), detector=None, protocol="full", eval_split="test")
    every.setup("test")
    assert len(every.eval_sequences.sequences) == 6 and every.eval_sequences[0].annotations.ground_truth is None


def test_other_data_without_detector_suffixes(mini_mot17, tmp_path):
    root = tmp_path / "MOT20"
    shutil.copytree(mini_mot17 / "train/MOT17-02-SDP", root / "train/MOT20-01")
    with pytest.raises(FileNotFoundError, match=r"no sequence folder ending in -FRCNN; .*data\.detector null"):
        MOT17DataModule(str(root)).setup("fit")
    data = MOT17DataModule(str(root), detector=None, benchmark_name="MOT20", image_size=(96, 160))
    data.setup("fit")
    assert [s.name for s in data.eval_sequences.sequences] == ["MOT20-01"]


def test_letterbox_keeps_the_aspect_ratio_on_grey():
    image = np.full((100, 400, 3), 255, np.uint8)
    boxed, scale, (left, top) = letterbox(image, (96, 160))
    assert boxed.shape == (96, 160, 3) and scale == pytest.approx(0.4) and (left, top) == (0.0, 28.0)
    assert (boxed[:28] == 127).all() and (boxed[28:68] == 255).all()
