"""Verification ``.bin`` pair sets: round trip, ndarray entries and malformed files."""

from __future__ import annotations

import io
import os
import re
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.formats.verification_bin import (
    VerificationBinError,
    read_verification_bin,
    write_verification_bin,
)


def flat(colour: tuple[int, int, int], size: int = 16) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (size, size, 3)).copy()


PAIRS = [
    (flat((255, 0, 0)), flat((0, 255, 0))),
    (flat((0, 0, 255)), flat((200, 200, 40))),
    (flat((10, 120, 230)), flat((90, 30, 160))),
]
ISSAME = [True, False, True]


def assert_images_close(images: list[np.ndarray]) -> None:
    expected = [image for pair in PAIRS for image in pair]
    assert len(images) == len(expected)
    for image, reference in zip(images, expected):
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
        assert np.abs(image.astype(int) - reference).max() <= 8  # JPEG of a flat colour; RGB order


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "lfw.bin"
    write_verification_bin(path, PAIRS, ISSAME)
    images, issame = read_verification_bin(path)
    assert_images_close(images)
    assert issame.dtype == bool and issame.tolist() == ISSAME


def test_ndarray_png_entries_and_numpy_bools(tmp_path: Path) -> None:
    """``build_eval_pack.py`` stores ``cv2.imencode`` outputs: uint8 arrays (here PNG, lossless)."""

    def png_array(image: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return np.frombuffer(buffer.getvalue(), dtype=np.uint8)

    bins = [png_array(image) for pair in PAIRS for image in pair]
    path = tmp_path / "cfp_fp.bin"
    path.write_bytes(pickle.dumps((bins, np.array(ISSAME)), protocol=2))
    images, issame = read_verification_bin(path)
    for image, reference in zip(images, [image for pair in PAIRS for image in pair]):
        np.testing.assert_array_equal(image, reference)
    assert issame.tolist() == ISSAME


def test_python2_pickle(tmp_path: Path) -> None:
    """insightface's .bin files are Python 2 pickles whose JPEGs are ``str`` (BINSTRING opcodes):
    they load as bytes only with ``encoding='bytes'``."""
    source = tmp_path / "source.bin"
    write_verification_bin(source, PAIRS, ISSAME)
    bins, _ = pickle.loads(source.read_bytes())
    strings = b"".join(b"T" + struct.pack("<i", len(jpeg)) + jpeg for jpeg in bins)
    bools = b"".join(b"\x88" if same else b"\x89" for same in ISSAME)
    path = tmp_path / "lfw.bin"
    path.write_bytes(b"\x80\x02((" + strings + b"l(" + bools + b"lt.")  # PROTO 2, (list, list) tuple
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(path.read_bytes())  # the default encoding fails on JPEG bytes
    images, issame = read_verification_bin(path)
    assert_images_close(images)
    assert issame.tolist() == ISSAME


def write_pickle(path: Path, content: object) -> Path:
    path.write_bytes(pickle.dumps(content, protocol=4))
    return path


def test_errors_name_the_file(tmp_path: Path) -> None:
    source = tmp_path / "source.bin"  # a valid pair set, to take entries from
    write_verification_bin(source, PAIRS, ISSAME)
    bins, _ = pickle.loads(source.read_bytes())

    bad_pickle = tmp_path / "bad.bin"
    bad_pickle.write_bytes(b"\x80\x04not a pickle")
    cases = {
        bad_pickle: "not a readable pickle",
        write_pickle(tmp_path / "odd.bin", (bins[:5], [True, False])): "odd number of images",
        write_pickle(tmp_path / "labels.bin", (bins, [True, False])): "6 images, i.e. 3 pairs, but 2 issame",
        write_pickle(tmp_path / "shape.bin", [bins]): "expected a pickled",
        write_pickle(tmp_path / "type.bin", (bins[:5] + ["text"], ISSAME)): "image 5 is a str",
    }
    for path, message in cases.items():
        with pytest.raises(VerificationBinError, match=message) as error:
            read_verification_bin(path)
        assert str(path) in str(error.value)


def test_corrupt_image_names_file_and_index(tmp_path: Path) -> None:
    path = write_pickle(tmp_path / "agedb_30.bin", ([b"\xff\xd8broken", b"x"], [True]))
    with pytest.raises(ValueError, match=f"image 0 of {path}"):
        read_verification_bin(path)


def test_write_checks_lengths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 pairs but 2 issame"):
        write_verification_bin(tmp_path / "x.bin", PAIRS, ISSAME[:2])


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_bin_is_refused_naming_the_global_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = write_pickle(tmp_path / "lfw.bin", ([_RunsCode(marker)] * 2, [True]))
    with pytest.raises(VerificationBinError, match=rf"{re.escape(str(path))} refers to posix.system"):
        read_verification_bin(path)
    assert not marker.exists()
    for protocol in (2, 4):  # bytes at protocol 2 go through _codecs.encode, which real files use
        source = tmp_path / f"p{protocol}.bin"
        write_verification_bin(source, PAIRS, ISSAME)
        bins, issame = pickle.loads(source.read_bytes())
        source.write_bytes(pickle.dumps((bins, issame), protocol=protocol))
        assert_images_close(read_verification_bin(source)[0])
