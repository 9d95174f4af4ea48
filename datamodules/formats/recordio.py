"""MXNet RecordIO (``.rec`` + ``.idx``) and the insightface face-dataset layout, without mxnet.

Byte layouts (benchmarks.md §3.1):

- **Framing** (dmlc-core ``include/dmlc/recordio.h``, ``src/recordio.cc``): each chunk is
  ``uint32 magic 0xCED7230A``, ``uint32 lrecord = cflag << 29 | length``, ``length`` data bytes and
  zero padding to a multiple of 4, all little-endian. A payload is split wherever the magic bytes
  occur at a 4-byte-aligned offset inside it (cflag 1 start, 2 middle, 3 end; 0 = one chunk); the
  reader joins the parts with the magic bytes re-inserted.
- **Index** (``mxnet.recordio.MXIndexedRecordIO``): ``.idx`` lines ``key\\toffset``, the byte offset
  of the record's first chunk in the ``.rec``.
- **Payload** (``mxnet.recordio.pack``/``unpack``): header ``struct 'IfQQ'`` = flag, label, id, id2
  (24 bytes); when flag > 0 the label is the ``flag`` float32 values that follow the header.
- **insightface layout** (``RecBuilder``; ``arcface_torch/dataset.py::MXFaceDataset``): record 0 has
  flag 2 and label ``[id_start, id_end]``; records ``1 .. id_start-1`` are JPEG images labelled with
  their class id; records ``id_start .. id_end-1`` are one per class with label
  ``[first_image_key, end_image_key)`` and no payload. ``property`` is ``num_classes,H,W``.
"""

from __future__ import annotations

import numbers
import os
import struct
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from datamodules.formats.images import decode_image, encode_jpeg

_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", _MAGIC)
_FLAG_SHIFT = 29
_MAX_LENGTH = (1 << _FLAG_SHIFT) - 1
_CHUNK_HEADER = struct.Struct("<II")
_IR_HEADER = struct.Struct("<IfQQ")
# cflag of a chunk: a record is one COMPLETE chunk or START, MIDDLE*, END.
_COMPLETE, _START, _MIDDLE, _END = 0, 1, 2, 3


class RecordIOError(ValueError):
    """A RecordIO dataset file (``.rec``, ``.idx``, ``property``) is malformed or inconsistent."""


class IRHeader(NamedTuple):
    """Header of a packed record (``mxnet.recordio.IRHeader``); a vector label is a tuple of floats."""

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


def pack(header: IRHeader, payload: bytes) -> bytes:
    """Header + payload as ``mxnet.recordio.pack``: the flag is set from the label (0 for a scalar,
    its length for a vector, whose float32 values follow the 24-byte header)."""
    if isinstance(header.label, numbers.Real):
        return _IR_HEADER.pack(0, header.label, header.id, header.id2) + payload
    label = np.asarray(header.label, dtype="<f4")
    if label.ndim != 1 or label.size == 0:
        raise ValueError(f"a vector label must be a non-empty 1-D sequence; got {header.label!r}")
    return _IR_HEADER.pack(label.size, 0.0, header.id, header.id2) + label.tobytes() + payload


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """Split a record into its header and payload (``mxnet.recordio.unpack``)."""
    if len(record) < _IR_HEADER.size:
        raise RecordIOError(f"a record of {len(record)} bytes is shorter than the 24-byte header")
    flag, label, id_, id2 = _IR_HEADER.unpack_from(record)
    if flag == 0:
        return IRHeader(0, label, id_, id2), record[_IR_HEADER.size :]
    end = _IR_HEADER.size + 4 * flag
    if len(record) < end:
        raise RecordIOError(f"a record of {len(record)} bytes is too short for its {flag} float32 labels")
    labels = np.frombuffer(record, dtype="<f4", count=flag, offset=_IR_HEADER.size)
    return IRHeader(flag, tuple(labels.tolist()), id_, id2), record[end:]


def _split_at_magic(payload: bytes) -> list[bytes]:
    """The parts of ``payload`` between occurrences of the magic bytes at 4-byte-aligned offsets."""
    parts, start = [], 0
    found = payload.find(_MAGIC_BYTES)
    while found != -1:
        if found % 4 == 0:
            parts.append(payload[start:found])
            start = found + len(_MAGIC_BYTES)
            found = payload.find(_MAGIC_BYTES, start)
        else:
            found = payload.find(_MAGIC_BYTES, found + 1)
    parts.append(payload[start:])
    return parts


def _padding(length: int) -> int:
    return -length % 4


