"""MOTChallenge tracking metrics, computed by TrackEval 1.3.0 itself (benchmarks.md §2.2), not a
rewrite.

TrackEval's ``MotChallenge2DBox`` reads the ground truth (``<seq>/gt/gt.txt``) and the tracker
files (``<seq>.txt``: ``frame,id,x,y,w,h,conf,-1,-1,-1``, 1-based frames) and preprocesses each
frame as the official evaluation does: tracker boxes matched (Hungarian, IoU ≥ 0.5) to a
ground truth of a distractor class (person on vehicle, static person, distractor, reflection;
MOT20 also non-MOT vehicle) are removed, then only pedestrians (class 1) with the consider flag
set are kept; visibility is not used. Its HOTA (19 α, the mean over α), CLEAR (MOTA, MOTP, IDSW,
Frag, MT/PT/ML) and Identity (IDF1, IDP, IDR) metrics score each sequence; sequences combine by
summing the counts (and TP-weighting the association scores), TrackEval's ``combine_sequences``.

- :class:`TrackEvalMetric`: the sequence metric of the evaluation layer. Each sequence's ground
  truth and tracks are written in the MOTChallenge layout to a scratch folder and scored by
  TrackEval (the per-sequence statistics), and :meth:`~TrackEvalMetric.combine_rows` combines
  them once; :func:`summary` picks the reported numbers.
- ``python -m benchmarks.metrics.mot GT_ROOT RESULTS_DIR [--seqmap FILE] [--benchmark MOT17] [--out DIR]``
  runs TrackEval's own ``Evaluator`` on any folder of result files against ground truth in the
  MOTChallenge layout (``GT_ROOT/<seq>/gt/gt.txt`` and ``seqinfo.ini``), prints its tables and
  with ``--out`` keeps its summary and detailed files there.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import io
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from benchmarks.metrics.base import SequenceMetric

TRACKEVAL_VERSION = "1.3.0"
# The numbers a run reports: HOTA's are means over the 19 α, as TrackEval's summary.
HOTA_FIELDS = ("HOTA", "DetA", "AssA", "DetRe", "DetPr", "AssRe", "AssPr", "LocA")
CLEAR_FIELDS = ("MOTA", "MOTP", "IDSW", "Frag", "MT", "PT", "ML", "CLR_TP", "CLR_FN", "CLR_FP")
IDENTITY_FIELDS = ("IDF1", "IDP", "IDR", "IDTP", "IDFN", "IDFP")


def trackeval():
    """The ``trackeval`` package, checked to be the version this module was written against."""
    try:
        import trackeval as package
    except ImportError as error:
        raise ImportError(f"MOT evaluation runs TrackEval {TRACKEVAL_VERSION}: pip install --no-deps "
                          f"trackeval=={TRACKEVAL_VERSION} (the Makefile does)") from error
    if package.__version__ != TRACKEVAL_VERSION:
        raise ImportError(f"trackeval {package.__version__} is installed; visionzoo checked {TRACKEVAL_VERSION} "
                          f"(pip install --no-deps trackeval=={TRACKEVAL_VERSION})")
    return package


def _metrics(count: bool = True) -> list[Any]:
    """HOTA, CLEAR and Identity at IoU 0.5 (TrackEval's defaults), and Count (which TrackEval's
    ``Evaluator`` adds by itself)."""
    te = trackeval()
    metrics = [te.metrics.HOTA(), te.metrics.CLEAR({"THRESHOLD": 0.5, "PRINT_CONFIG": False}),
               te.metrics.Identity({"THRESHOLD": 0.5, "PRINT_CONFIG": False})]
    return metrics + [te.metrics.Count()] if count else metrics


# ----------------------------------------------------------------------------------- files


def write_tracks(path: Path, tracks: np.ndarray) -> None:
    """A MOTChallenge result file: rows [N, 7] (frame 1-based, id, x, y, w, h, score) as
    ``frame,id,x,y,w,h,score,-1,-1,-1``, sorted by frame then id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tracks = np.asarray(tracks, dtype=np.float64).reshape(-1, 7)
    order = np.lexsort((tracks[:, 1], tracks[:, 0]))
    with open(path, "w") as f:
        for frame, track, x, y, w, h, score in tracks[order]:
            f.write(f"{int(frame)},{int(track)},{x:.2f},{y:.2f},{w:.2f},{h:.2f},{score:.4f},-1,-1,-1\n")


