"""UCF101: the split and class-index pitfalls, clip positions and shapes, both decoding
backends returning the requested frames, and corrupt videos (an error naming the file, or
skipped and counted)."""

from __future__ import annotations

import shutil
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.clips import ColorAugment, clip_indices, random_start, train_clip, uniform_starts
from datamodules.formats.images import CorruptFileError
from datamodules.formats.video import VideoReader
from datamodules.mini.ucf101 import write_avi
from datamodules.ucf101 import UCF101DataModule, read_class_index, read_split_list

BACKENDS = ["torchcodec", "decord", "pyav"]
SMALL_CLIPS = {"num_frames": 4, "frame_stride": 2, "image_size": 32, "resize": 40, "batch_size": 4, "num_workers": 0}


@pytest.fixture()
def ucf_copy(mini_ucf101, tmp_path) -> Path:
    """A copy of the mini set that a test may break."""
    shutil.copytree(mini_ucf101, tmp_path / "ucf101")
    return tmp_path / "ucf101"


def _numbered_video(path: Path, num_frames: int = 30) -> Path:
    """Frame t is uniformly grey with brightness 8·t: a frame's index can be read back."""
    write_avi(path, np.stack([np.full((48, 64, 3), 8 * t, np.uint8) for t in range(num_frames)]))
    return path


def test_class_index_keeps_its_case_insensitive_order_and_labels_are_0_based(mini_ucf101):
    lists = mini_ucf101 / "ucfTrainTestlist"
    classes = read_class_index(lists / "classInd.txt")  # the file has CRLF line ends
    assert classes == ["Hammering", "HammerThrow", "HandstandPushups", "JumpingJack", "JumpRope"]
    assert sorted(classes) != classes  # what torchvision's sorted(list_dir(root)) would do wrong
    train = read_split_list(lists / "trainlist01.txt", classes, mini_ucf101)
    handstand = [r for r in train if r.label == 2]
    assert handstand and all(r.path.is_file() and r.path.name.startswith("v_HandStandPushups_") for r in handstand)
    assert {r.label for r in train} == set(range(5))
    assert [r.label for r in train if r.name.startswith("JumpRope/")][0] == 4
    assert all(r.root == mini_ucf101 and r.video_folder == mini_ucf101 / "UCF-101" for r in train)


def test_split_k_tests_on_groups_7k_minus_6_to_7k(mini_ucf101):
    for split in (1, 2, 3):
        datamodule = UCF101DataModule(str(mini_ucf101), split=split)
        groups = {int(r.name.split("_g")[1][:2]) for r in datamodule.records("test")}
        assert groups == set(range(7 * split - 6, 7 * split + 1))
        assert not {r.name for r in datamodule.records("train")} & {r.name for r in datamodule.records("test")}


def test_bad_lists_name_the_file_and_line(ucf_copy):
    lists = ucf_copy / "ucfTrainTestlist"
    lines = (lists / "trainlist01.txt").read_text().splitlines()
    lines[3] = lines[3].rsplit(" ", 1)[0] + " 5"  # a Hammering video labelled as JumpRope
    (lists / "trainlist01.txt").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"trainlist01.txt:4: label 5 disagrees with classInd.txt"):
        UCF101DataModule(str(ucf_copy)).setup("fit")
    (lists / "classInd.txt").write_text("1 Hammering\n3 HammerThrow\n")
    with pytest.raises(ValueError, match=r"classInd.txt:2: expected index 2"):
        UCF101DataModule(str(ucf_copy)).num_classes


def test_missing_layout_lists_what_is_expected(ucf_copy, tmp_path):
    (ucf_copy / "ucfTrainTestlist/testlist02.txt").unlink()
    with pytest.raises(FileNotFoundError, match="testlist02.txt"):
        UCF101DataModule(str(ucf_copy), split=2).setup("fit")
    video = next((ucf_copy / "UCF-101/JumpRope").iterdir())
    video.unlink()
    with pytest.raises(FileNotFoundError, match=video.name):
        UCF101DataModule(str(ucf_copy)).setup("fit")


def test_test_list_video_in_train_list_is_a_leak(ucf_copy):
    lists = ucf_copy / "ucfTrainTestlist"
    leaked = (lists / "testlist01.txt").read_text().splitlines()[0]
    with open(lists / "trainlist01.txt", "a") as f:
        f.write(f"{leaked} 1\r\n")
    with pytest.raises(ValueError, match="in both the train and the test list"):
        UCF101DataModule(str(ucf_copy)).setup("fit")


