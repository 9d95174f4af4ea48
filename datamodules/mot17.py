"""MOT17 (and any data in the MOTChallenge layout: MOT16, MOT20, a user's own) for joint
detection-and-embedding trackers (benchmarks.md §2.1).

Under ``root``: ``<split>/<seq>/{img1/%06d.jpg, gt/gt.txt, det/det.txt, seqinfo.ini}``. MOT17
ships every sequence three times, one folder per public detector (``-DPM``, ``-FRCNN``,
``-SDP``) with the same frames and ground truth: ``detector`` (FRCNN) keeps one folder per
sequence so that no ground truth is counted three times; ``detector: null`` keeps every folder
(MOT16, MOT20, or all 21 MOT17 folders as the official MOT17-train seqmap does).

- :func:`read_seqinfo`: frame rate, length, size, image folder and extension (a missing key is
  an error naming the file and the key).
- :func:`read_ground_truth`: the nine gt.txt columns (frame, id, x, y, w, h, consider flag,
  class, visibility) as rows [N, 9]; a malformed row or a frame beyond ``seqLength`` is an error
  naming the file and the line.
- The **half split** of FairMOT/ByteTrack (``protocol: half``): each training sequence's frames
  0..L//2 (0-based) train, frames L//2+1..L−1 are the validation sequence, its ground truth
  renumbered from frame 1 (ByteTrack's ``gt_val_half.txt``); ``protocol: full`` trains on all
  training frames and tracks ``eval_split`` (``test``: written, not scored).

Training items are frames with their pedestrian boxes (class 1, consider flag 1) and track ids
made unique across sequences (each sequence's ids offset past the previous ones'), augmented as
JDE's loader (albumentations: random affine with rotation ±5°, translation ±10 %, scale
0.5–1.2; brightness and saturation ±50 %; letterbox to ``image_size`` (608×1088) on grey;
horizontal flip) and collated with a variable number of boxes per image
(:func:`collate_frames`). Evaluation items are whole sequences (:class:`MOTSequenceItem`, frames
read on demand), each on one rank (:mod:`datamodules.sequences`), scored by TrackEval
(:class:`~benchmarks.metrics.mot.TrackEvalMetric`).
"""

from __future__ import annotations

import configparser
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import albumentations as A
import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from benchmarks.metrics.mot import TrackEvalMetric
from datamodules.base import VisionZooDataModule
from datamodules.formats.images import read_image
from datamodules.layout import layout_error
from datamodules.resumable import AugmentationRNG, loader_options, resumable_train_loader
from datamodules.sequences import sequence_loader
from datamodules.vos_clips import frame_tensor

SEQINFO_KEYS = ("frameRate", "seqLength", "imWidth", "imHeight", "imDir", "imExt")
PEDESTRIAN = 1
LETTERBOX_FILL = 127


@dataclass(frozen=True)
class SeqInfo:
    name: str
    frame_rate: float
    length: int
    width: int
    height: int
    image_dir: str
    image_ext: str


def read_seqinfo(path: Path) -> SeqInfo:
    """``seqinfo.ini``'s [Sequence] section; a missing file or key is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; every MOTChallenge sequence folder has a seqinfo.ini")
    ini = configparser.ConfigParser()
    ini.optionxform = str
    ini.read(path)
    if "Sequence" not in ini:
        raise ValueError(f"{path}: no [Sequence] section")
    section = ini["Sequence"]
    missing = [key for key in SEQINFO_KEYS if key not in section]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)} in [Sequence] (expected {', '.join(SEQINFO_KEYS)})")
    try:
        return SeqInfo(section.get("name", path.parent.name), float(section["frameRate"]), int(section["seqLength"]),
                       int(section["imWidth"]), int(section["imHeight"]), section["imDir"], section["imExt"])
    except ValueError as error:
        raise ValueError(f"{path}: {error}; frameRate, seqLength, imWidth and imHeight are numbers") from None


def read_ground_truth(path: Path, length: int) -> np.ndarray:
    """gt.txt rows [N, 9] float64 (frame, id, x, y, w, h, consider, class, visibility); a row
    without nine numbers, or with a frame outside 1..``length``, is an error naming the line."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.replace(" ", "").split(",")
        try:
            values = [float(value) for value in fields]
        except ValueError:
            values = []
        if len(values) != 9:
            raise ValueError(f"{path}:{number}: {line!r}; expected 9 numbers: frame, id, x, y, w, h, consider, class, visibility")
        if not 1 <= values[0] <= length:
            raise ValueError(f"{path}:{number}: frame {values[0]:g} beyond seqLength {length} of seqinfo.ini")
        rows.append(values)
    return np.array(rows, dtype=np.float64).reshape(-1, 9)