def write_ground_truth(folder: Path, rows: np.ndarray, length: int, frame_rate: float = 30.0,
                       size: tuple[int, int] = (1080, 1920)) -> None:
    """``folder/gt/gt.txt`` from rows [N, 9] (frame, id, x, y, w, h, consider, class, visibility)
    and ``folder/seqinfo.ini``, the layout TrackEval reads."""
    (folder / "gt").mkdir(parents=True, exist_ok=True)
    with open(folder / "gt" / "gt.txt", "w") as f:
        for frame, track, x, y, w, h, consider, cls, visibility in np.asarray(rows, dtype=np.float64).reshape(-1, 9):
            f.write(f"{int(frame)},{int(track)},{x:g},{y:g},{w:g},{h:g},{int(consider)},{int(cls)},{visibility:g}\n")
    ini = configparser.ConfigParser()
    ini.optionxform = str  # keep seqLength's case
    ini["Sequence"] = {"name": folder.name, "imDir": "img1", "frameRate": f"{frame_rate:g}", "seqLength": str(length),
                       "imWidth": str(size[1]), "imHeight": str(size[0]), "imExt": ".jpg"}
    with open(folder / "seqinfo.ini", "w") as f:
        ini.write(f, space_around_delimiters=False)


def write_seqmap(path: Path, names: Sequence[str]) -> None:
    """A TrackEval seqmap: the header ``name``, then one sequence a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("name\n" + "".join(f"{name}\n" for name in names))


# ------------------------------------------------------------------------------- scoring


def _dataset(gt_folder: Path, trackers_folder: Path, tracker: str, benchmark: str, seq_info: Optional[dict] = None,
             seqmap: Optional[Path] = None, output: Optional[Path] = None) -> Any:
    config = {"GT_FOLDER": str(gt_folder), "TRACKERS_FOLDER": str(trackers_folder), "TRACKERS_TO_EVAL": [tracker],
              "TRACKER_SUB_FOLDER": "", "SKIP_SPLIT_FOL": True, "BENCHMARK": benchmark, "SPLIT_TO_EVAL": "train",
              "PRINT_CONFIG": False, "SEQ_INFO": seq_info, "SEQMAP_FILE": str(seqmap) if seqmap else None,
              "OUTPUT_FOLDER": str(output) if output else None}
    return trackeval().datasets.MotChallenge2DBox(config)


def evaluate_sequence(name: str, ground_truth: np.ndarray, tracks: np.ndarray, length: int,
                      benchmark: str = "MOT17") -> dict[str, dict[str, Any]]:
    """TrackEval's per-sequence statistics {metric name: fields} of ``tracks`` [N, 7] against the
    ground-truth rows [M, 9] of a sequence of ``length`` frames (written to a scratch folder in
    the MOTChallenge layout and read back by TrackEval)."""
    te = trackeval()
    with tempfile.TemporaryDirectory(prefix="visionzoo-mot-") as scratch:
        root = Path(scratch)
        write_ground_truth(root / "gt" / name, ground_truth, length)
        write_tracks(root / "trackers" / "tracker" / f"{name}.txt", tracks)
        dataset = _dataset(root / "gt", root / "trackers", "tracker", benchmark, seq_info={name: length})
        metrics = _metrics()
        with contextlib.redirect_stdout(io.StringIO()):
            result = te.eval.eval_sequence(name, dataset, "tracker", ["pedestrian"], metrics,
                                           [metric.get_name() for metric in metrics])
    return result["pedestrian"]


def combine(per_sequence: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """TrackEval's ``combine_sequences`` of each metric over the sequences' statistics."""
    combined = {}
    for metric in _metrics():
        name = metric.get_name()
        combined[name] = metric.combine_sequences({seq: stats[name] for seq, stats in per_sequence.items()})
    return combined


def summary(statistics: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The reported numbers of one sequence's or the combined statistics: HOTA's fields as means
    over α (TrackEval's summary), CLEAR's and Identity's as they are."""
    hota, clear, identity = statistics["HOTA"], statistics["CLEAR"], statistics["Identity"]
    values = {field: float(np.mean(hota[field])) for field in HOTA_FIELDS}
    values |= {field: float(clear[field]) for field in CLEAR_FIELDS}
    values |= {field: float(identity[field]) for field in IDENTITY_FIELDS}
    return values


