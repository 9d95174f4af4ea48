"""MS1MDataModule on the mini MS1M and on hand-made files: batch contracts, verification loaders,
the identity-folder format, layout errors and corrupt records."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.formats.images import CorruptFileError, decode_image, encode_jpeg
from datamodules.formats.recordio import IRHeader, RecordIOError, RecordIOReader, RecordIOWriter, image_labels, pack, read_image_record
from datamodules.formats.verification_bin import read_verification_bin
from datamodules.mini.ms1m import write_ms1m
from datamodules.ms1m import MS1MDataModule

NUM_CLASSES, PER_CLASS, NUM_PAIRS = 6, 4, 10
NUM_IMAGES = NUM_CLASSES * PER_CLASS
VAL_SETS = ["lfw", "cfp_fp", "agedb_30"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only mini set shared by the tests that do not alter files."""
    return write_ms1m(
        tmp_path_factory.mktemp("ms1m") / "faces_emore", num_identities=NUM_CLASSES,
        images_per_identity=PER_CLASS, num_val_identities=4, num_val_pairs=NUM_PAIRS,
    )


def _datamodule(root: Path, **kwargs) -> MS1MDataModule:
    return MS1MDataModule(str(root), **{"batch_size": 8, "num_workers": 0, **kwargs})


def _copy(root: Path, target: Path, names: list[str]) -> Path:
    target.mkdir()
    for name in names:
        (target / name).symlink_to(root / name)
    return target


def test_num_classes_and_val_sets_before_setup(root: Path) -> None:
    datamodule = _datamodule(root)
    assert datamodule.num_classes == NUM_CLASSES
    assert datamodule.val_set_names == VAL_SETS
    assert datamodule.train_format == "recordio" and datamodule.run_name == "ms1m"
    assert MS1MDataModule.benchmark == "ms1m" and datamodule.hparams["train_format"] == "auto"