class RecordIOWriter:
    """Writes ``.rec`` records framed as dmlc-core does and their ``key\\toffset`` lines to ``.idx``."""

    def __init__(self, rec_path: str | PathLike[str], idx_path: str | PathLike[str]) -> None:
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        self._rec: BinaryIO = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", encoding="ascii", newline="\n")
        self._keys: set[int] = set()

    def write(self, key: int, record: bytes) -> None:
        """Append ``record`` (e.g. from :func:`pack`) under the integer ``key``."""
        if key in self._keys:
            raise ValueError(f"key {key} was already written to {self.idx_path}")
        if len(record) > _MAX_LENGTH:
            raise ValueError(f"a record of {len(record)} bytes exceeds the RecordIO limit of 2**29 - 1")
        self._keys.add(key)
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        parts = _split_at_magic(record)
        for i, part in enumerate(parts):
            if len(parts) == 1:
                cflag = _COMPLETE
            else:
                cflag = _START if i == 0 else _END if i == len(parts) - 1 else _MIDDLE
            self._rec.write(_CHUNK_HEADER.pack(_MAGIC, cflag << _FLAG_SHIFT | len(part)))
            self._rec.write(part)
            self._rec.write(bytes(_padding(len(part))))

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _read_idx(idx_path: Path, rec_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Keys (ascending, unique) and their offsets, checked against the size of the ``.rec``."""
    text = idx_path.read_text(encoding="ascii", errors="replace")
    fields = text.split()
    if len(fields) % 2 or text.count("\t") != len(fields) // 2:
        raise RecordIOError(f"{idx_path}: expected lines 'key<TAB>offset'")
    try:
        table = np.array(fields, dtype=np.int64).reshape(-1, 2)
    except ValueError as error:
        raise RecordIOError(f"{idx_path}: keys and offsets must be integers ({error})") from None
    order = np.argsort(table[:, 0], kind="stable")
    keys, offsets = table[order, 0], table[order, 1]
    duplicate = np.flatnonzero(np.diff(keys) == 0)
    if duplicate.size:
        raise RecordIOError(f"{idx_path}: key {keys[duplicate[0]]} appears more than once")
    rec_size = rec_path.stat().st_size
    beyond_end = (offsets < 0) | (offsets + _CHUNK_HEADER.size > rec_size)
    for bad, reason in (
        (beyond_end, f"beyond the end of the {rec_size}-byte file (is it truncated?)"),
        (offsets % 4 != 0, "not a multiple of 4, so not a record start"),
    ):
        if bad.any():
            i = int(np.argmax(bad))
            raise RecordIOError(
                f"{idx_path} does not match {rec_path}: key {keys[i]} points at byte offset "
                f"{offsets[i]}, {reason}"
            )
    return keys, offsets


class RecordIOReader:
    """Random access to the records of a ``.rec`` by the keys of its ``.idx``.

    Safe in DataLoader workers: the file is opened lazily in each process (a handle inherited
    through ``fork`` is replaced, and none is pickled), and reads use ``os.pread``.
    """

    def __init__(self, rec_path: str | PathLike[str], idx_path: str | PathLike[str]) -> None:
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        self._keys, self._offsets = _read_idx(self.idx_path, self.rec_path)
        self._file: BinaryIO | None = None
        self._pid: int | None = None

    @property
    def keys(self) -> list[int]:
        """All keys of the ``.idx``, ascending."""
        return self._keys.tolist()

    def __len__(self) -> int:
        return len(self._keys)

    def _position(self, key: int) -> int | None:
        i = int(np.searchsorted(self._keys, key))
        return i if i < len(self._keys) and self._keys[i] == key else None

    def _fd(self) -> int:
        if self._file is None or self._pid != os.getpid():
            self._file = open(self.rec_path, "rb", buffering=0)
            self._pid = os.getpid()
        return self._file.fileno()

    def read(self, key: int) -> bytes:
        """The record stored under ``key``, its parts re-joined."""
        position = self._position(key)
        if position is None:
            raise RecordIOError(f"key {key} is not in {self.idx_path}")
        start = int(self._offsets[position])
        fd, parts, offset = self._fd(), [], start
        while True:
            header = os.pread(fd, _CHUNK_HEADER.size, offset)
            if len(header) < _CHUNK_HEADER.size:
                raise self._truncated(key, start, offset)
            magic, lrecord = _CHUNK_HEADER.unpack(header)
            cflag, length = lrecord >> _FLAG_SHIFT, lrecord & _MAX_LENGTH
            if magic != _MAGIC:
                cause = "is corrupt"
                if offset == start:
                    cause += f" or {self.idx_path.name} does not match it"
                raise RecordIOError(
                    f"{self.rec_path}: expected the RecordIO magic number 0x{_MAGIC:08X} at byte offset "
                    f"{offset} (record key {key} at offset {start}), found 0x{magic:08X}; "
                    f"{self.rec_path.name} {cause}"
                )
            if offset == start and cflag not in (_COMPLETE, _START):
                raise RecordIOError(
                    f"{self.idx_path} does not match {self.rec_path}: key {key} points at byte offset "
                    f"{start}, the middle of a multi-part record (chunk flag {cflag})"
                )
            if offset != start and cflag not in (_MIDDLE, _END):
                raise RecordIOError(
                    f"{self.rec_path}: the multi-part record key {key} at byte offset {start} is cut off "
                    f"by a chunk with flag {cflag} at byte offset {offset}; the file is corrupt"
                )
            padded = length + _padding(length)
            chunk = os.pread(fd, padded, offset + _CHUNK_HEADER.size)
            if len(chunk) < padded:
                raise self._truncated(key, start, offset)
            parts.append(chunk[:length] if padded != length else chunk)
            offset += _CHUNK_HEADER.size + padded
            if cflag in (_COMPLETE, _END):
                return _MAGIC_BYTES.join(parts)

    def read_head(self, key: int, size: int) -> bytes:
        """The first ``size`` bytes of the record ``key`` (fewer if it is shorter), read from its
        first chunk without the rest: for scanning the labels of millions of records."""
        position = self._position(key)
        if position is None:
            raise RecordIOError(f"key {key} is not in {self.idx_path}")
        start = int(self._offsets[position])
        head = os.pread(self._fd(), _CHUNK_HEADER.size + size, start)
        if len(head) < _CHUNK_HEADER.size:
            raise self._truncated(key, start, start)
        magic, lrecord = _CHUNK_HEADER.unpack_from(head)
        if magic != _MAGIC:
            return self.read(key)[:size]  # read() says what is wrong
        return head[_CHUNK_HEADER.size : _CHUNK_HEADER.size + min(size, lrecord & _MAX_LENGTH)]

    def _truncated(self, key: int, start: int, offset: int) -> RecordIOError:
        return RecordIOError(
            f"{self.rec_path} is truncated: it ends ({os.fstat(self._fd()).st_size} bytes) inside the "
            f"chunk at byte offset {offset} of record key {key} (which starts at byte offset {start})"
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._pid = None

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_pid": None}


# --- insightface layout ---------------------------------------------------------------------------


def read_property(path: str | PathLike[str]) -> tuple[int, int, int]:
    """``(num_classes, height, width)`` from an insightface ``property`` file (``85742,112,112``)."""
    text = Path(path).read_text(encoding="ascii", errors="replace").strip()
    try:
        values = [int(field) for field in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) <= 0:
        raise RecordIOError(
            f"{path}: expected one line 'num_classes,height,width' of positive integers "
            f"(e.g. '85742,112,112'); got {text[:80]!r}"
        )
    return values[0], values[1], values[2]


def read_header(reader: RecordIOReader, key: int) -> tuple[IRHeader, bytes]:
    """:func:`unpack` of record ``key``, with errors naming the file and key."""
    record = reader.read(key)
    try:
        return unpack(record)
    except RecordIOError as error:
        raise RecordIOError(f"{reader.rec_path}, record key {key}: {error}") from None


def image_keys(reader: RecordIOReader) -> Sequence[int]:
    """The image records: ``range(1, id_start)`` when record 0 is an insightface header (flag > 0),
    else every key (as ``MXFaceDataset``)."""
    header, _ = read_header(reader, 0)
    if header.flag > 0:
        return range(1, int(header.label[0]))  # type: ignore[index]
    return reader.keys


def identity_key_ranges(reader: RecordIOReader) -> list[range]:
    """The image keys of each class of an insightface ``.rec``: record 0 labels the identity
    records ``[id_start, id_end)``, and identity record ``id_start + c`` labels class ``c``'s
    images ``[first key, end key)``."""
    header, _ = read_header(reader, 0)
    if header.flag == 0 or not isinstance(header.label, tuple):
        raise RecordIOError(f"{reader.rec_path}: record 0 is not an insightface header; cannot group images by identity")
    id_start, id_end = (int(v) for v in header.label[:2])
    ranges = []
    for key in range(id_start, id_end):
        identity, _ = read_header(reader, key)
        if identity.flag == 0 or not isinstance(identity.label, tuple) or len(identity.label) < 2:
            raise RecordIOError(
                f"{reader.rec_path}: record {key} should be the identity record of class {key - id_start} "
                f"(label [first key, end key)); got flag {identity.flag}, label {identity.label}"
            )
        ranges.append(range(int(identity.label[0]), int(identity.label[1])))
    return ranges


def read_image_record(reader: RecordIOReader, key: int) -> tuple[int, bytes]:
    """``(class id, encoded image)`` of image record ``key``; a vector label gives its first value
    (``MXFaceDataset``)."""
    header, payload = read_header(reader, key)
    label = header.label[0] if isinstance(header.label, tuple) else header.label
    return int(label), payload


def image_labels(reader: RecordIOReader, keys: Sequence[int]) -> np.ndarray:
    """The class id of each image record of ``keys`` (int64), as :func:`read_image_record` reads
    it, from the first 28 bytes of every record: no image is read or decoded."""
    labels = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        head = reader.read_head(key, _IR_HEADER.size + 4)
        flag = struct.unpack_from("<I", head)[0] if len(head) >= 4 else 0
        if len(head) < _IR_HEADER.size + (4 if flag else 0):
            raise RecordIOError(f"{reader.rec_path}, record key {key}: {len(head)} bytes are too few for its header")
        labels[i] = int(struct.unpack_from("<f", head, _IR_HEADER.size if flag else 4)[0])
    return labels


def check_insightface_rec(reader: RecordIOReader, num_classes: int, num_images: int | None = None) -> None:
    """Cheap sanity checks of an insightface ``.rec`` against its ``property`` (and the config's
    ``num_image``): a header record, ``id_end - id_start == num_classes``, the number of images, and
    labels of the first and last few images starting at 0, non-decreasing and below ``num_classes``."""
    header, _ = read_header(reader, 0)
    if header.flag == 0 or not isinstance(header.label, tuple) or len(header.label) < 2:
        raise RecordIOError(
            f"{reader.rec_path}: record 0 is not an insightface header (flag > 0, label "
            f"[id_start, id_end]); got flag {header.flag}, label {header.label}"
        )
    id_start, id_end = int(header.label[0]), int(header.label[1])
    if id_end - id_start != num_classes:
        raise RecordIOError(
            f"{reader.rec_path}: the header says {id_end - id_start} classes (ids {id_start} to "
            f"{id_end}), but num_classes is {num_classes}"
        )
    keys = image_keys(reader)
    if not keys:
        raise RecordIOError(f"{reader.rec_path} has no image records")
    if num_images is not None and len(keys) != num_images:
        raise RecordIOError(f"{reader.rec_path} has {len(keys)} images, but num_images is {num_images}")
    sample = sorted({*keys[:5], *keys[-5:]})
    labels = [read_image_record(reader, key)[0] for key in sample]
    if labels[0] != 0 or labels != sorted(labels) or labels[-1] >= num_classes:
        raise RecordIOError(
            f"{reader.rec_path}: image labels must start at 0, be non-decreasing and below "
            f"{num_classes}; keys {sample} have labels {labels}"
        )


def write_insightface_rec(
    out_dir: str | PathLike[str], images_by_class: Sequence[Sequence[np.ndarray]], quality: int = 95
) -> Path:
    """Write ``train.rec``, ``train.idx`` and ``property`` in the insightface layout: (H, W, 3) uint8
    RGB images, all of one size, as JPEG records labelled with their class index. Returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = {image.shape for images in images_by_class for image in images}
    if len(shapes) != 1:
        raise ValueError(f"all images must have one (H, W, 3) shape; got {sorted(shapes)}")
    ((height, width, _),) = shapes
    num_images = sum(len(images) for images in images_by_class)
    id_start = num_images + 1
    with RecordIOWriter(out_dir / "train.rec", out_dir / "train.idx") as writer:
        writer.write(0, pack(IRHeader(2, (id_start, id_start + len(images_by_class)), 0, 0), b""))
        key = 1
        for label, images in enumerate(images_by_class):
            for image in images:
                writer.write(key, pack(IRHeader(0, float(label), key, 0), encode_jpeg(image, quality)))
                key += 1
        first = 1
        for label, images in enumerate(images_by_class):
            end = first + len(images)
            writer.write(id_start + label, pack(IRHeader(2, (first, end), id_start + label, 0), b""))
            first = end
    (out_dir / "property").write_text(f"{len(images_by_class)},{height},{width}\n")
    return out_dir
