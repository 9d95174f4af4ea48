"""The zero-shot DAVIS DataModule's frame pairs (HCPN, HGPU): every consecutive pair of the train
sequences with the flow of its first frame, augmented alike; the hard-negative maps from HED edge
maps or Sobel edges, zero on the object; errors naming a missing edge map and a missing file of a
plain video folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.davis_zero_shot import ZeroShotDAVISDataModule, folder_pairs


def _pairs(mini_davis: Path, **kwargs) -> ZeroShotDAVISDataModule:
    datamodule = ZeroShotDAVISDataModule(str(mini_davis), flow_root=str(mini_davis / "FlowImages/480p"),
                                         training_items="pairs", crop_size=64, **kwargs)
    datamodule.setup("fit")
    return datamodule


def test_pairs_cover_every_consecutive_frame_pair_with_the_first_frame_s_flow(mini_davis):
    datamodule = _pairs(mini_davis)
    records = datamodule._records("train", "Annotations")
    pairs = datamodule.train_frames.samples
    assert len(pairs) == sum(len(r.frames) - 1 for r in records)
    frame1, frame2, flow, annotation1, annotation2, edges1, edges2 = pairs[3]
    assert (frame1.stem, frame2.stem, flow.stem, annotation2.stem) == ("00003", "00004", "00003", "00004")
    assert edges1 is None and edges2 is None  # Sobel edges
    torch.manual_seed(0)
    item = datamodule.train_frames[3]
    assert {k: tuple(v.shape) for k, v in item.items()} == {
        "image": (3, 64, 64), "image2": (3, 64, 64), "flow": (3, 64, 64), "mask": (64, 64), "mask2": (64, 64),
        "hard_negatives": (64, 64), "hard_negatives2": (64, 64)}
    for mask, hard in ((item["mask"], item["hard_negatives"]), (item["mask2"], item["hard_negatives2"])):
        assert set(mask.unique().tolist()) <= {0, 1, 255} and mask.eq(1).any()
        assert (hard[mask == 1] == 0).all() and hard.max() > 0.5


def test_hed_edge_maps_are_read_and_a_missing_one_is_named(mini_davis, tmp_path):
    edges = tmp_path / "hed"
    for sequence in (mini_davis / "JPEGImages/480p").iterdir():
        (edges / sequence.name).mkdir(parents=True)
        for frame in sequence.iterdir():
            Image.fromarray(np.full((48, 80), 255, np.uint8)).save(edges / sequence.name / f"{frame.stem}.png")
    datamodule = _pairs(mini_davis, edge_root=str(edges))
    assert datamodule.train_frames.samples[0][5] == edges / "train-00/00000.png"
    item = datamodule.train_frames[0]
    assert item["hard_negatives"].max() == 0 and item["hard_negatives2"].max() == 0  # edges everywhere: no hard negatives
    (edges / "train-01/00002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"hed/train-01/00002\.jpg \(or \.png\).*edge map"):
        _pairs(mini_davis, edge_root=str(edges))


def test_a_plain_video_folder_gives_its_pairs_and_names_a_missing_file(mini_davis, tmp_path):
    root = tmp_path / "extra"
    for folder, source in (("images", "JPEGImages/480p"), ("flows", "FlowImages/480p"), ("masks", "Annotations/480p")):
        shutil.copytree(mini_davis / source / "train-00", root / folder / "clip")
    pairs = folder_pairs(root)
    assert len(pairs) == len(list((root / "images/clip").iterdir())) - 1
    datamodule = _pairs(mini_davis, extra_train_root=str(root))
    assert len(datamodule.train_frames) == len(_pairs(mini_davis).train_frames) + len(pairs)
    (root / "flows/clip/00002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"flows/clip/00002\.png: missing for the pair 00002.jpg, 00003.jpg"):
        folder_pairs(root)
    with pytest.raises(FileNotFoundError, match=r"masks"):
        folder_pairs(tmp_path / "nowhere")
