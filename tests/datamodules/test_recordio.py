"""MXNet RecordIO framing, pack/unpack, errors, DataLoader workers and the insightface layout."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.formats.images import CorruptFileError
from datamodules.formats.images import decode_image
from datamodules.formats.recordio import (
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    check_insightface_rec,
    image_keys,
    pack,
    read_image_record,
    read_property,
    unpack,
    write_insightface_rec,
)

MAGIC = b"\x0a\x23\xd7\xce"  # 0xCED7230A little-endian


def write_records(tmp_path: Path, records: dict[int, bytes]) -> tuple[Path, Path]:
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    with RecordIOWriter(rec, idx) as writer:
        for key, record in records.items():
            writer.write(key, record)
    return rec, idx


def parse_chunks(data: bytes) -> list[tuple[int, int, bytes]]:
    """(offset, cflag, data) of every chunk, parsed independently of the reader."""
    chunks, offset = [], 0
    while offset < len(data):
        magic, lrecord = struct.unpack_from("<II", data, offset)
        assert magic == 0xCED7230A
        length = lrecord & ((1 << 29) - 1)
        chunks.append((offset, lrecord >> 29, data[offset + 8 : offset + 8 + length]))
        padded = (length + 3) // 4 * 4
        assert data[offset + 8 + length : offset + 8 + padded] == bytes(padded - length)
        offset += 8 + padded
    return chunks


def test_one_record_exact_bytes(tmp_path: Path) -> None:
    rec, idx = write_records(tmp_path, {7: b"abcde"})
    # magic, lrecord = cflag 0 | length 5, the 5 bytes, 3 zero bytes of padding to 16.
    assert rec.read_bytes() == MAGIC + b"\x05\x00\x00\x00" + b"abcde" + b"\x00\x00\x00"
    assert idx.read_text() == "7\t0\n"


def test_multi_part_exact_bytes(tmp_path: Path) -> None:
    # "ab" + pad, then magic at offset 4 (aligned) splits into start "abcd" and end "xy".
    rec, _ = write_records(tmp_path, {0: b"abcd" + MAGIC + b"xy"})
    lrec_start = struct.pack("<I", 1 << 29 | 4)
    lrec_end = struct.pack("<I", 3 << 29 | 2)
    assert rec.read_bytes() == MAGIC + lrec_start + b"abcd" + MAGIC + lrec_end + b"xy\x00\x00"


MAGIC_PAYLOADS = {
    0: MAGIC + b"head",  # magic at the very start: an empty start chunk
    1: b"tail" + MAGIC,  # at the very end: an empty end chunk
    2: b"0123" + MAGIC + b"4567" + MAGIC + MAGIC + b"89abc",  # several, two adjacent
    3: b"x" + MAGIC + b"yzw",  # unaligned: not split
    4: MAGIC,  # only the magic: empty start and end
    5: b"",
    6: b"12345",
    7: b"ab" + MAGIC + b"cd" + MAGIC,  # offsets 2 and 8: only the aligned one splits
}


def test_round_trip_with_magic_in_payloads(tmp_path: Path) -> None:
    rec, idx = write_records(tmp_path, MAGIC_PAYLOADS)
    chunks = parse_chunks(rec.read_bytes())
    offsets = dict(tuple(map(int, line.split("\t"))) for line in idx.read_text().splitlines())
    flags_by_key = {}
    for key in MAGIC_PAYLOADS:
        start = [i for i, chunk in enumerate(chunks) if chunk[0] == offsets[key]][0]
        end = start + next(i for i, c in enumerate(chunks[start:]) if c[1] in (0, 3))
        flags_by_key[key] = [c[1] for c in chunks[start : end + 1]]
        assert MAGIC.join(c[2] for c in chunks[start : end + 1]) == MAGIC_PAYLOADS[key]
    assert flags_by_key == {
        0: [1, 3],
        1: [1, 3],
        2: [1, 2, 2, 3],
        3: [0],
        4: [1, 3],
        5: [0],
        6: [0],
        7: [1, 3],
    }
    assert chunks[0][2] == b""  # key 0 starts with an empty part

    reader = RecordIOReader(rec, idx)
    assert len(reader) == len(MAGIC_PAYLOADS) and reader.keys == sorted(MAGIC_PAYLOADS)
    for key in [5, 2, 7, 0, 3, 6, 1, 4, 2]:  # random access, repeated
        assert reader.read(key) == MAGIC_PAYLOADS[key]


def test_random_payloads_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    records = {}
    for key in range(40):
        words = rng.integers(0, 4, size=int(rng.integers(0, 12)))  # word 3 is the magic
        vocabulary = [b"\x00\x01\x02\x03", b"abcd", b"\x0a\x23\xd7\x00", MAGIC]
        tail = bytes(rng.integers(0, 256, size=int(rng.integers(0, 4)), dtype=np.uint8))
        records[key * 3 + 1] = b"".join(vocabulary[w] for w in words) + tail
    rec, idx = write_records(tmp_path, records)
    reader = RecordIOReader(rec, idx)
    for key in rng.permutation(list(records)):
        assert reader.read(int(key)) == records[int(key)]


def test_pack_unpack_scalar_and_vector_labels() -> None:
    header, payload = unpack(pack(IRHeader(0, 3.0, 11, 12), b"jpeg"))
    assert header == IRHeader(0, 3.0, 11, 12) and payload == b"jpeg"

    record = pack(IRHeader(0, [5.0, 9.5], 1, 0), b"\xff\xd8")  # flag is set from the label
    assert len(record) == 24 + 8 + 2
    assert struct.unpack_from("<IfQQ", record) == (2, 0.0, 1, 0)
    header, payload = unpack(record)
    assert header == IRHeader(2, (5.0, 9.5), 1, 0) and payload == b"\xff\xd8"

    assert unpack(pack(IRHeader(0, np.float32(2.0), 4, 0), b""))[0].label == 2.0
    with pytest.raises(RecordIOError, match="shorter than the 24-byte header"):
        unpack(b"\x00" * 10)


@pytest.fixture
def small_rec(tmp_path: Path) -> tuple[Path, Path]:
    return write_records(tmp_path, {0: b"first record", 1: b"x" * 4 + MAGIC + b"y" * 9, 2: b"last"})


def test_error_wrong_magic(small_rec: tuple[Path, Path]) -> None:
    rec, idx = small_rec
    data = bytearray(rec.read_bytes())
    data[0:4] = b"\x00\x00\x00\x00"
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match="magic number") as error:
        RecordIOReader(rec, idx).read(0)
    assert str(rec) in str(error.value) and "byte offset 0" in str(error.value)


def test_error_truncated(small_rec: tuple[Path, Path]) -> None:
    rec, idx = small_rec
    offsets = [int(line.split("\t")[1]) for line in idx.read_text().splitlines()]
    rec.write_bytes(rec.read_bytes()[: offsets[2] + 8 + 2])  # cut inside the last record's data
    with pytest.raises(RecordIOError, match="truncated") as error:
        RecordIOReader(rec, idx).read(2)
    assert str(rec) in str(error.value)
    # Cut inside the header of the end chunk of the multi-part record 1 (start chunk: 8 + 4 bytes).
    rec.write_bytes(rec.read_bytes()[: offsets[1] + 12 + 4])
    idx.write_text(f"1\t{offsets[1]}\n")
    with pytest.raises(RecordIOError, match="truncated"):
        RecordIOReader(rec, idx).read(1)
    # Records that start beyond the cut are found when the index is read.
    idx.write_text(f"1\t{offsets[1]}\n2\t{offsets[2]}\n")
    with pytest.raises(RecordIOError, match="beyond the end .* truncated"):
        RecordIOReader(rec, idx)


@pytest.mark.parametrize("shift", [4, 8, -4, 10_000])
def test_error_idx_does_not_match_rec(small_rec: tuple[Path, Path], shift: int) -> None:
    rec, idx = small_rec
    lines = idx.read_text().splitlines()
    key, offset = lines[1].split("\t")
    lines[1] = f"{key}\t{int(offset) + shift}"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match="train.idx does not match") as error:
        RecordIOReader(rec, idx).read(1)
    assert str(rec) in str(error.value)


def test_error_idx_points_into_multi_part_record(small_rec: tuple[Path, Path]) -> None:
    rec, idx = small_rec
    offset = [chunk[0] for chunk in parse_chunks(rec.read_bytes()) if chunk[1] == 3][0]
    idx.write_text(f"5\t{offset}\n")
    with pytest.raises(RecordIOError, match="train.idx does not match .*middle of a multi-part"):
        RecordIOReader(rec, idx).read(5)


def test_error_unknown_key_and_bad_idx(small_rec: tuple[Path, Path]) -> None:
    rec, idx = small_rec
    with pytest.raises(RecordIOError, match="key 9 is not in .*train.idx"):
        RecordIOReader(rec, idx).read(9)
    idx.write_text("0\tzero\n")
    with pytest.raises(RecordIOError, match="train.idx: keys and offsets must be integers"):
        RecordIOReader(rec, idx)
    idx.write_text("0\t0\n0\t20\n")
    with pytest.raises(RecordIOError, match="key 0 appears more than once"):
        RecordIOReader(rec, idx)


class _Records(Dataset):
    def __init__(self, reader: RecordIOReader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, int, bool]:
        key = self.reader.keys[index]
        data = torch.frombuffer(bytearray(self.reader.read(key)), dtype=torch.uint8)
        return key, data, os.getpid(), self.reader._pid == os.getpid()  # the handle is this process's


def test_reader_in_dataloader_workers(tmp_path: Path) -> None:
    records = {key: bytes([key]) * 8 + MAGIC * (key % 3) + bytes([key]) * key for key in range(12)}
    reader = RecordIOReader(*write_records(tmp_path, records))
    assert reader.read(3) == records[3]  # the parent's handle is open before the workers fork

    copy = pickle.loads(pickle.dumps(reader))  # no handle is pickled; the copy opens its own
    assert copy.read(4) == records[4] and reader.read(4) == records[4]

    loader = DataLoader(_Records(reader), batch_size=None, num_workers=2, shuffle=True)
    seen = {int(key): (bytes(data.numpy()), pid, own) for key, data, pid, own in loader}
    assert {key: data for key, (data, _, _) in seen.items()} == records
    assert len({pid for _, pid, _ in seen.values()} - {os.getpid()}) == 2
    assert all(own for _, _, own in seen.values())


# --- insightface layout ---------------------------------------------------------------------------


def make_images(num_classes: int = 3, per_class: int = 4, size: int = 16) -> list[list[np.ndarray]]:
    """Smooth images (a random colour plus a ramp), which survive JPEG nearly unchanged."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 60, size)[None, :, None]
    return [
        [(rng.integers(0, 190, 3) + ramp + np.zeros((size, 1, 1))).astype(np.uint8) for _ in range(per_class)]
        for _ in range(num_classes)
    ]


