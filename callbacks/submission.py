"""Official result files, written by ``visionzoo test`` beside ``results.json``.

:class:`SubmissionWriter` is the slot: a test-time callback that writes each evaluated batch's
files from the batch and the method's ``test_step`` outputs into a staging folder and, once
every rank has finished, replaces ``<run dir>/<directory>`` with it, so a test that fails half
way leaves the previous submission whole. Each rank writes the samples it evaluated (a sample
that the distributed sampler repeats is written twice with the same content). The run
directory must be shared by the ranks, as it is for checkpoints.

Writers: :class:`MVTecTIFFMaps` (MVTec AD), :class:`DAVISResults` (DAVIS), :class:`MOTResults` and
:class:`MOTGroundTruth` (MOT17); :class:`KaggleRetrievalCSV` (GLDv2, one file from the
whole test's rankings). The benchmark's ``python -m benchmarks.metrics.<benchmark>``
scores such files with visionzoo's metric code where it has one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from benchmarks.metrics.davis import write_label_map
from benchmarks.metrics.mot import write_ground_truth, write_seqmap, write_tracks
from benchmarks.metrics.retrieval import GLDv2Protocol, write_retrieval_submission
from lightning_modules.distributed.comm import all_gather_objects


def replace_directory(final: Path, staging: Path) -> None:
    """Put the finished folder ``staging`` in the place of ``final`` (the old one is removed only
    once the new one is in place)."""
    previous = final.with_name(f".{final.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        final.rename(previous)
    staging.rename(final)
    shutil.rmtree(previous, ignore_errors=True)


class SubmissionWriter(Callback):
    """Base of the official-file writers (module docstring); subclasses implement :meth:`write_batch`."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.skipped: str | None = None  # why this test writes no submission (the previous one stays)

    def _paths(self, trainer: Trainer) -> tuple[Path, Path]:
        final = Path(trainer.default_root_dir) / self.directory
        return final, final.with_name(f".{final.name}.partial")

    def write_batch(self, directory: Path, batch: dict[str, Any], outputs: dict[str, Any]) -> None:
        """Write the files of one test batch under ``directory``, or set :attr:`skipped` to the
        reason the outputs cannot make this submission (nothing more is written, the previous
        submission stays)."""
        raise NotImplementedError

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.skipped = None
        _, staging = self._paths(trainer)
        if trainer.is_global_zero:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        trainer.strategy.barrier()

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch is not None and self.skipped is None:
            self.write_batch(self._paths(trainer)[1], batch, outputs)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            final, staging = self._paths(trainer)
            if self.skipped is not None:
                shutil.rmtree(staging, ignore_errors=True)
                rank_zero_info(f"{type(self).__name__}: no submission written ({self.skipped}); {final} is unchanged")
                return
            replace_directory(final, staging)
            rank_zero_info(f"{type(self).__name__}: submission files written to {final}")


class MVTecTIFFMaps(SubmissionWriter):
    """Anomaly maps as the official MVTec AD evaluation (``evaluate_experiment.py``) reads them:
    ``<run dir>/<directory>/<category>/test/<defect>/<image>.tiff``, float32, one channel, at
    the ground truth's size (run with ``data.mask_resolution: original``, the default).

    ``map_field`` names the ``test_step`` output written (MSFlow: ``anomaly_map``, its
    localisation map, whose maximum is the official image score; visionzoo's AU-PRO of MSFlow
    uses its ``detection_map``, so the official script's AU-PRO of these files can differ from
    ``results.json``'s ``aupro``). The category and defect come from each image's path
    ``<root>/<category>/test/<defect>/<image>.png``.
    """

    def __init__(self, directory: str = "mvtec_anomaly_maps", map_field: str = "anomaly_map") -> None:
        super().__init__(directory)
        self.map_field = map_field

    def write_batch(self, directory: Path, batch: dict[str, Any], outputs: dict[str, Any]) -> None:
        if self.map_field not in outputs:
            raise KeyError(f"MVTecTIFFMaps writes the test_step output {self.map_field!r}; the method returns "
                           f"{sorted(outputs)} (set map_field)")
        maps = outputs[self.map_field].detach().float().cpu().numpy()
        if maps.shape[1:] != tuple(batch["mask"].shape[1:]):
            self.skipped = (f"the {self.map_field!r} maps are {maps.shape[1]}x{maps.shape[2]}, not at the ground truth's "
                            f"size {batch['mask'].shape[1]}x{batch['mask'].shape[2]}: the official files need the official "
                            "protocol (MSFlow's evaluation_protocol 'authors' scores at the input resolution)")
            return
        for path, anomaly_map in zip(batch["path"], maps):
            image = Path(path)
            target = directory / image.parents[2].name / "test" / image.parent.name / f"{image.stem}.tiff"
            target.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(target, np.ascontiguousarray(anomaly_map, dtype=np.float32))