def test_clip_positions():
    assert clip_indices(3, 4, 2, 100) == [3, 5, 7, 9]
    assert clip_indices(0, 4, 3, 7) == [0, 3, 6, 6]  # past the end the last frame repeats
    assert uniform_starts(100, 21, 3) == [0, 40, 79]  # centres at 10.5, 50, 89.5
    assert uniform_starts(15, 21, 2) == [0, 0]
    generator = torch.Generator().manual_seed(0)
    starts = {random_start(30, 21, generator) for _ in range(200)}
    assert starts == set(range(10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_return_the_requested_frames(tmp_path, backend):
    _skip_without(backend)
    reader = VideoReader(_numbered_video(tmp_path / "numbered.avi"), backend)
    assert len(reader) == 30
    frames = reader.frames([29, 0, 13, 13, 4])
    assert frames.shape == (5, 48, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(frames.reshape(5, -1).mean(1) / 8, [29, 0, 13, 13, 4], atol=0.5)
    with pytest.raises(IndexError, match="out of range"):
        reader.frames([30])


def test_auto_takes_torchcodec_where_it_loads_else_decord_and_says_why(mini_ucf101, monkeypatch, caplog):
    from datamodules.formats import video

    caplog.set_level("INFO", logger="lightning.pytorch.utilities.rank_zero")
    monkeypatch.setattr(video, "torchcodec_unavailable", lambda: "OSError: libavutil.so.57: cannot open shared object file")
    assert video.resolve_backend("auto") == "decord"
    with pytest.raises(RuntimeError, match=r"torchcodec cannot load \(OSError: libavutil.*apt-get install libavcodec59"):
        video.resolve_backend("torchcodec")
    UCF101DataModule(str(mini_ucf101), **SMALL_CLIPS).setup("fit")
    assert "UCF101 videos decoded with decord (torchcodec unavailable: OSError: libavutil" in caplog.text
    monkeypatch.setattr(video, "torchcodec_unavailable", lambda: None)
    assert video.resolve_backend("auto") == "torchcodec"
    with pytest.raises(ValueError, match="backend must be"):
        video.resolve_backend("opencv")


def test_one_spatial_transform_for_all_frames_of_a_clip():
    still = np.repeat(np.random.default_rng(0).integers(0, 256, (1, 40, 50, 3), dtype=np.uint8), 6, axis=0)
    clip = train_clip(still, 24, torch.Generator().manual_seed(1), scale=(0.2, 0.5))
    assert clip.shape == (3, 6, 24, 24)
    for t in range(1, 6):
        torch.testing.assert_close(clip[:, t], clip[:, 0])


def test_color_augment_draws_once_per_clip_and_checks_its_options():
    clip = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(ColorAugment(p_jitter=0, p_gray=0, p_blur=0)(clip, torch.Generator()), clip)
    gray = ColorAugment(p_jitter=0, p_gray=1, p_blur=0)(clip, torch.Generator())
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])  # every frame
    still = clip[:1].repeat(4, 1, 1, 1)
    jittered = ColorAugment(p_jitter=1, p_gray=0, p_blur=1)(still, torch.Generator().manual_seed(0))
    assert not torch.equal(jittered, still)
    assert all(torch.equal(jittered[0], frame) for frame in jittered)  # one draw: equal frames stay equal
    with pytest.raises(ValueError, match="color.p_gray"):
        ColorAugment(p_gray=1.5)
    with pytest.raises(ValueError, match="color.blur_sigma"):
        ColorAugment(blur_sigma=(2.0, 0.1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaders_give_clips_with_labels_paths_and_video_positions(mini_ucf101, backend):
    _skip_without(backend)
    datamodule = UCF101DataModule(str(mini_ucf101), test_clips=3, test_gallery=True, backend=backend, **SMALL_CLIPS)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["video"].shape == (4, 3, 4, 32, 32) and batch["video"].dtype == torch.float32
    assert all(Path(p).is_file() for p in batch["path"]) and batch["label"].shape == (4,)
    gallery, queries = datamodule.test_dataloader()
    assert len(gallery.dataset) == 90 * 3 and len(queries.dataset) == 35 * 3
    batch = next(iter(queries))
    assert batch["video_index"].tolist() == [0, 0, 0, 1] and batch["clip_index"].tolist() == [0, 1, 2, 0]
    assert not torch.equal(batch["video"][0], batch["video"][1])  # three positions in the video


def _skip_without(backend: str) -> None:
    from datamodules.formats.video import torchcodec_unavailable

    if backend == "torchcodec" and torchcodec_unavailable() and os.environ.get("CI") != "true":
        pytest.skip(f"torchcodec does not load here ({torchcodec_unavailable()}); `make ffmpeg` installs its libraries")


def _corrupt_one(root: Path, which: str) -> Path:
    name = (root / f"ucfTrainTestlist/{which}list01.txt").read_text().splitlines()[0].split()[0]
    path = root / "UCF-101" / name
    path.write_bytes(b"RIFF" + bytes(range(256)) * 8)
    return path


def test_corrupt_video_is_an_error_naming_it(ucf_copy):
    path = _corrupt_one(ucf_copy, "test")
    datamodule = UCF101DataModule(str(ucf_copy), **SMALL_CLIPS)
    datamodule.setup("test")
    with pytest.raises(CorruptFileError, match=path.name):
        next(iter(datamodule.test_dataloader()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_truncated_video_is_corrupt_not_a_still_clip(ucf_copy, backend):
    _skip_without(backend)
    """Cut at half its bytes, an AVI still declares all its frames but reads as one; clip
    sampling would repeat that frame into a still clip."""
    name = (ucf_copy / "ucfTrainTestlist/testlist01.txt").read_text().splitlines()[0].split()[0]
    path = ucf_copy / "UCF-101" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match=rf"{path.name} is truncated: its header declares \d+ frames, 1 can be read"):
        VideoReader(path, backend)
    datamodule = UCF101DataModule(str(ucf_copy), skip_corrupt=True, test_clips=1, backend=backend, **SMALL_CLIPS)
    datamodule.setup("test")
    assert sum(len(b["label"]) for b in datamodule.test_dataloader()) == 35 - 1 and datamodule.num_skipped == 1


def test_skip_corrupt_counts_and_leaves_out_or_replaces(ucf_copy):
    _corrupt_one(ucf_copy, "test")
    _corrupt_one(ucf_copy, "train")
    datamodule = UCF101DataModule(str(ucf_copy), skip_corrupt=True, test_clips=2, **SMALL_CLIPS)
    datamodule.setup("fit")
    test_batches = list(datamodule.test_dataloader())
    assert sum(len(b["label"]) for b in test_batches) == (35 - 1) * 2  # the corrupt video's clips left out
    assert datamodule.num_skipped == 1
    train_dataset = datamodule.datasets["train"]
    sample = train_dataset[0]  # the corrupt one, replaced by another video
    assert sample["video"].shape == (3, 4, 32, 32) and sample["video_index"] != 0
    assert datamodule.num_skipped == 2