def test_insightface_layout(tmp_path: Path) -> None:
    images = make_images()
    images[1][2] = np.zeros((16, 16, 3), dtype=np.uint8)
    images[1][2][..., 0] = 255  # pure red, image key 7
    out = write_insightface_rec(tmp_path / "faces", images)
    assert read_property(out / "property") == (3, 16, 16)

    reader = RecordIOReader(out / "train.rec", out / "train.idx")
    assert len(reader) == 1 + 12 + 3
    header, payload = unpack(reader.read(0))
    assert header == IRHeader(2, (13.0, 16.0), 0, 0) and payload == b""
    assert image_keys(reader) == range(1, 13)
    assert [read_image_record(reader, key)[0] for key in image_keys(reader)] == [0] * 4 + [1] * 4 + [2] * 4
    for label in range(3):
        header, payload = unpack(reader.read(13 + label))
        assert header.flag == 2 and header.label == (1 + 4 * label, 5 + 4 * label) and payload == b""

    label, jpeg = read_image_record(reader, 7)
    assert label == 1 and jpeg[:2] == b"\xff\xd8"
    red = decode_image(jpeg)
    assert red.shape == (16, 16, 3) and red.dtype == np.uint8
    assert red[..., 0].min() > 240 and red[..., 1:].max() < 15  # RGB order, not BGR
    decoded = decode_image(read_image_record(reader, 1)[1])
    assert np.abs(decoded.astype(int) - images[0][0]).mean() < 3

    check_insightface_rec(reader, num_classes=3, num_images=12)
    with pytest.raises(RecordIOError, match="header says 3 classes .* num_classes is 4") as error:
        check_insightface_rec(reader, num_classes=4)
    assert str(out / "train.rec") in str(error.value)
    with pytest.raises(RecordIOError, match="has 12 images, but num_images is 11"):
        check_insightface_rec(reader, num_classes=3, num_images=11)