class TrackEvalMetric(SequenceMetric):
    """The MOTChallenge metrics (module docstring) as a sequence metric: one row per sequence
    holding TrackEval's statistics, combined once. ``benchmark`` picks TrackEval's distractor
    classes (MOT17, MOT16, MOT20). A sequence without ground truth (a test sequence) gives no
    row: it is tracked and written, not scored."""

    def __init__(self, benchmark: str = "MOT17") -> None:
        self.benchmark = benchmark

    def sequence_rows(self, name: str, annotations: Any, prediction: np.ndarray) -> list[dict[str, Any]]:
        if annotations is None or annotations.ground_truth is None:
            return []
        statistics = evaluate_sequence(name, annotations.ground_truth, prediction, annotations.length, self.benchmark)
        return [{"Sequence": name, "statistics": statistics}]

    def combine_rows(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        if not rows:
            return {}
        return summary(combine({row["Sequence"]: row["statistics"] for row in rows}))

    def tables(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        return {"per_sequence": [{"Sequence": row["Sequence"], **summary(row["statistics"])} for row in rows]}


def score_results_folder(gt_root: Path, results: Path, seqmap: Optional[Path] = None, benchmark: str = "MOT17",
                         out: Optional[Path] = None, quiet: bool = False) -> dict[str, dict[str, float]]:
    """TrackEval's ``Evaluator`` on ``results/<seq>.txt`` against ``gt_root/<seq>/gt/gt.txt`` (and
    ``seqinfo.ini``) for the sequences of ``seqmap`` (every ``gt_root`` sequence when None):
    {sequence or ``COMBINED``: :func:`summary`}; with ``out`` its summary and detailed files
    are written to ``out/<results folder name>/`` (TrackEval's layout)."""
    te = trackeval()
    if not results.is_dir():
        raise FileNotFoundError(f"{results}: no such folder; expected MOTChallenge result files <seq>.txt")
    seq_info = None
    if seqmap is None:
        names = sorted(path.parent.parent.name for path in gt_root.glob("*/gt/gt.txt"))
        if not names:
            raise FileNotFoundError(f"{gt_root}: no <seq>/gt/gt.txt; expected ground truth in the MOTChallenge layout")
        seq_info = {name: None for name in names}  # lengths from seqinfo.ini
    elif not seqmap.is_file():
        raise FileNotFoundError(f"{seqmap}: no such seqmap")
    write = out is not None
    config = {"USE_PARALLEL": False, "PRINT_CONFIG": False, "TIME_PROGRESS": False, "PRINT_RESULTS": not quiet,
              "OUTPUT_SUMMARY": write, "OUTPUT_DETAILED": write, "PLOT_CURVES": False, "LOG_ON_ERROR": None,
              "BREAK_ON_ERROR": True}
    if write:
        out.mkdir(parents=True, exist_ok=True)
    dataset = _dataset(gt_root, results.parent, results.name, benchmark, seq_info=seq_info, seqmap=seqmap, output=out)
    stream = io.StringIO() if quiet else None
    with contextlib.redirect_stdout(stream) if quiet else contextlib.nullcontext():
        results_by_dataset, messages = te.Evaluator(config).evaluate([dataset], _metrics(count=False))
    per_sequence = results_by_dataset["MotChallenge2DBox"][results.name]
    if per_sequence is None:
        raise RuntimeError(f"TrackEval could not evaluate {results}: {messages['MotChallenge2DBox'][results.name]}")
    return {("COMBINED" if seq == "COMBINED_SEQ" else seq): summary(stats["pedestrian"]) for seq, stats in per_sequence.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metrics.mot",
                                     description="Score MOTChallenge result files with TrackEval (HOTA, CLEAR, Identity).")
    parser.add_argument("gt_root", type=Path, help="ground truth: <seq>/gt/gt.txt and <seq>/seqinfo.ini")
    parser.add_argument("results_dir", type=Path, help="tracker output: <seq>.txt")
    parser.add_argument("--seqmap", type=Path, help="the sequences to score (TrackEval seqmap); default: all of gt_root")
    parser.add_argument("--benchmark", default="MOT17", choices=["MOT15", "MOT16", "MOT17", "MOT20"])
    parser.add_argument("--out", type=Path, help="keep TrackEval's summary and detailed files in this folder")
    args = parser.parse_args(argv)
    scores = score_results_folder(args.gt_root, args.results_dir, args.seqmap, args.benchmark, args.out)
    combined = scores["COMBINED"]
    print("COMBINED  " + "  ".join(f"{key} {combined[key]:.3f}" for key in ("HOTA", "DetA", "AssA", "MOTA", "IDF1"))
          + f"  IDSW {combined['IDSW']:.0f}")
    if args.out:
        print(f"TrackEval's summary and detailed files: {args.out / args.results_dir.name}")


if __name__ == "__main__":
    main()
