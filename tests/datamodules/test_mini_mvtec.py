"""The mini MVTec AD writer: exact official layout, binary masks on the defects, determinism."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.mini.__main__ import main
from datamodules.mini.mvtec import CATEGORIES, write_mvtec

SIZE = 128
COUNTS = {"n_train": 6, "n_test_good": 3, "n_test_per_defect": 3}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mvtec(tmp_path_factory.mktemp("mini") / "mvtec", image_size=SIZE, **COUNTS)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_is_exactly_mvtec(root: Path) -> None:
    expected = {"readme.txt"}
    for name in ("weave", "speckle_gray"):
        expected |= {f"{name}/train/good/{i:03d}.png" for i in range(COUNTS["n_train"])}
        expected |= {f"{name}/test/good/{i:03d}.png" for i in range(COUNTS["n_test_good"])}
        assert len(CATEGORIES[name].defects) >= 3
        for defect in CATEGORIES[name].defects:
            expected |= {f"{name}/test/{defect}/{i:03d}.png" for i in range(COUNTS["n_test_per_defect"])}
            expected |= {f"{name}/ground_truth/{defect}/{i:03d}_mask.png" for i in range(COUNTS["n_test_per_defect"])}
    assert set(_files(root)) == expected


@pytest.mark.parametrize(("name", "mode"), [("weave", "RGB"), ("speckle_gray", "L")])
def test_image_modes_and_sizes(root: Path, name: str, mode: str) -> None:
    for path in [*(root / name).glob("train/good/*.png"), *(root / name).glob("test/*/*.png")]:
        with Image.open(path) as image:
            assert (image.mode, image.size) == (mode, (SIZE, SIZE)), path


def test_masks_are_binary_and_cover_the_defects(root: Path) -> None:
    for mask_path in root.glob("*/ground_truth/*/*_mask.png"):
        with Image.open(mask_path) as mask_file:
            assert mask_file.mode == "L"
            mask = np.asarray(mask_file)
        assert set(np.unique(mask)) == {0, 255}, mask_path
        rows, cols = np.nonzero(mask)
        extent = max(np.ptp(rows), np.ptp(cols)) + 1
        assert 0.06 * SIZE <= extent <= 0.22 * SIZE, mask_path  # localized, 6-20% of the side

        category, defect = mask_path.parts[-4], mask_path.parts[-2]
        image_path = root / category / "test" / defect / mask_path.name.replace("_mask", "")
        image = np.asarray(Image.open(image_path).convert("L")).astype(int)
        inside, outside = image[mask > 0], image[mask == 0]
        if defect == "hole":  # a dark disc (its rim pixels are blended with the texture)
            assert np.median(inside) < 25 < outside.mean(), image_path
        if defect == "scratch":  # a hard-edged bright or dark line
            assert np.all((inside < 25) | (inside > 230)), image_path


def test_same_seed_gives_identical_bytes_and_another_seed_differs(root: Path, tmp_path: Path) -> None:
    again = _files(write_mvtec(tmp_path / "again", image_size=SIZE, **COUNTS))
    assert again == _files(root)
    other = _files(write_mvtec(tmp_path / "other", seed=1, image_size=SIZE, **COUNTS))
    assert other.keys() == again.keys()
    assert all(other[key] != again[key] for key in again if key.endswith(".png") and "_mask" not in key)


def test_unknown_category_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bottle.*known"):
        write_mvtec(tmp_path, categories=["bottle"])


def test_command_line_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["mvtec", str(tmp_path / "out"), "--categories", "speckle_gray", "--seed", "3", "--image-size", "64"])
    assert "speckle_gray" in capsys.readouterr().out
    with Image.open(tmp_path / "out" / "speckle_gray" / "train" / "good" / "047.png") as image:
        assert image.size == (64, 64)
    assert not (tmp_path / "out" / "weave").exists()