def test_train_batches(root: Path) -> None:
    datamodule = _datamodule(root)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    batches = list(loader)
    assert len(batches) == NUM_IMAGES // 8  # shuffled, incomplete last batch dropped
    batch = batches[0]
    assert set(batch) == {"image", "label", "index"}
    assert batch["image"].shape == (8, 3, 112, 112) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == batch["index"].dtype == torch.int64
    images = torch.cat([b["image"] for b in batches])
    assert images.min() >= -1 and images.max() <= 1 and images.min() < -0.9 and images.max() > 0.9
    labels, keys = torch.cat([b["label"] for b in batches]), torch.cat([b["index"] for b in batches])
    assert ((0 <= labels) & (labels < NUM_CLASSES)).all()
    assert ((1 <= keys) & (keys <= NUM_IMAGES)).all() and len(set(keys.tolist())) == len(keys)
    assert torch.equal(labels, (keys - 1) // PER_CLASS)  # the writer stores classes in key order
    assert datamodule.describe() == {
        "root": str(root.resolve()), "train_format": "recordio", "num_classes": NUM_CLASSES,
        "num_images": NUM_IMAGES, "val_sets": VAL_SETS, "split": "val",
    }


def test_a_global_batch_size_is_divided_over_the_ranks(root: Path) -> None:
    """SST's authors trained one batch of 128 over all GPUs: batch_size_scope global keeps that
    batch whatever the world size."""
    from types import SimpleNamespace

    per_rank = _datamodule(root, batch_size=12)
    per_rank.trainer = SimpleNamespace(world_size=4)
    assert per_rank.rank_batch_size == 12
    shared = _datamodule(root, batch_size=12, batch_size_scope="global")
    shared.trainer = SimpleNamespace(world_size=4)
    assert shared.rank_batch_size == 3
    shared.trainer = SimpleNamespace(world_size=5)
    with pytest.raises(ValueError, match=r"data.batch_size=12 is the global batch .* 5 ranks"):
        shared.rank_batch_size
    with pytest.raises(ValueError, match="batch_size_scope"):
        _datamodule(root, batch_size_scope="node")


def test_normalisation_and_random_flip(root: Path) -> None:
    datamodule = _datamodule(root, horizontal_flip=False)
    datamodule.setup("fit")
    reader = datamodule.train_dataset.reader
    pixels = torch.tensor(decode_image(read_image_record(reader, 1)[1])).permute(2, 0, 1).float()
    expected = (pixels / 255 - 0.5) / 0.5
    assert torch.equal(datamodule.train_dataset[0]["image"], expected)

    flipping = _datamodule(root)
    flipping.setup("fit")
    torch.manual_seed(0)
    flipped = [torch.equal(flipping.train_dataset[0]["image"], expected.flip(-1)) for _ in range(20)]
    assert 0 < sum(flipped) < 20


def test_val_loaders_per_set_in_order(root: Path) -> None:
    datamodule = _datamodule(root)
    datamodule.setup("validate")
    loaders = datamodule.val_dataloader()
    assert len(loaders) == len(datamodule.val_set_names) == 3
    for name, loader in zip(datamodule.val_set_names, loaders):
        images, issame = read_verification_bin(root / f"{name}.bin")
        batches = list(loader)
        assert all(set(b) == {"image", "flipped", "pair_index", "issame", "eval_set", "index", "path"} for b in batches)
        assert [p for b in batches for p in b["path"]] == [f"{root / name}.bin#{i}" for i in range(2 * NUM_PAIRS)]
        assert all(b["eval_set"] == [name] * len(b["index"]) for b in batches)
        assert np.array_equal(torch.cat([b["issame"] for b in batches]).numpy(), np.repeat(issame, 2))
        index = torch.cat([b["index"] for b in batches])
        assert torch.equal(index, torch.arange(2 * NUM_PAIRS))
        assert torch.equal(torch.cat([b["pair_index"] for b in batches]), index // 2)
        image, flipped = torch.cat([b["image"] for b in batches]), torch.cat([b["flipped"] for b in batches])
        assert image.shape == (2 * NUM_PAIRS, 3, 112, 112) and image.dtype == torch.float32
        assert torch.equal(flipped, image.flip(-1))
        assert torch.equal(image[3], (torch.tensor(images[3]).permute(2, 0, 1).float() / 255 - 0.5) / 0.5)
        assert datamodule.issame(name).dtype == bool and np.array_equal(datamodule.issame(name), issame)
    with pytest.raises(KeyError, match="calfw"):
        datamodule.issame("calfw")


def test_default_val_sets_are_the_present_ones_and_others_can_be_named(root: Path, tmp_path: Path) -> None:
    partial = _copy(root, tmp_path / "partial", ["train.rec", "train.idx", "property", "agedb_30.bin", "lfw.bin"])
    assert _datamodule(partial).val_set_names == ["lfw", "agedb_30"]
    (partial / "calfw.bin").symlink_to(root / "cfp_fp.bin")
    datamodule = _datamodule(partial, val_sets=["calfw", "lfw"])
    datamodule.setup("validate")
    assert datamodule.val_set_names == ["calfw", "lfw"] and len(datamodule.val_dataloader()) == 2
    assert np.array_equal(datamodule.issame("calfw"), read_verification_bin(root / "cfp_fp.bin")[1])


def test_missing_files_are_listed_in_one_error(tmp_path: Path) -> None:
    datamodule = _datamodule(tmp_path, val_sets=["lfw"])
    assert datamodule.val_set_names == ["lfw"]
    for access in (datamodule.setup, lambda: datamodule.num_classes):
        with pytest.raises(FileNotFoundError) as error:
            access()
        message = str(error.value)
        for name in ("train.rec", "train.idx", "property", "lfw.bin"):
            assert str(tmp_path / name) in message
        assert "train_format='folder'" in message


def test_explicitly_requested_missing_bin(root: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        _datamodule(root, val_sets=["lfw", "cplfw"]).setup("fit")
    assert str(root / "cplfw.bin") in str(error.value) and str(root / "lfw.bin") not in str(error.value)


def _write_image(path: Path, size: tuple[int, int], colour: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(path)


def test_identity_folders(root: Path, tmp_path: Path) -> None:
    data = tmp_path / "my_faces"
    _write_image(data / "bob" / "1.png", (112, 112), 10)
    _write_image(data / "Zoe" / "b.jpg", (90, 100), 200)
    _write_image(data / "Zoe" / "a.png", (120, 112), 100)
    _write_image(data / "alice" / "x.jpg", (112, 112), 50)
    (data / "alice" / "notes.txt").write_text("not an image")
    (data / ".cache").mkdir()
    shutil.copy(root / "lfw.bin", data / "lfw.bin")

    datamodule = _datamodule(data, batch_size=2, horizontal_flip=False)
    assert datamodule.train_format == "folder" and datamodule.num_classes == 3
    assert datamodule.run_name == "my_faces" and datamodule.val_set_names == ["lfw"]
    datamodule.setup("fit")
    assert datamodule.num_images == 4
    # sorted(): "Zoe" < "alice" < "bob"; images sorted within an identity.
    samples = [datamodule.train_dataset[i] for i in range(4)]
    assert [s["label"] for s in samples] == [0, 0, 1, 2] and [s["index"] for s in samples] == [0, 1, 2, 3]
    assert all(s["image"].shape == (3, 112, 112) for s in samples)
    assert abs(samples[0]["image"].mean().item() - (100 / 127.5 - 1)) < 0.02  # Zoe/a.png
    assert len(datamodule.train_dataloader()) == 2

    separate = _datamodule(root, train_format="folder", folder=str(data))  # .bin files stay in root
    assert separate.num_classes == 3 and separate.run_name == "my_faces" and separate.val_set_names == VAL_SETS


def test_identity_pair_sampling_from_recordio_and_from_folders(root: Path, tmp_path: Path) -> None:
    datamodule = _datamodule(root, sampling="identity_pairs", batch_size=4)
    datamodule.setup("fit")
    pairs = datamodule.train_dataloader().dataset
    assert len(pairs) == NUM_CLASSES  # an epoch is one pass over the identities
    images = datamodule.train_dataset
    for identity, members in enumerate(pairs.members):  # from the identity records of train.rec
        assert len(members) == PER_CLASS and {images.read(i)[1] for i in members} == {identity}
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == batch["image2"].shape == (4, 3, 112, 112)
    assert not torch.equal(batch["image"], batch["image2"])

    data = tmp_path / "shallow"
    for name, colour in [("ann/1.png", 10), ("ann/2.png", 20), ("ben/1.png", 30)]:
        _write_image(data / name, (112, 112), colour)
    folder = _datamodule(data, sampling="identity_pairs", val_sets=[], horizontal_flip=False)
    folder.setup("fit")
    pairs = folder.train_dataloader().dataset
    assert [list(m) for m in pairs.members] == [[0, 1], [2]]
    assert torch.equal(pairs[1]["image"], pairs[1]["image2"])  # one image: used twice


def test_missing_identity_folder(root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="identity folders: " + str(tmp_path / "nowhere")):
        _datamodule(root, train_format="folder", folder=str(tmp_path / "nowhere")).setup("fit")


@pytest.fixture
def corrupt_root(tmp_path: Path) -> Path:
    """An insightface rec of 3 images of 2 classes whose key 2 holds garbage instead of a JPEG;
    key 3 has a vector label (its first value is the class)."""
    face = np.full((112, 112, 3), 128, np.uint8)
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.write(0, pack(IRHeader(2, (4, 6), 0, 0), b""))
        writer.write(1, pack(IRHeader(0, 0.0, 1, 0), encode_jpeg(face)))
        writer.write(2, pack(IRHeader(0, 1.0, 2, 0), b"\xff\xd8 this is not a JPEG"))
        writer.write(3, pack(IRHeader(2, (1.0, 7.0), 3, 0), encode_jpeg(face)))
    (tmp_path / "property").write_text("2,112,112\n")
    return tmp_path


def test_corrupt_record_names_the_key(corrupt_root: Path) -> None:
    datamodule = _datamodule(corrupt_root)
    datamodule.setup("fit")
    assert datamodule.val_set_names == [] and datamodule.val_dataloader() == []
    assert datamodule.train_dataset[2]["label"] == 1
    with pytest.raises(CorruptFileError, match="train.rec key 2"):
        datamodule.train_dataset[1]


def test_skip_corrupt_replaces_and_counts(corrupt_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    datamodule = _datamodule(corrupt_root, skip_corrupt=True)
    datamodule.setup("fit")
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="datamodules.ms1m"):
        sample = datamodule.train_dataset[1]
    assert sample["index"] in (1, 3)
    assert datamodule.num_skipped >= 1 and datamodule.num_skipped == len(caplog.records)
    assert "train.rec key 2" in caplog.text


def test_every_record_label_is_checked_not_only_the_first_and_last(tmp_path: Path) -> None:
    """12 images of 3 classes; one in the middle says class 7: the setup check names it."""
    face = np.full((112, 112, 3), 128, np.uint8)
    labels = [0] * 4 + [1] * 2 + [7] + [1] + [2] * 4
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.write(0, pack(IRHeader(2, (13, 16), 0, 0), b""))
        for key, label in enumerate(labels, start=1):
            header = IRHeader(2, (float(label), 1.0), key, 0) if key == 9 else IRHeader(0, float(label), key, 0)
            writer.write(key, pack(header, encode_jpeg(face)))
    (tmp_path / "property").write_text("3,112,112\n")
    with pytest.raises(RecordIOError, match=r"train.rec: 1 image records have class ids outside \[0, 3\) .*key 7: 7"):
        _datamodule(tmp_path).setup("fit")
    assert image_labels(RecordIOReader(tmp_path / "train.rec", tmp_path / "train.idx"), range(1, 13)).tolist() == labels
