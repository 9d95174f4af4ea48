"""The mini MS1M writer: insightface layout, balanced verification pairs of unseen identities,
determinism, and perturbations strong enough that raw pixels do not solve verification."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from benchmarks.metrics.face import verification_accuracy
from datamodules.formats.images import decode_image
from datamodules.formats.recordio import (
    RecordIOReader,
    check_insightface_rec,
    image_keys,
    read_image_record,
    read_property,
)
from datamodules.formats.verification_bin import read_verification_bin
from datamodules.mini.__main__ import main
from datamodules.mini.ms1m import VAL_SETS, split_identities, write_ms1m

COUNTS = {"num_identities": 8, "images_per_identity": 4, "num_val_identities": 10, "num_val_pairs": 100}
FILES = {"train.rec", "train.idx", "property", "lfw.bin", "cfp_fp.bin", "agedb_30.bin"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ms1m(tmp_path_factory.mktemp("mini") / "ms1m", **COUNTS)


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_insightface_layout(root: Path) -> None:
    assert {p.name for p in root.iterdir()} == FILES
    assert read_property(root / "property") == (COUNTS["num_identities"], 112, 112)
    with RecordIOReader(root / "train.rec", root / "train.idx") as reader:
        num_images = COUNTS["num_identities"] * COUNTS["images_per_identity"]
        check_insightface_rec(reader, COUNTS["num_identities"], num_images)
        labels = Counter()
        for key in image_keys(reader):
            label, payload = read_image_record(reader, key)
            labels[label] += 1
            assert decode_image(payload).shape == (112, 112, 3)
    assert labels == {label: COUNTS["images_per_identity"] for label in range(COUNTS["num_identities"])}


@pytest.mark.parametrize("name", VAL_SETS)
def test_verification_sets_are_balanced_pairs(root: Path, name: str) -> None:
    images, issame = read_verification_bin(root / f"{name}.bin")
    assert len(images) == 2 * COUNTS["num_val_pairs"] and issame.shape == (COUNTS["num_val_pairs"],)
    assert issame.sum() == COUNTS["num_val_pairs"] // 2
    assert 0 < issame[:10].sum() < 10  # shuffled, so that each of the 10 contiguous folds has both
    assert all(image.shape == (112, 112, 3) for image in images)


def test_verification_identities_are_not_trained_on(root: Path, tmp_path: Path) -> None:
    train_ids, val_ids = split_identities(COUNTS["num_identities"], COUNTS["num_val_identities"])
    assert not set(train_ids) & set(val_ids) and len(val_ids) == COUNTS["num_val_identities"]
    # The training set does not depend on the verification identities or pairs.
    other = write_ms1m(tmp_path / "other", **{**COUNTS, "num_val_identities": 3, "num_val_pairs": 20})
    files, original = _files(other), _files(root)
    assert all(files[name] == original[name] for name in ("train.rec", "train.idx", "property"))
    assert all(files[f"{name}.bin"] != original[f"{name}.bin"] for name in VAL_SETS)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(root: Path, tmp_path: Path) -> None:
    assert _files(write_ms1m(tmp_path / "again", **COUNTS)) == _files(root)
    other = _files(write_ms1m(tmp_path / "other", seed=1, **COUNTS))
    assert all(other[name] != content for name, content in _files(root).items() if name != "property")


def test_raw_pixels_do_not_solve_verification(root: Path) -> None:
    """Pose, background, lighting and occluders keep raw-pixel verification far from what a
    trained CNN reaches (> 0.8 on unseen identities; measured when the generator was written)."""
    images, issame = read_verification_bin(root / "lfw.bin")
    pixels = np.stack(images).reshape(len(images), -1) / 127.5 - 1
    accuracy, _ = verification_accuracy(pixels[0::2], pixels[1::2], issame)
    assert accuracy < 0.75


def test_command_line_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["ms1m", str(tmp_path / "out"), "--seed", "3", "--identities", "2"])
    assert "train.rec" in capsys.readouterr().out
    assert read_property(tmp_path / "out" / "property") == (2, 112, 112)
