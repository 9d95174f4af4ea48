"""UCF101 (Soomro et al., 2012) in its official layout, read as clips with decord or PyAV.

Layout (benchmarks.md §4)::

    <root>/UCF-101/<Class>/v_<Class>_gXX_cYY.avi
    <root>/ucfTrainTestlist/classInd.txt          "1 ApplyEyeMakeup" ... 1-based
    <root>/ucfTrainTestlist/trainlist0{1,2,3}.txt  "ApplyEyeMakeup/v_..._g08_c01.avi 1"
    <root>/ucfTrainTestlist/testlist0{1,2,3}.txt   "ApplyEyeMakeup/v_..._g01_c01.avi"

Labels are 0-based positions in ``classInd.txt``, whose order is case-insensitive
alphabetical (Python's ``sorted()`` swaps HammerThrow/Hammering and JumpRope/JumpingJack, so
the mapping is never derived from the folders). The class of a video is its folder, never its
file name: the ``HandstandPushups`` folder holds ``v_HandStandPushups_*.avi``. List files may
end lines with CRLF.

Training samples come from a :class:`ClipSampler` (by default one random clip per video per
epoch; the pretext samplers of SeCo, CMD and CSTP subclass it). Validation and test read the
test list as ``val_clips`` / ``test_clips`` uniformly spaced clips per video with a centre
crop, each carrying ``video_index`` so that scores can be averaged per video, and the eval set's
name (``val``, ``test``; with ``test_gallery`` the train list is a second test set, ``gallery``,
the gallery of clip retrieval).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Optional

from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from datamodules.base import EvalSet, VisionZooDataModule
from datamodules.corrupt import CorruptSamples, collate_dropping_skipped
from datamodules.clips import ClipSampler, ClipSpec, VideoRecord, clip_indices, eval_clip, uniform_starts
from datamodules.formats.images import CorruptFileError
from datamodules.formats.video import Backend, VideoReader, backend_choice, resolve_backend
from datamodules.layout import layout_error
from datamodules.resumable import AugmentationRNG, eval_loader, loader_options, resumable_train_loader

log = logging.getLogger(__name__)

VIDEO_FOLDER = "UCF-101"
LIST_FOLDER = "ucfTrainTestlist"


def read_class_index(path: Path) -> list[str]:
    """Class names of ``classInd.txt`` in file order (line k is label k − 1)."""
    classes = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit():
            raise ValueError(f"{path}:{line_number}: expected '<index> <ClassName>', got {line!r}")
        if int(fields[0]) != len(classes) + 1:
            raise ValueError(f"{path}:{line_number}: expected index {len(classes) + 1}, got {fields[0]}")
        classes.append(fields[1])
    if not classes:
        raise ValueError(f"{path} lists no classes")
    return classes


def read_split_list(path: Path, classes: list[str], root: Path) -> list[VideoRecord]:
    """The videos of a ``trainlist``/``testlist`` file of the dataset at ``root``. The class comes
    from the folder part of each line; a label given on the line (train lists, 1-based) must agree
    with it."""
    label_of = {name: i for i, name in enumerate(classes)}
    records = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        name = fields[0]
        folder = name.split("/")[0]
        if "/" not in name or folder not in label_of:
            raise ValueError(f"{path}:{line_number}: {name!r} is not <Class>/<video> with a class of classInd.txt")
        label = label_of[folder]
        if len(fields) > 1 and fields[1] != str(label + 1):
            raise ValueError(f"{path}:{line_number}: label {fields[1]} disagrees with classInd.txt, "
                             f"which gives {folder} the label {label + 1}")
        records.append(VideoRecord(root / VIDEO_FOLDER / name, label, name, root))
    return records


class _VideoFiles(AugmentationRNG, Dataset):
    """Opens videos with the chosen backend; skips and counts corrupt ones if asked
    (:mod:`datamodules.corrupt`)."""

    def __init__(self, records: list[VideoRecord], backend: Backend, decode_threads: int, skip_corrupt: bool) -> None:
        self.records = records
        self.backend = backend
        self.decode_threads = decode_threads
        self.corrupt = CorruptSamples(skip_corrupt, "video", max_in_a_row=50)

    @property
    def num_skipped(self) -> int:
        return self.corrupt.count

    def _open(self, record: VideoRecord) -> VideoReader:
        return VideoReader(record.path, self.backend, self.decode_threads)


class TrainVideos(_VideoFiles):
    """One sample per video per epoch from ``sampler``, plus ``label``, ``path`` and ``video_index``.
    With ``skip_corrupt`` a corrupt video is replaced by a random other one."""

    def __init__(self, records: list[VideoRecord], sampler: ClipSampler, spec: ClipSpec, backend: Backend = "auto",
                 decode_threads: int = 1, skip_corrupt: bool = False) -> None:
        super().__init__(records, backend, decode_threads, skip_corrupt)
        self.sampler = sampler
        self.spec = spec

    def __len__(self) -> int:
        return len(self.records)

    def _sample(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        sample = self.sampler(self._open(record), record, self.spec, self.generator)
        return {**sample, "label": record.label, "path": str(record.path), "video_index": i}

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.corrupt.read_or_replace(self._sample, i, len(self), self.generator)


class EvalClips(_VideoFiles):
    """``clips_per_video`` uniformly spaced clips of every video (centre crop), item k being
    clip k % clips_per_video of video k // clips_per_video. With ``skip_corrupt`` the clips of a
    corrupt video are dropped from their batch (:func:`collate_dropping_skipped`) and counted."""

    def __init__(self, records: list[VideoRecord], clips_per_video: int, spec: ClipSpec, backend: Backend = "auto",
                 decode_threads: int = 1, skip_corrupt: bool = False) -> None:
        super().__init__(records, backend, decode_threads, skip_corrupt)
        self.clips_per_video = clips_per_video
        self.spec = spec

    def __len__(self) -> int:
        return len(self.records) * self.clips_per_video

    def item_name(self, i: int) -> str:
        return str(self.records[i // self.clips_per_video].path)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        video_index, clip_index = divmod(i, self.clips_per_video)
        record = self.records[video_index]
        try:
            video = self._open(record)
            spec = self.spec
            start = uniform_starts(len(video), spec.span, self.clips_per_video)[clip_index]
            frames = video.frames(clip_indices(start, spec.num_frames, spec.frame_stride, len(video)))
        except CorruptFileError as error:
            if clip_index == 0:
                self.corrupt.skip(error, "left out of the evaluation")
            elif not self.corrupt.skip_corrupt:
                raise
            return None
        return {"video": eval_clip(frames, self.spec.image_size, self.spec.resize), "label": record.label,
                "path": str(record.path), "video_index": video_index, "clip_index": clip_index}


class UCF101DataModule(VisionZooDataModule):
    """UCF101 clips of split ``split`` (1 to 3); see the module docstring for the layout.

    ``num_frames``, ``frame_stride``, ``image_size`` and ``resize`` are the clip geometry
    (:class:`ClipSpec`) of every clip; ``train_sampler`` builds the training samples (default
    :class:`ClipSampler`, one random clip; pretext tasks give their own).
    ``backend``: ``auto`` (torchcodec where its FFmpeg libraries load, else decord; the run logs
    which), ``torchcodec``, ``decord`` (both seeking, fast) or ``pyav`` (sequential decoding, for
    files the others mis-seek); ``decode_threads`` is the decoder's threads per DataLoader worker.
    """

    benchmark = "ucf101"

    def __init__(
        self,
        root: str,
        split: Literal[1, 2, 3] = 1,
        num_frames: int = 16,
        frame_stride: int = 4,
        image_size: int = 112,
        resize: int = 128,
        train_sampler: Optional[ClipSampler] = None,
        val_clips: int = 1,
        test_clips: int = 10,
        test_gallery: bool = False,
        batch_size: int = 16,
        num_workers: int = 4,
        backend: Backend = "auto",
        decode_threads: int = 1,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["train_sampler"])
        if split not in (1, 2, 3):
            raise ValueError(f"data.split must be 1, 2 or 3, got {split}")
        self.root = Path(root)
        self.split = split
        self.train_sampler = train_sampler or ClipSampler()
        self.clip_spec = ClipSpec(num_frames, frame_stride, image_size, resize)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, Dataset] = {}

    @property
    def list_folder(self) -> Path:
        return self.root / LIST_FOLDER

    @property
    def run_name(self) -> str:
        return f"split{self.split}"

    @property
    def classes(self) -> list[str]:
        """Class names in label order (``classInd.txt``)."""
        self._check_layout()
        return read_class_index(self.list_folder / "classInd.txt")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def records(self, which: Literal["train", "test"]) -> list[VideoRecord]:
        """The videos of this split's train or test list."""
        return read_split_list(self.list_folder / f"{which}list0{self.split}.txt", self.classes, self.root)

    @property
    def num_skipped(self) -> int:
        """Corrupt videos met so far (``skip_corrupt=True``)."""
        return sum(dataset.num_skipped for dataset in self.datasets.values())

    def describe(self) -> dict[str, Any]:
        """What the results writer records about the evaluated data."""
        hp = self.hparams
        return {"root": str(self.root.resolve()), "split": self.split, "num_frames": hp.num_frames,
                "frame_stride": hp.frame_stride, "image_size": hp.image_size, "resize": hp.resize,
                "test_clips": hp.test_clips, "query": f"testlist0{self.split}",
                "gallery": f"trainlist0{self.split}" if hp.test_gallery else None}

    def eval_set_names(self, stage: Literal["val", "test"]) -> list[str]:
        """``val``: the test list at ``val_clips`` per video; ``test``: the test list at ``test_clips``
        (``test``), with ``test_gallery`` also the train list (``gallery``), in loader order."""
        if stage == "val":
            return ["val"]
        return ["gallery", "test"] if self.hparams.test_gallery else ["test"]

    # ----------------------------------------------------------------------------- setup

    def _check_layout(self) -> None:
        names = ["classInd.txt", f"trainlist0{self.split}.txt", f"testlist0{self.split}.txt"]
        missing = [str(self.list_folder / name) for name in names if not (self.list_folder / name).is_file()]
        if not (self.root / VIDEO_FOLDER).is_dir():
            missing.append(f"{self.root / VIDEO_FOLDER}/<Class>/v_<Class>_gXX_cYY.avi")
        if missing:
            raise layout_error("UCF101", self.root, missing)

    def setup(self, stage: Optional[str] = None) -> None:
        """Parse the lists, check that every listed video exists and that no video is in both."""
        self._check_layout()
        train, test = self.records("train"), self.records("test")
        missing = [str(r.path) for r in train + test if not r.path.is_file()]
        if missing:
            raise layout_error("UCF101", self.root, missing, f"(videos listed in {self.list_folder} but not on disk)")
        leaked = sorted({r.name for r in train} & {r.name for r in test})
        if leaked:
            raise ValueError(f"split {self.split}: {len(leaked)} videos are in both the train and the test list, e.g. {leaked[:3]}")
        hp = self.hparams
        rank_zero_info(f"UCF101 videos decoded with {backend_choice(hp.backend)}")
        io = {"backend": resolve_backend(hp.backend), "decode_threads": hp.decode_threads, "skip_corrupt": hp.skip_corrupt}
        self.datasets = {
            "train": TrainVideos(train, self.train_sampler, self.clip_spec, **io),
            "val": EvalClips(test, hp.val_clips, self.clip_spec, **io),
            "test": EvalClips(test, hp.test_clips, self.clip_spec, **io),
        }
        if hp.test_gallery:
            self.datasets["gallery"] = EvalClips(train, hp.test_clips, self.clip_spec, **io)

    # ----------------------------------------------------------------------------- loaders

    def _eval_loader(self, name: str):
        options = loader_options(self.batch_size, self.num_workers)
        return eval_loader(EvalSet(name, self.datasets[name]), collate_fn=collate_dropping_skipped, **options)

    def train_dataloader(self):
        options = loader_options(self.batch_size, self.num_workers)
        return resumable_train_loader(self.datasets["train"], self.trainer, drop_last=True, **options)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        """The eval sets of :meth:`eval_set_names` (``test``), one loader each."""
        loaders = [self._eval_loader(name) for name in self.eval_set_names("test")]
        return loaders if len(loaders) > 1 else loaders[0]

    def predict_dataloader(self):
        """``visionzoo predict`` encodes the clips of the test sets (``test``, and ``gallery`` with
        ``test_gallery``): ``test_clips`` centre-cropped clips a video, row k being clip
        k % test_clips of video k // test_clips."""
        return self.test_dataloader()
