"""DAVIS reader: the layout checked and what breaks it named, the 2016 split lists, whole
sequences as evaluation items, and the sequences shared out over ranks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.metrics.davis import score_results_folder, sequence_names
from datamodules.davis import DAVISDataModule
from datamodules.sequences import SequenceShards


def test_sequences_are_served_whole_with_the_first_frame_masks(mini_davis):
    datamodule = DAVISDataModule(str(mini_davis), num_workers=0)
    datamodule.setup("test")
    item = datamodule.sequences[2]
    assert item.name == "val-02" and item.frames.shape == (12, 48, 80, 3) and item.annotations.shape == (12, 48, 80)
    assert item.frame_names[:2] == ["00000", "00001"] and item.num_objects == 3
    assert set(np.unique(item.annotations)) == {0, 1, 2, 3, 255}  # objects and their void borders
    assert np.array_equal(item.first_masks, np.where(item.annotations[0] == 255, 0, item.annotations[0]))
    merged = DAVISDataModule(str(mini_davis), year=2016)
    merged.setup("test")
    assert set(np.unique(merged.sequences[2].annotations)) == {0, 1, 255}  # one object in 2016
    assert DAVISDataModule(str(mini_davis), task="unsupervised").run_name == "2017_val_unsupervised"


def test_the_2016_package_binary_masks_are_objects_not_void(mini_davis, tmp_path):
    """DAVIS 2016 ships grayscale 0/255 masks (255 the object) and ImageSets/480p lists of frame
    pairs: read as one object, and a results folder equal to them scores J = F = 1."""
    root = tmp_path / "DAVIS2016"
    (root / "ImageSets/480p").mkdir(parents=True)
    pairs = []
    for sequence in ("val-00", "val-01"):
        shutil.copytree(mini_davis / "JPEGImages/480p" / sequence, root / "JPEGImages/480p" / sequence)
        for png in sorted((mini_davis / "Annotations/480p" / sequence).glob("*.png")):
            labels = np.array(Image.open(png))
            target = root / "Annotations/480p" / sequence / png.name
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.where((labels > 0) & (labels < 255), 255, 0).astype(np.uint8), mode="L").save(target)
            pairs.append(f"/JPEGImages/480p/{sequence}/{png.stem}.jpg /Annotations/480p/{sequence}/{png.name}")
    (root / "ImageSets/480p/val.txt").write_text("\n".join(pairs) + "\n")
    datamodule = DAVISDataModule(str(root), year=2016)
    datamodule.setup("test")
    assert set(np.unique(datamodule.sequences[0].annotations)) == {0, 1}
    rows = score_results_folder(root, root / "Annotations/480p", year=2016)
    assert len(rows) == 2 and all(row["J-Mean"] == 1.0 and row["F-Mean"] == 1.0 for row in rows)


def test_sequence_shards_put_each_sequence_on_one_rank_longest_first():
    lengths = [10, 50, 20, 30, 40]
    shards = [SequenceShards(lengths, 2, rank) for rank in range(2)]
    assert list(shards[0]) == [1, 2, 0] and list(shards[1]) == [4, 3]  # 50+20+10 against 40+30
    assert sorted(i for shard in shards for i in shard) == list(range(5))


def test_2016_split_lists_of_frame_pairs_give_their_sequences(tmp_path):
    split = tmp_path / "val.txt"
    split.write_text("/JPEGImages/480p/blackswan/00000.jpg /Annotations/480p/blackswan/00000.png\n"
                     "/JPEGImages/480p/blackswan/00001.jpg /Annotations/480p/blackswan/00001.png\n"
                     "/JPEGImages/480p/bmx-trees/00000.jpg /Annotations/480p/bmx-trees/00000.png\n")
    assert sequence_names(split) == ["blackswan", "bmx-trees"]


def _copy(mini: Path, tmp_path: Path) -> Path:
    root = tmp_path / "DAVIS"
    shutil.copytree(mini, root)
    return root


def test_layout_errors_name_the_file(mini_davis, tmp_path):
    root = _copy(mini_davis, tmp_path)
    (root / "Annotations/480p/val-01/00004.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"val-01/00004\.png: the annotation of frame 00004\.jpg"):
        DAVISDataModule(str(root)).setup("test")
    shutil.copy(mini_davis / "Annotations/480p/val-01/00004.png", root / "Annotations/480p/val-01/00004.png")
    (root / "JPEGImages/480p/val-01/00003.jpg").rename(root / "JPEGImages/480p/val-01/00030.jpg")
    with pytest.raises(ValueError, match=r"00004\.jpg: frame 3 of val-01 was expected as 00003\.jpg"):
        DAVISDataModule(str(root)).setup("test")
    (root / "JPEGImages/480p/val-01/00030.jpg").rename(root / "JPEGImages/480p/val-01/00003.jpg")
    Image.open(mini_davis / "Annotations/480p/val-01/00002.png").convert("RGB").save(root / "Annotations/480p/val-01/00002.png")
    datamodule = DAVISDataModule(str(root))
    datamodule.setup("test")
    with pytest.raises(ValueError, match=r"val-01/00002\.png: a RGB PNG"):
        datamodule.sequences[1]
    shutil.rmtree(root / "JPEGImages/480p/val-03")
    (root / "ImageSets/2016/val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)missing:.*ImageSets/2016/val\.txt"):
        DAVISDataModule(str(root), year=2016).setup("test")
    with pytest.raises(FileNotFoundError, match=r"(?s)missing:.*JPEGImages/480p/val-03"):
        DAVISDataModule(str(root)).setup("test")
