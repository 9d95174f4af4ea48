"""DAVIS video object segmentation: the official layout read and checked, whole sequences served
for the sequence evaluation loop (benchmarks.md §1.1).

Under ``root`` (the ``DAVIS/`` folder of the 2017 package; the 2016 package has the same
folders):

- ``JPEGImages/<resolution>/<seq>/%05d.jpg`` (``480p`` or ``Full-Resolution``; ``1080p`` in 2016);
- ``Annotations/<resolution>/<seq>/%05d.png``: index PNGs, 0 background, 1..N objects, 255 void
  (DAVIS 2016: binary 0/255 masks, one object); ``Annotations_unsupervised/`` for the
  unsupervised task;
- ``ImageSets/<year>/<split>.txt``, one sequence per line (the 2016 package's
  ``ImageSets/480p/<split>.txt`` lists frame/annotation path pairs instead; both are read).

``setup()`` checks the layout and lists everything missing; a frame without its annotation, an
annotation that is not an index PNG (an RGB rendering) and a sequence whose frames are not
numbered 0..T-1 without gaps are errors naming the file. DAVIS 2016 (``year: 2016``) scores the
2017 masks merged into one object, as hkchengrex/davis2016-evaluation does.

An evaluation item is one whole sequence (:class:`SequenceItem`): its frames (uint8
[T, H, W, 3]), its annotations (uint8 [T, H, W], for the metric), the frame names, and in the
semi-supervised task the first frame's objects (the method's input); each is served on exactly
one rank, longest first (:mod:`datamodules.sequences`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from benchmarks.metrics.davis import JAndF, Task, read_annotation, sequence_names, split_file
from datamodules.base import VisionZooDataModule
from datamodules.formats.flow import flow_to_color, read_flo
from datamodules.formats.images import read_image
from datamodules.layout import layout_error
from datamodules.resumable import loader_options, resumable_train_loader
from datamodules.sequences import sequence_loader
from datamodules.vos_clips import ClipSource, SequenceRecord, VOSClips, frame_step, frame_tensor, scan_image_masks, scan_youtube_vos

FRAME_NAME = re.compile(r"^\d{5}$")


def scan_sequence(root: Path, name: str, resolution: str, annotations: str) -> SequenceRecord:
    """The frames and annotations of ``name``; errors name the file that breaks the layout."""
    frame_dir, annotation_dir = root / "JPEGImages" / resolution / name, root / annotations / resolution / name
    frames = sorted(frame_dir.glob("*.jpg"))
    if not frames:
        raise FileNotFoundError(f"{frame_dir}: no frames (expected %05d.jpg)")
    for index, path in enumerate(frames):
        if not FRAME_NAME.match(path.stem) or int(path.stem) != index:
            raise ValueError(f"{path}: frame {index} of {name} was expected as {index:05d}.jpg; DAVIS frames are numbered "
                             "0..T-1 without gaps")
    labels = []
    for path in frames:
        annotation = annotation_dir / f"{path.stem}.png"
        if not annotation.is_file():
            raise FileNotFoundError(f"{annotation}: the annotation of frame {path.name} of {name} is missing")
        labels.append(annotation)
    return SequenceRecord(name, tuple(frames), tuple(labels))


@dataclass
class SequenceItem:
    """One sequence to evaluate: ``frames`` uint8 [T, H, W, 3], ``annotations`` uint8 [T, H, W]
    (the official label maps: 0, 1..N, 255 void), ``frame_names``, ``first_masks`` (the first
    frame's label map, void as background) in the semi-supervised task, else None, and ``flows``
    (each frame's forward optical flow as a colour-wheel image, uint8 [T, H, W, 3]) where the
    DataModule reads flow."""

    name: str
    frames: np.ndarray
    annotations: np.ndarray
    frame_names: list[str]
    first_masks: Optional[np.ndarray]
    flows: Optional[np.ndarray] = None
    eval_set: str = ""
    index: int = -1

    @property
    def num_objects(self) -> int:
        return int(np.where(self.annotations[0] == 255, 0, self.annotations[0]).max())

    def frame_tensor(self, t: int) -> Tensor:
        """Frame ``t`` as a method's input (:func:`frame_tensor`)."""
        return frame_tensor(self.frames[t])


class DAVISSequences(Dataset):
    """Whole sequences as :class:`SequenceItem` (read on access), with their flow images where a
    :class:`FlowFolder` is given."""

    def __init__(self, records: Sequence[SequenceRecord], task: Task, year: int, flow: Optional["FlowFolder"] = None) -> None:
        self.records, self.task, self.year, self.flow = list(records), task, year, flow

    def __len__(self) -> int:
        return len(self.records)

    def item_name(self, i: int) -> str:
        return self.records[i].name

    def __getitem__(self, i: int) -> SequenceItem:
        record = self.records[i]
        frames = np.stack([read_image(path) for path in record.frames])
        annotations = np.stack([read_annotation(path) for path in record.annotations])
        if annotations.shape != frames.shape[:3]:
            raise ValueError(f"{record.annotations[0]}: annotations of {record.name} are {annotations.shape[1:]}, its frames "
                             f"{frames.shape[1:3]}; evaluate at the annotations' resolution")
        if self.year == 2016:
            annotations = np.where(annotations == 255, 255, (annotations > 0).astype(np.uint8))
        first = np.where(annotations[0] == 255, 0, annotations[0]) if self.task == "semi-supervised" else None
        flows = np.stack([self.flow.image(record, t) for t in range(len(record.frames))]) if self.flow else None
        return SequenceItem(record.name, frames, annotations, record.frame_names, first, flows)


@dataclass(frozen=True)
class FlowFolder:
    """Precomputed forward optical flow, ``<root>/<seq>/<frame>.png`` (a colour-wheel rendering,
    as the zero-shot methods' authors ship it) or ``<frame>.flo`` (rendered here,
    :func:`~datamodules.formats.flow.flow_to_color`), one per frame."""

    root: Path
    format: Literal["png", "flo"] = "png"

    def path(self, record: SequenceRecord, t: int) -> Path:
        return self.root / record.name / f"{record.frames[t].stem}.{self.format}"

    def check(self, records: Sequence[SequenceRecord]) -> None:
        """An error listing every frame of ``records`` without its flow."""
        missing = [str(self.path(r, t)) for r in records for t in range(len(r.frames)) if not self.path(r, t).is_file()]
        if missing:
            raise layout_error("optical flow", self.root, missing, "(one flow per frame: python -m datamodules.prepare "
                               "davis_flow computes them)")

    def image(self, record: SequenceRecord, t: int) -> np.ndarray:
        """The flow of frame ``t`` as an RGB image at the frame's size."""
        path = self.path(record, t)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the flow of frame {t} of {record.name} is missing (python -m "
                                    "datamodules.prepare davis_flow computes it)")
        return flow_to_color(read_flo(path)) if self.format == "flo" else read_image(path)


class DAVISDataModule(VisionZooDataModule):
    """DAVIS (module docstring): ``year`` 2017 or 2016, ``split`` (val), ``resolution`` (480p or
    Full-Resolution), ``task`` (semi-supervised or unsupervised).

    Training clips (:class:`~datamodules.vos_clips.VOSClips`) of ``num_frames`` (3) frames,
    crops of ``crop_size`` (384), the temporal skip growing by one every ``skip_every_epochs``
    epochs up to ``max_skip`` (25; STM's training code grows it every 3000 iterations),
    ``batch_size`` clips a rank, from the ``train_sources``:

    - ``davis``: ``clips_per_sequence`` clips of every sequence of ``train_split`` an epoch;
    - ``youtube_vos``: ``youtube_vos_clips_per_video`` of every video of ``youtube_vos_split``
      under ``youtube_vos_root`` (its own layout);
    - ``static_images``: ``static_clips_per_image`` deformation clips of every image under
      ``static_images_root`` (``images/`` + ``masks/``; STM's stage 1), corners moved by up to
      ``static_deformation`` of the image size.

    STM's third-party code draws DAVIS with probability 0.08 beside YouTube-VOS: the clip counts
    set the mix.

    ``flow_root``: each evaluation sequence's flow images (:class:`FlowFolder`, ``flow_format``
    png or flo), for the zero-shot methods; every frame's flow is checked in ``setup()``."""

    benchmark = "davis"

    def __init__(
        self,
        root: str,
        year: Literal[2016, 2017] = 2017,
        split: str = "val",
        resolution: str = "480p",
        task: Task = "semi-supervised",
        train_split: str = "train",
        num_frames: int = 3,
        crop_size: int = 384,
        max_skip: int = 25,
        skip_every_epochs: int = 1,
        max_objects: int = 3,
        clips_per_sequence: int = 1,
        train_sources: list[Literal["davis", "youtube_vos", "static_images"]] = ["davis"],
        youtube_vos_root: Optional[str] = None,
        youtube_vos_split: str = "train",
        youtube_vos_clips_per_video: int = 1,
        static_images_root: Optional[str] = None,
        static_clips_per_image: int = 1,
        static_deformation: float = 0.1,
        batch_size: int = 4,
        flow_root: Optional[str] = None,
        flow_format: Literal["png", "flo"] = "png",
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_split, self.batch_size = train_split, batch_size
        self.clips = dict(num_frames=num_frames, crop_size=crop_size, max_skip=max_skip, skip_every_epochs=skip_every_epochs,
                          max_objects=max_objects, static_deformation=static_deformation)
        unknown = sorted(set(train_sources) - {"davis", "youtube_vos", "static_images"})
        if unknown or not train_sources:
            raise ValueError(f"data.train_sources must be a non-empty list of davis, youtube_vos, static_images; got {train_sources}")
        for source, source_root in (("youtube_vos", youtube_vos_root), ("static_images", static_images_root)):
            if source in train_sources and not source_root:
                raise ValueError(f"data.train_sources has {source}: give its folder as data.{source}_root")
        if year not in (2016, 2017):
            raise ValueError(f"data.year must be 2016 or 2017; got {year}")
        if task not in ("semi-supervised", "unsupervised"):
            raise ValueError(f"data.task must be semi-supervised or unsupervised; got {task!r}")
        self.root, self.year, self.split, self.resolution, self.task = Path(root), year, split, resolution, task
        self.num_workers = num_workers
        self.flow = FlowFolder(Path(flow_root), flow_format) if flow_root else None
        self.sequences: Optional[DAVISSequences] = None
        self.train_clips: Optional[VOSClips] = None

    @property
    def run_name(self) -> str:
        """``<year>_<split>``, ``_unsupervised``, and the training sources where they are not DAVIS
        alone (``2017_val_static_images``: stage 1 does not overwrite stage 2's run)."""
        sources = self.hparams.train_sources
        return (f"{self.year}_{self.split}" + ("_unsupervised" if self.task == "unsupervised" else "")
                + ("" if list(sources) == ["davis"] else "_" + "+".join(sources)))

    @property
    def num_skipped(self) -> int:
        return 0

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root.resolve()), "year": self.year, "split": self.split, "resolution": self.resolution,
                "task": self.task, "sequences": len(self.sequences.records) if self.sequences else None}

    def eval_set_names(self, stage: Literal["val", "test"]) -> list[str]:
        return [self.split]

    def setup(self, stage: Optional[str] = None) -> None:
        """The training clips for ``fit``; the evaluation sequences for the other stages and for a
        ``fit`` that validates (checked before the first step)."""
        if stage in ("fit", None) and self.train_clips is None:
            self.train_clips = VOSClips(self._clip_sources(), **self.clips)
        validates = stage != "fit" or self.trainer is None or self.trainer.limit_val_batches != 0
        if validates and self.sequences is None:
            records = self._records(self.split)
            if self.flow is not None:
                self.flow.check(records)
            self.sequences = DAVISSequences(records, self.task, self.year, self.flow)

    def _clip_sources(self) -> list[ClipSource]:
        h = self.hparams
        sources = []
        if "davis" in h.train_sources:
            sources.append(ClipSource("davis", tuple(self._records(self.train_split, "Annotations")), h.clips_per_sequence))
        if "youtube_vos" in h.train_sources:
            records = scan_youtube_vos(Path(h.youtube_vos_root), h.youtube_vos_split)
            sources.append(ClipSource("youtube_vos", records, h.youtube_vos_clips_per_video, frame_step(records)))
        if "static_images" in h.train_sources:
            records = scan_image_masks(Path(h.static_images_root))
            sources.append(ClipSource("static_images", records, h.static_clips_per_image, static=True))
        return sources

    def _records(self, split: str, annotations: Optional[str] = None) -> list[SequenceRecord]:
        """The checked records of ``split`` (the task's annotations unless ``annotations``)."""
        annotations = annotations or ("Annotations_unsupervised" if self.task == "unsupervised" else "Annotations")
        split_list = split_file(self.root, self.year, split, self.resolution)
        required = [split_list, self.root / "JPEGImages" / self.resolution, self.root / annotations / self.resolution]
        missing = [str(path) for path in required if not path.exists()]
        if not missing:
            names = sequence_names(split_list)
            missing = [str(self.root / folder / self.resolution / name) for name in names
                       for folder in ("JPEGImages", annotations) if not (self.root / folder / self.resolution / name).is_dir()]
        if missing:
            raise layout_error("DAVIS", self.root, missing, f"(DAVIS {self.year} {split}, {self.resolution}, {self.task})")
        return [scan_sequence(self.root, name, self.resolution, annotations) for name in names]

    def train_dataloader(self) -> DataLoader:
        """Shuffled clips, the epoch in the index (the growing skip), resumable mid-epoch."""
        self.setup("fit")
        return resumable_train_loader(self.train_clips, self.trainer, drop_last=True, epoch_in_index=True,
                                      **loader_options(self.batch_size, self.num_workers))

    def test_dataloader(self) -> DataLoader:
        """One sequence a batch, each on one rank (:class:`~datamodules.sequences.SequenceShards`)."""
        self.setup("test")
        lengths = [len(record.frames) for record in self.sequences.records]
        return sequence_loader(self.split, self.sequences, lengths, self.trainer, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def sequence_metric(self) -> JAndF:
        """The official J&F of this task and year."""
        return JAndF(self.task, self.year)