class DAVISResults(SubmissionWriter):
    """DAVIS results in the official layout, ``<run dir>/davis_results/<seq>/<frame>.png``: index
    PNGs with the DAVIS palette and the annotations' frame names, from the sequence loop's
    ``result`` label maps (0/255 masks for DAVIS 2016), what the official evaluation and the
    CodaLab server read."""

    def __init__(self, directory: str = "davis_results") -> None:
        super().__init__(directory)

    def write_batch(self, directory: Path, batch: dict[str, Any], outputs: dict[str, Any]) -> None:
        for frame, labels in zip(outputs["frame_names"], outputs["result"]):
            write_label_map(directory / outputs["name"] / f"{frame}.png", labels)


class MOTResults(SubmissionWriter):
    """MOTChallenge result files, ``<run dir>/mot_results/<seq>.txt`` (``frame,id,x,y,w,h,conf,-1,-1,-1``,
    frames from 1), one per tracked sequence, test sequences without ground truth included: the
    files the MOTChallenge server takes (zipped) and ``python -m benchmarks.metrics.mot`` scores."""

    def __init__(self, directory: str = "mot_results") -> None:
        super().__init__(directory)

    def write_batch(self, directory: Path, batch: Any, outputs: dict[str, Any]) -> None:
        write_tracks(directory / f"{outputs['name']}.txt", outputs["result"])


class MOTGroundTruth(SubmissionWriter):
    """The ground truth the test scored, in TrackEval's layout, ``<run dir>/mot_ground_truth/<seq>/gt/gt.txt``
    with its ``seqinfo.ini`` and ``seqmap.txt`` (the half split's renumbered second halves), so
    that ``python -m benchmarks.metrics.mot <run>/mot_ground_truth <run>/mot_results --seqmap
    <run>/mot_ground_truth/seqmap.txt`` reproduces the run's numbers with TrackEval's own loop."""

    def __init__(self, directory: str = "mot_ground_truth") -> None:
        super().__init__(directory)
        self.names: list[str] = []

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        self.names = []

    def write_batch(self, directory: Path, batch: Any, outputs: dict[str, Any]) -> None:
        annotations = batch.annotations
        if annotations.ground_truth is not None:
            write_ground_truth(directory / batch.name, annotations.ground_truth, annotations.length, batch.frame_rate)
            self.names.append(batch.name)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        names = sorted(name for part in all_gather_objects(self.names) for name in part)
        if trainer.is_global_zero:
            write_seqmap(self._paths(trainer)[1] / "seqmap.txt", names)
        super().on_test_end(trainer, pl_module)


class KaggleRetrievalCSV(Callback):
    """GLDv2's Kaggle retrieval file, ``<run dir>/<file>`` (``id,images``: the ``max_predictions``
    best index ids of each query, space-separated), from the rankings the test's
    :class:`~benchmarks.metrics.retrieval.GLDv2Protocol` scored; written by rank 0, atomically.
    ``python -m benchmarks.metrics.retrieval gldv2 SOLUTION FILE`` scores it with the same code."""

    def __init__(self, file: str = "submission.csv", max_predictions: int = 100) -> None:
        self.file, self.max_predictions = file, max_predictions

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        protocol = getattr(pl_module, "retrieval_protocol", None)
        if not isinstance(protocol, GLDv2Protocol):
            raise TypeError(f"KaggleRetrievalCSV writes GLDv2 rankings; this test scored {type(protocol).__name__}")
        if trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / self.file
            write_retrieval_submission(path, {q: ids[: self.max_predictions] for q, ids in protocol.rankings.items()})
            rank_zero_info(f"Kaggle retrieval submission ({len(protocol.rankings)} queries) written to {path}")