@dataclass
class MOTAnnotations:
    """What the metric reads of a sequence: ground-truth rows (None for a test sequence) and its length."""

    ground_truth: Optional[np.ndarray]
    length: int


@dataclass
class MOTSequence:
    """A sequence to track: ``frames`` (paths, in order), ``ground_truth`` rows [N, 9] with frames
    numbered from 1 in ``frames`` (None without ground truth), and ``info``."""

    name: str
    frames: list[Path]
    ground_truth: Optional[np.ndarray]
    info: SeqInfo


@dataclass
class MOTSequenceItem:
    """One sequence for the sequence loop: ``frames`` are paths (read on demand by
    :meth:`frame`), ``annotations`` for the metric, ``input_size`` (height, width) the
    letterboxed network input of training."""

    name: str
    frames: list[Path]
    annotations: MOTAnnotations
    frame_rate: float
    input_size: tuple[int, int]
    frame_names: list[str] = field(default_factory=list)
    eval_set: str = ""
    index: int = -1

    def frame(self, t: int) -> np.ndarray:
        """Frame ``t`` (0-based) as RGB uint8 [H, W, 3]."""
        return read_image(self.frames[t])


def scan_sequence(folder: Path, require_gt: bool) -> MOTSequence:
    """A MOTChallenge sequence folder, checked: seqinfo.ini, every frame 1..seqLength, gt.txt."""
    info = read_seqinfo(folder / "seqinfo.ini")
    frames = [folder / info.image_dir / f"{t:06d}{info.image_ext}" for t in range(1, info.length + 1)]
    missing = [path for path in frames if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: missing ({len(missing)} of the {info.length} frames seqinfo.ini lists are)")
    gt_file = folder / "gt" / "gt.txt"
    if require_gt and not gt_file.is_file():
        raise FileNotFoundError(f"{gt_file}: missing; training and scored sequences need their ground truth")
    ground_truth = read_ground_truth(gt_file, info.length) if gt_file.is_file() else None
    return MOTSequence(folder.name, frames, ground_truth, info)


def split_half(sequence: MOTSequence) -> tuple[MOTSequence, MOTSequence]:
    """(train, val) halves (module docstring): frames 0..L//2 and L//2+1..L−1 (0-based), the val
    ground truth renumbered from frame 1."""
    cut = sequence.info.length // 2 + 1  # the number of training frames
    gt = sequence.ground_truth
    train_gt = gt[gt[:, 0] <= cut]
    val_gt = gt[gt[:, 0] > cut].copy()
    val_gt[:, 0] -= cut
    val_info = SeqInfo(sequence.info.name, sequence.info.frame_rate, sequence.info.length - cut, sequence.info.width,
                       sequence.info.height, sequence.info.image_dir, sequence.info.image_ext)
    return (MOTSequence(sequence.name, sequence.frames[:cut], train_gt, sequence.info),
            MOTSequence(sequence.name, sequence.frames[cut:], val_gt, val_info))


def pedestrian_rows(ground_truth: np.ndarray) -> np.ndarray:
    """The rows a tracker trains on: class 1 with the consider flag set."""
    return ground_truth[(ground_truth[:, 7] == PEDESTRIAN) & (ground_truth[:, 6] != 0)]


class MOTFrames(AugmentationRNG, Dataset):
    """Training frames (module docstring). Items: ``image`` [3, H, W] normalised, ``boxes`` [n, 4]
    (x1, y1, x2, y2 in input pixels), ``track_ids`` [n] int64 (unique across sequences), and with
    ``previous_frame`` the frame before it (same augmentation) and its boxes and ids."""

    def __init__(self, sequences: Sequence[MOTSequence], image_size: tuple[int, int], previous_frame: bool = False) -> None:
        self.samples: list[tuple[MOTSequence, int, int]] = []  # (sequence, 0-based frame, sequence index)
        self.boxes_by_frame: list[dict[int, np.ndarray]] = []  # per sequence: 1-based frame -> [n, 5] x, y, w, h, id
        offset = 0
        for index, sequence in enumerate(sequences):
            rows = pedestrian_rows(sequence.ground_truth)
            ids = np.unique(rows[:, 1])
            unique_ids = offset + np.searchsorted(ids, rows[:, 1])  # this sequence's ids after the previous ones'
            boxes = np.concatenate([rows[:, 2:6], unique_ids[:, None]], axis=1)
            self.boxes_by_frame.append({int(t): boxes[rows[:, 0] == t] for t in np.unique(rows[:, 0])})
            self.samples += [(sequence, t, index) for t in range(1 if previous_frame else 0, len(sequence.frames))]
            offset += len(ids)
        self.num_ids, self.previous_frame = offset, previous_frame
        height, width = image_size
        targets = {"image_previous": "image", "bboxes_previous": "bboxes"} if previous_frame else {}
        self.transform = A.Compose([
            A.Affine(rotate=(-5, 5), translate_percent=(-0.1, 0.1), scale=(0.5, 1.2), fill=LETTERBOX_FILL, p=1.0),
            A.ColorJitter(brightness=0.5, contrast=0.0, saturation=0.5, hue=0.0, p=1.0),
            A.LongestMaxSize(max_size_hw=(height, width)),
            A.PadIfNeeded(height, width, border_mode=cv2.BORDER_CONSTANT, fill=LETTERBOX_FILL),
            A.HorizontalFlip(),
        ], bbox_params=A.BboxParams(format="coco", clip=True, min_area=4.0, filter_invalid_bboxes=True),
            additional_targets=targets)  # each box row carries its id as a fifth column

    def __len__(self) -> int:
        return len(self.samples)

    def _frame(self, sequence: MOTSequence, index: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame t (0-based) and its boxes [n, 5] (x, y, w, h, id)."""
        return read_image(sequence.frames[t]), self.boxes_by_frame[index].get(t + 1, np.zeros((0, 5)))

    def __getitem__(self, i: int) -> dict[str, Any]:
        sequence, t, index = self.samples[i]
        image, boxes = self._frame(sequence, index, t)
        inputs: dict[str, Any] = {"image": image, "bboxes": boxes}
        if self.previous_frame:
            inputs["image_previous"], inputs["bboxes_previous"] = self._frame(sequence, index, t - 1)
        self.transform.set_random_seed(self.draw_seed())
        out = self.transform(**inputs)
        item = _frame_item(out["image"], out["bboxes"])
        if self.previous_frame:
            item |= {f"previous_{key}": value for key, value in _frame_item(out["image_previous"], out["bboxes_previous"]).items()}
        return item


def _frame_item(image: np.ndarray, boxes: Any) -> dict[str, Tensor]:
    """The model's input: the normalised image, boxes [n, 4] as corners, their ids [n]."""
    rows = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    corners = np.concatenate([rows[:, :2], rows[:, :2] + rows[:, 2:4]], axis=1).astype(np.float32)
    return {"image": frame_tensor(image), "boxes": torch.from_numpy(corners), "track_ids": torch.from_numpy(rows[:, 4].astype(np.int64))}


def collate_frames(items: list[dict[str, Tensor]]) -> dict[str, Any]:
    """Images stacked [B, 3, H, W]; ``boxes`` and ``track_ids`` (and their ``previous_`` versions)
    as lists, one tensor per image (a variable number of boxes)."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if key.endswith("image") else values
    return batch


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float, tuple[float, float]]:
    """``image`` resized to fit (height, width) ``size`` and centred on grey, as the training
    transform; returns it, the scale and the (x, y) padding, to map boxes back."""
    height, width = size
    scale = min(height / image.shape[0], width / image.shape[1])
    new_h, new_w = round(image.shape[0] * scale), round(image.shape[1] * scale)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out = np.full((height, width, 3), LETTERBOX_FILL, np.uint8)
    out[top : top + new_h, left : left + new_w] = resized
    return out, scale, (float(left), float(top))


class MOTSequences(Dataset):
    def __init__(self, sequences: Sequence[MOTSequence], input_size: tuple[int, int]) -> None:
        self.sequences, self.input_size = list(sequences), input_size

    def __len__(self) -> int:
        return len(self.sequences)

    def item_name(self, i: int) -> str:
        return self.sequences[i].name

    def __getitem__(self, i: int) -> MOTSequenceItem:
        sequence = self.sequences[i]
        return MOTSequenceItem(sequence.name, sequence.frames, MOTAnnotations(sequence.ground_truth, len(sequence.frames)),
                               sequence.info.frame_rate, self.input_size,
                               [f"{t:06d}" for t in range(1, len(sequence.frames) + 1)])


class MOT17DataModule(VisionZooDataModule):
    """MOT17 and other MOTChallenge-layout data (module docstring): ``protocol`` half (train on
    the first half of each training sequence, score the second) or full (train on all of
    ``train``, track ``eval_split``); ``detector`` the folder suffix kept (null: every folder);
    ``benchmark`` TrackEval's distractor classes (MOT17, MOT16, MOT20); ``image_size`` (height,
    width) the letterboxed input; ``previous_frame`` adds the frame before each training frame
    (CorrTracker's temporal correlation)."""

    benchmark = "mot17"

    def __init__(
        self,
        root: str,
        protocol: Literal["half", "full"] = "half",
        train_split: str = "train",
        eval_split: str = "test",
        detector: Optional[str] = "FRCNN",
        benchmark_name: Literal["MOT15", "MOT16", "MOT17", "MOT20"] = "MOT17",
        image_size: tuple[int, int] = (608, 1088),
        previous_frame: bool = False,
        batch_size: int = 12,
        num_workers: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if protocol not in ("half", "full"):
            raise ValueError(f"data.protocol must be half or full; got {protocol!r}")
        self.root, self.protocol, self.detector = Path(root), protocol, detector
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_frames: Optional[MOTFrames] = None
        self.eval_sequences: Optional[MOTSequences] = None

    @property
    def run_name(self) -> str:
        return "val_half" if self.protocol == "half" else self.hparams.eval_split

    @property
    def num_skipped(self) -> int:
        return 0

    @property
    def num_ids(self) -> int:
        """Identities of the training data (the re-ID classifier's classes)."""
        self.setup("fit")
        return self.train_frames.num_ids

    @property
    def seqmap_name(self) -> str:
        """The name of the scored sequence list: ``MOT17-val_half-FRCNN``, ``MOT17-test-all`` ..."""
        split = "val_half" if self.protocol == "half" else self.hparams.eval_split
        return f"{self.hparams.benchmark_name}-{split}-{self.detector or 'all'}"

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root.resolve()), "protocol": self.protocol, "detector": self.detector,
                "benchmark": self.hparams.benchmark_name, "seqmap": self.seqmap_name,
                "sequences": [s.name for s in self.eval_sequences.sequences] if self.eval_sequences else None}

    def eval_set_names(self, stage: Literal["val", "test"]) -> list[str]:
        return [self.run_name]

    def sequence_folders(self, split: str) -> list[Path]:
        """The sequence folders of ``split`` kept by ``detector``."""
        split_root = self.root / split
        if not split_root.is_dir():
            raise layout_error("MOTChallenge", self.root, [str(split_root)], "(expected <split>/<sequence>/img1, seqinfo.ini)")
        folders = sorted(path for path in split_root.iterdir() if path.is_dir())
        if self.detector is not None:
            folders = [path for path in folders if path.name.endswith(f"-{self.detector}")]
        if not folders:
            raise FileNotFoundError(f"{split_root}: no sequence folder" + (f" ending in -{self.detector}; MOT16/MOT20 and other "
                                    "data without detector suffixes need data.detector null" if self.detector else ""))
        return folders

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_frames is not None and self.eval_sequences is not None:
            return
        h = self.hparams
        scored_train = [scan_sequence(folder, require_gt=True) for folder in self.sequence_folders(h.train_split)]
        if self.protocol == "half":
            halves = [split_half(sequence) for sequence in scored_train]
            train, evaluated = [first for first, _ in halves], [second for _, second in halves]
        else:
            train = scored_train
            evaluated = [scan_sequence(folder, require_gt=False) for folder in self.sequence_folders(h.eval_split)]
        self.train_frames = MOTFrames(train, tuple(h.image_size), h.previous_frame)
        self.eval_sequences = MOTSequences(evaluated, tuple(h.image_size))

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return resumable_train_loader(self.train_frames, self.trainer, drop_last=True, collate_fn=collate_frames,
                                      **loader_options(self.batch_size, self.num_workers))

    def test_dataloader(self) -> DataLoader:
        """One sequence a batch, each on one rank (:class:`~datamodules.sequences.SequenceShards`)."""
        self.setup("test")
        lengths = [len(sequence.frames) for sequence in self.eval_sequences.sequences]
        return sequence_loader(self.run_name, self.eval_sequences, lengths, self.trainer, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def sequence_metric(self) -> TrackEvalMetric:
        return TrackEvalMetric(self.hparams.benchmark_name)
