"""MVTecDataModule on the mini MVTec AD: splits, batch contract, mask resolution, errors."""

import logging
import re
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.formats.images import CorruptFileError, read_image, read_mask
from datamodules.mini.mvtec import CATEGORIES, write_mvtec
from datamodules.mvtec import MVTecDataModule, PILResize

N_TRAIN, N_GOOD, N_PER_DEFECT = 12, 3, 2
ORIGINAL, INPUT = 128, 64
KEYS = {"image", "mask", "label", "defect_type", "path"}
EVAL_KEYS = KEYS | {"eval_set", "index"}  # named eval sets (datamodules.base.EvalSet)
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def _write(root: Path, categories: tuple[str, ...] = ("weave", "speckle_gray")) -> Path:
    return write_mvtec(
        root, categories, image_size=ORIGINAL,
        n_train=N_TRAIN, n_test_good=N_GOOD, n_test_per_defect=N_PER_DEFECT,
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only mini set shared by the tests that do not alter files."""
    return _write(tmp_path_factory.mktemp("mvtec"))


def _datamodule(root: Path, **kwargs) -> MVTecDataModule:
    options = {"category": "weave", "image_size": INPUT, "batch_size": 4, "num_workers": 0, **kwargs}
    return MVTecDataModule(str(root), **options)


def test_train_batches(root: Path) -> None:
    datamodule = _datamodule(root)
    datamodule.setup("fit")
    assert len(datamodule.train_samples) == N_TRAIN and datamodule.val_samples == []
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == KEYS
    assert batch["image"].shape == (4, 3, INPUT, INPUT) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, ORIGINAL, ORIGINAL) and batch["mask"].dtype == torch.bool
    assert not batch["mask"].any()
    assert batch["label"].dtype == torch.int64 and not batch["label"].any()
    assert batch["defect_type"] == ["good"] * 4
    assert all(Path(p).parent == root / "weave" / "train" / "good" for p in batch["path"])


def test_test_set_order_labels_and_original_masks(root: Path) -> None:
    datamodule = _datamodule(root)
    datamodule.setup("test")
    samples = datamodule.test_samples
    assert len(samples) == N_GOOD + N_PER_DEFECT * len(CATEGORIES["weave"].defects)
    assert [(s.defect_type, s.image.name) for s in samples] == sorted((s.defect_type, s.image.name) for s in samples)

    batches = list(datamodule.test_dataloader())
    assert all(set(batch) == EVAL_KEYS for batch in batches)
    assert torch.cat([batch["index"] for batch in batches]).tolist() == list(range(len(samples)))
    assert {name for batch in batches for name in batch["eval_set"]} == {"test"} == set(datamodule.eval_set_names("test"))
    for batch in batches:
        assert batch["mask"].shape[1:] == (ORIGINAL, ORIGINAL)  # ground-truth resolution
        for path, defect, label, mask in zip(batch["path"], batch["defect_type"], batch["label"], batch["mask"]):
            assert Path(path).parent.name == defect
            assert label.item() == int(defect != "good")
            if defect == "good":
                assert not mask.any()
            else:
                mask_path = root / "weave" / "ground_truth" / defect / f"{Path(path).stem}_mask.png"
                assert torch.equal(mask, torch.from_numpy(read_mask(mask_path)))
    assert [p for batch in batches for p in batch["path"]] == [str(s.image) for s in samples]
    assert datamodule.predict_dataloader().dataset.dataset.samples == samples


def test_masks_resized_with_the_image_at_input_resolution(root: Path) -> None:
    datamodule = _datamodule(root, mask_resolution="input", batch_size=32)
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    assert batch["image"].shape[-2:] == batch["mask"].shape[-2:] == (INPUT, INPUT)
    assert batch["mask"].dtype == torch.bool
    defective = batch["label"] == 1
    assert batch["mask"][defective].flatten(1).any(1).all() and not batch["mask"][~defective].any()


def test_images_are_resized_by_pils_antialiasing_lanczos_and_masks_by_its_nearest() -> None:
    """MSFlow's T.Resize(LANCZOS) on PIL images: a one-pixel checkerboard downscaled 4x becomes
    an even grey (OpenCV's INTER_LANCZOS4, which does not widen its kernel, aliases it)."""
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image = np.repeat(checker[..., None], 3, axis=2)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 20:50] = 1
    out = A.Compose([PILResize(16)])(image=image, mask=mask)
    expected = np.asarray(Image.fromarray(image).resize((16, 16), Image.Resampling.LANCZOS))
    assert np.array_equal(out["image"], expected)
    assert out["image"].std() < 2.0 and abs(float(out["image"].mean()) - 127.5) < 2.0
    assert np.array_equal(out["mask"], np.asarray(Image.fromarray(mask).resize((16, 16), Image.Resampling.NEAREST)))


def test_grayscale_category_gives_three_equal_channels(root: Path) -> None:
    datamodule = _datamodule(root, category="speckle_gray")
    datamodule.setup("test")
    image = next(iter(datamodule.test_dataloader()))["image"]
    assert image.shape[1] == 3
    pixels = image * STD[:, None, None] + MEAN[:, None, None]  # undo ImageNet normalisation
    torch.testing.assert_close(pixels[:, 0], pixels[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[:, 0], pixels[:, 2], atol=1e-5, rtol=0)


def test_train_augmentations_apply_to_training_images_only(root: Path) -> None:
    datamodule = _datamodule(root, image_size=ORIGINAL, train_augmentations=[A.HorizontalFlip(p=1.0)])
    datamodule.setup("fit")
    train = datamodule.train_dataloader().dataset[0]
    plain = datamodule._dataset(datamodule.train_samples, [])[0]
    assert train["path"] == plain["path"]
    torch.testing.assert_close(train["image"], plain["image"].flip(-1))


def test_val_split_sizes_and_determinism(root: Path) -> None:
    def split(seed: int) -> tuple[set[str], set[str]]:
        datamodule = _datamodule(root, val_fraction=0.25, seed=seed)
        datamodule.setup("fit")
        return {str(s.image) for s in datamodule.train_samples}, {str(s.image) for s in datamodule.val_samples}

    train, val = split(0)
    assert (len(train), len(val)) == (N_TRAIN - 3, 3)
    assert not train & val and len(train | val) == N_TRAIN
    assert split(0) == (train, val)
    assert split(1) != (train, val)

    datamodule = _datamodule(root, val_fraction=0.25)
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    assert set(batch) == EVAL_KEYS and not batch["label"].any() and not batch["mask"].any()
    assert batch["eval_set"] == ["val"] * len(batch["index"]) and datamodule.eval_set_names("val") == ["val"]


def test_describe_and_run_name(root: Path) -> None:
    datamodule = _datamodule(root, category="speckle_gray")
    assert MVTecDataModule.benchmark == "mvtec" and datamodule.run_name == "speckle_gray"
    assert datamodule.describe() == {
        "root": str(root.resolve()), "category": "speckle_gray", "image_size": INPUT,
        "mask_resolution": "original", "split": "test",
    }
    assert datamodule.hparams["category"] == "speckle_gray"


def test_missing_category_lists_the_present_ones(root: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        _datamodule(root, category="bottle").setup("fit")
    message = str(error.value)
    assert str(root / "bottle") in message
    assert "speckle_gray, weave" in message


def test_missing_mask_names_its_expected_path(tmp_path: Path) -> None:
    root = _write(tmp_path, ("weave",))
    masks = root / "weave" / "ground_truth"
    missing = [masks / "hole" / "001_mask.png", masks / "stain" / "000_mask.png"]
    for path in missing:
        path.unlink()
    with pytest.raises(FileNotFoundError) as error:
        _datamodule(root).setup("test")
    assert all(str(path) in str(error.value) for path in missing)


def test_corrupt_png_raises_naming_it_or_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _write(tmp_path, ("weave",))
    corrupt = root / "weave" / "test" / "hole" / "000.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage, not a PNG stream")

    datamodule = _datamodule(root)
    datamodule.setup("test")
    dataset = datamodule.test_dataloader().dataset
    index = [s.image for s in dataset.dataset.samples].index(corrupt)
    with pytest.raises(CorruptFileError, match=re.escape(str(corrupt))):
        dataset[index]

    skipping = _datamodule(root, skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="datamodules.mvtec"):
        skipping.setup("test")
    assert skipping.num_skipped == 1
    assert len(skipping.test_samples) == len(dataset) - 1 and corrupt not in [s.image for s in skipping.test_samples]
    assert str(corrupt) in caplog.text


def test_images_of_different_sizes_are_named_when_masks_stay_original(tmp_path: Path) -> None:
    root = _write(tmp_path, ("weave",))
    odd = root / "weave" / "train" / "good" / "005.png"
    Image.open(odd).resize((96, 96)).save(odd)
    with pytest.raises(ValueError, match="differ in size") as error:
        _datamodule(root).setup("fit")
    assert str(odd) in str(error.value) and str(root / "weave" / "train" / "good" / "000.png") in str(error.value)
    _datamodule(root, mask_resolution="input").setup("fit")  # every mask resized to image_size


def test_image_reader_converts_modes_and_names_missing_files(tmp_path: Path) -> None:
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    for mode in ("L", "P", "RGBA"):
        Image.fromarray(pixels).convert(mode).save(tmp_path / f"{mode}.png")
        image = read_image(tmp_path / f"{mode}.png")
        assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert read_mask(tmp_path / "L.png").sum() == 63  # positive where > 0
    with pytest.raises(FileNotFoundError, match="absent.png"):
        read_image(tmp_path / "absent.png")
    assert issubclass(CorruptFileError, ValueError)