def test_insightface_checks_fail_on_plain_rec(tmp_path: Path) -> None:
    records = {0: pack(IRHeader(0, 1.0, 0, 0), b"img"), 1: pack(IRHeader(0, 0.0, 1, 0), b"i")}
    rec, idx = write_records(tmp_path, records)
    reader = RecordIOReader(rec, idx)
    assert image_keys(reader) == [0, 1]  # flag 0 in record 0: every key is an image
    with pytest.raises(RecordIOError, match="record 0 is not an insightface header") as error:
        check_insightface_rec(reader, num_classes=2)
    assert str(rec) in str(error.value)


def test_insightface_checks_labels(tmp_path: Path) -> None:
    rec, idx = write_records(
        tmp_path,
        {
            0: pack(IRHeader(2, (3.0, 5.0), 0, 0), b""),
            1: pack(IRHeader(0, 1.0, 1, 0), b"a"),  # labels must start at 0
            2: pack(IRHeader(0, 1.0, 2, 0), b"b"),
        },
    )
    with pytest.raises(RecordIOError, match="labels must start at 0"):
        check_insightface_rec(RecordIOReader(rec, idx), num_classes=2)


def test_read_property_errors(tmp_path: Path) -> None:
    path = tmp_path / "property"
    path.write_text("85742,112,112")
    assert read_property(path) == (85742, 112, 112)
    for bad in ["85742,112", "a,b,c", "0,112,112", ""]:
        path.write_text(bad)
        with pytest.raises(RecordIOError, match="num_classes,height,width") as error:
            read_property(path)
        assert str(path) in str(error.value)


def test_decode_image_error_names_source() -> None:
    with pytest.raises(CorruptFileError, match="train.rec key 5"):
        decode_image(b"not a jpeg", name="train.rec key 5")
