"""VOS training clips from DAVIS, YouTube-VOS and static images: the layouts read and what breaks
them named, YouTube-VOS's skip in its own frame step, static clips as deformations, the sources
mixed in one epoch, and their config errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import datamodules.vos_clips as vos_clips
from benchmarks.metrics.davis import read_annotation
from datamodules.davis import DAVISDataModule
from datamodules.vos_clips import ClipSource, VOSClips, frame_step, scan_image_masks, scan_youtube_vos

CLIPS = dict(num_frames=3, crop_size=32, max_skip=10, skip_every_epochs=1, max_objects=3)


def test_youtube_vos_videos_are_read_with_their_frame_step(mini_data, tmp_path):
    records = scan_youtube_vos(mini_data / "youtube_vos")
    assert len(records) == 4 and all(len(r.frames) == 6 for r in records)
    assert records[0].frame_names[:3] == ["00000", "00005", "00010"] and frame_step(records) == 5
    root = tmp_path / "ytvos"
    shutil.copytree(mini_data / "youtube_vos", root)
    (root / "train/JPEGImages/video01/00010.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"video01/00010\.jpg: the frame of annotation .*video01/00010\.png"):
        scan_youtube_vos(root)
    with pytest.raises(FileNotFoundError, match=r"(?s)YouTube-VOS layout .* incomplete.*valid/JPEGImages"):
        scan_youtube_vos(root, "valid")


def test_youtube_vos_skip_is_counted_in_davis_frames(mini_data, monkeypatch):
    """At epoch 7 the DAVIS skip is 7; YouTube-VOS clips skip 7 // 5 = 1 annotated frame."""
    skips = []
    original = vos_clips.clip_frames
    monkeypatch.setattr(vos_clips, "clip_frames", lambda length, n, skip, g: skips.append(skip) or original(length, n, skip, g))
    records = scan_youtube_vos(mini_data / "youtube_vos")
    clips = VOSClips([ClipSource("youtube_vos", records, 1, frame_step(records))], **CLIPS)
    item = clips[7 * len(clips)]  # the index carries the epoch
    assert skips == [1] and item["frames"].shape == (3, 3, 32, 32)


def test_static_images_become_clips_of_deformed_frames(mini_data):
    records = scan_image_masks(mini_data / "vos_images")
    assert len(records) == 8
    clips = VOSClips([ClipSource("static_images", records, 2, static=True)], **CLIPS, static_deformation=0.2)
    assert len(clips) == 16
    item = clips[0]
    frames, masks = item["frames"], item["masks"]
    assert item["num_objects"] >= 1 and (masks[0] == 1).any()
    assert not torch.equal(frames[0], frames[1]) and not torch.equal(masks[1], masks[2])  # each frame deformed again
    for t in range(3):  # the objects stay labelled 1..n (or void) in every deformation
        assert set(masks[t].unique().tolist()) <= {0, 255, *range(1, item["num_objects"] + 1)}


def test_image_mask_folder_errors_and_grayscale_masks(mini_data, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(mini_data / "vos_images", root)
    (root / "masks/image003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"masks/image003\.png: the mask of .*image003\.jpg is missing"):
        scan_image_masks(root)
    with pytest.raises(FileNotFoundError, match=r"(?s)image\+mask folder layout .* incomplete.*masks"):
        scan_image_masks(tmp_path / "nothing")
    saliency = np.zeros((8, 8), np.uint8)
    saliency[2:6, 2:6] = 255  # a saliency (or DAVIS 2016 package) mask: 255 is the object, not void
    Image.fromarray(saliency, mode="L").save(root / "masks/image003.png")
    assert np.array_equal(read_annotation(root / "masks/image003.png"), (saliency > 0).astype(np.uint8))


def test_the_sources_mix_in_one_epoch(mini_data):
    data = DAVISDataModule(str(mini_data / "davis"), train_sources=["davis", "youtube_vos", "static_images"],
                           clips_per_sequence=2, youtube_vos_root=str(mini_data / "youtube_vos"), youtube_vos_clips_per_video=3,
                           static_images_root=str(mini_data / "vos_images"), crop_size=32)
    data.setup("fit")
    clips = data.train_clips
    assert [(s.name, len(s)) for s in clips.sources] == [("davis", 20), ("youtube_vos", 12), ("static_images", 8)]
    assert len(clips) == 40
    assert clips.source_of(19)[0].name == "davis" and clips.source_of(20)[0].name == "youtube_vos"
    assert clips.source_of(39)[0].name == "static_images" and clips.sources[1].frame_step == 5
    for index in (0, 25, 39):
        assert clips[index]["frames"].shape == (3, 3, 32, 32)


def test_source_config_errors_name_the_key(mini_data):
    with pytest.raises(ValueError, match=r"data\.train_sources has youtube_vos: give its folder as data\.youtube_vos_root"):
        DAVISDataModule(str(mini_data / "davis"), train_sources=["davis", "youtube_vos"])
    with pytest.raises(ValueError, match=r"data\.train_sources must be a non-empty list"):
        DAVISDataModule(str(mini_data / "davis"), train_sources=["coco"])
