"""Image retrieval: the faiss search every retrieval benchmark shares, the GLDv2 metrics of the
official ``metrics.py``, the revisited Oxford/Paris metric of ``revisitop``, and the
compatibility protocol of model upgrades (benchmarks.md §6, §7).

Search (:func:`search`): features are L2-normalised and ranked by inner product, exactly
(``IndexFlatIP``, the default) or approximately (``IndexIVFFlat`` with ``nlist`` cells, ``nprobe``
visited, for the 1M-distractor database). Binary codes (BEBR, :class:`BinaryRetrievalMetric`)
are packed eight bits a byte (:func:`pack_bits`) and searched by Hamming distance
(``IndexBinaryFlat``, ``IndexBinaryHNSW``: :func:`build_binary_index`), optionally the Hamming
shortlist re-ranked by inner product of float vectors (:func:`rerank`); :func:`index_bytes` is
an index's stored size.

GLDv2 (tensorflow/models ``delf/python/datasets/google_landmarks_dataset/metrics.py``):

- **mAP@k** (:func:`mean_average_precision`): per query of the solution, Σ P@i·rel(i) over the
  first k predictions divided by **min(|GT|, k)**; a duplicate prediction is skipped but keeps its
  rank; a query without predictions counts 0 (the mean is over the solution's queries); a
  predicted query absent from the solution is an error.
- **mean precision@k** (:func:`mean_precisions`), **GAP** (:func:`global_average_precision`: one
  (class, score) per test image, all sorted by score, then id, then class; normalised by the
  images with a non-empty GT; non-landmark images stay as false positives unless
  ``ignore_non_gt_test_images``), **top-1 accuracy**.
- Recognition (:class:`RecognitionMetric`) scores the model's nearest class centre of every test
  image of ``recognition_solution_v2.1.csv`` by GAP and top-1 accuracy.
- Solutions (:func:`read_solution`): Public and Private separate, Ignored rows dropped; scores
  are reported per split, ``mAP@100_public``, ``mAP@100_private``.

Revisited Oxford/Paris (filipradenovic/revisitop ``python/evaluate.py``, :func:`revisited_map`):
junk removed from the ranking (each positive moves up by the junk ranked before it), the
trapezoidal AP of the old Oxford ``compute_ap.cpp`` over all positives, mP@k with the
denominator min(k, rank of the last positive), queries without positives skipped; the Easy,
Medium and Hard protocols of ``example_evaluate.py``.

Benchmark metrics (:class:`RetrievalMetric`): a :class:`RetrievalProtocol` (the ground truth a
DataModule read) scores the rankings of the ``query`` eval set's embeddings against the
``gallery`` set's, per query, then combined. With ``old_embedding`` as well (a model upgrade,
:class:`CompatibilityMetric`), one pass reports the self-tests M(new, new) and M(old, old), the
cross-test M(new, old), the update gain and the negative flip rate.

``python -m benchmarks.metrics.retrieval gldv2 SOLUTION_CSV SUBMISSION_CSV [--out FILE]`` scores a
Kaggle retrieval submission with the same code.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import torch
from torch import Tensor

from benchmarks.metrics.base import BenchmarkMetric, Rows

log = logging.getLogger(__name__)

SPLITS = ("public", "private")
INDEX = "index"  # the evaluation layer's field of an item's position in its eval set


# --------------------------------------------------------------------------------------- search


def l2_normalise(features: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm; zero rows stay zero (``sklearn.preprocessing.normalize``)."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.where(norms == 0, 1.0, norms)


def as_array(array: np.ndarray | Tensor, dtype: type = np.float32) -> np.ndarray:
    if isinstance(array, Tensor):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=dtype)


@dataclass(frozen=True)
class SearchOptions:
    """How the gallery is searched: ``flat`` (exact inner product) or ``ivf`` (``nlist`` cells,
    default 4·√N, of which ``nprobe`` are visited)."""

    index: Literal["flat", "ivf"] = "flat"
    nlist: int | None = None
    nprobe: int = 16


def _unit_rows(features: np.ndarray | Tensor, name: str) -> np.ndarray:
    rows = np.ascontiguousarray(l2_normalise(as_array(features)), dtype=np.float32)
    if rows.ndim != 2 or len(rows) == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] array; got shape {rows.shape}")
    return rows


def build_index(gallery: np.ndarray | Tensor, options: SearchOptions = SearchOptions()) -> faiss.Index:
    """The faiss index of the L2-normalised ``gallery`` rows (IVF: trained on them)."""
    gallery = _unit_rows(gallery, "gallery")
    dim, size = gallery.shape[1], len(gallery)
    if options.index == "flat":
        index = faiss.IndexFlatIP(dim)
    elif options.index == "ivf":
        nlist = options.nlist or max(1, int(4 * math.sqrt(size)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, min(nlist, size), faiss.METRIC_INNER_PRODUCT)
        index.train(gallery)
        index.nprobe = options.nprobe
    else:
        raise ValueError(f"search index must be 'flat' or 'ivf'; got {options.index!r}")
    index.add(gallery)
    return index


def search(queries: np.ndarray | Tensor, gallery: np.ndarray | Tensor | faiss.Index, k: int | None,
           options: SearchOptions = SearchOptions()) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, neighbours) [Q, k]: the ``k`` gallery rows (all of them for None) of highest
    inner product with each L2-normalised query, best first; ``gallery`` as features or as a
    :func:`build_index` index. With IVF, ranks past the visited cells are -1."""
    index = gallery if isinstance(gallery, faiss.Index) else build_index(gallery, options)
    queries = _unit_rows(queries, "queries")
    if queries.shape[1] != index.d:
        raise ValueError(f"queries have dimension {queries.shape[1]}, the gallery {index.d}")
    return index.search(queries, index.ntotal if k is None else min(k, index.ntotal))


# -------------------------------------------------------------------------------- binary search


@dataclass(frozen=True)
class BinarySearchOptions:
    """How binary codes are searched (BEBR, card 12): by Hamming distance, exhaustively
    (``IndexBinaryFlat``) and through a graph (``IndexBinaryHNSW``, ``hnsw_neighbours`` links a
    node, ``ef_search`` candidates a query); and the ``shortlist`` nearest codes by Hamming
    distance re-ranked by inner product in the reconstructed float space."""

    hnsw_neighbours: int = 32
    ef_search: int = 128
    shortlist: int = 1000


def pack_bits(codes: np.ndarray | Tensor) -> np.ndarray:
    """Codes [N, bits] (±1, or 0/1: a bit is set where the value is positive) as faiss's binary
    vectors, uint8 [N, bits / 8], the first bit the most significant of its byte."""
    bits = as_array(codes) > 0
    if bits.ndim != 2 or bits.shape[1] % 8:
        raise ValueError(f"codes must be [N, bits] with bits a multiple of 8; got shape {bits.shape}")
    return np.ascontiguousarray(np.packbits(bits, axis=1))


def build_binary_index(packed: np.ndarray, kind: Literal["flat", "hnsw"],
                       options: BinarySearchOptions = BinarySearchOptions()) -> faiss.IndexBinary:
    """The faiss Hamming index of packed codes (:func:`pack_bits`)."""
    bits = packed.shape[1] * 8
    if kind == "flat":
        index = faiss.IndexBinaryFlat(bits)
    elif kind == "hnsw":
        index = faiss.IndexBinaryHNSW(bits, options.hnsw_neighbours)
        index.hnsw.efSearch = options.ef_search
    else:
        raise ValueError(f"binary index must be 'flat' or 'hnsw'; got {kind!r}")
    index.add(packed)
    return index


def index_bytes(index: faiss.Index | faiss.IndexBinary) -> int:
    """The size of a faiss index as it is stored (its serialisation: vectors, graph, header)."""
    serialize = faiss.serialize_index_binary if isinstance(index, faiss.IndexBinary) else faiss.serialize_index
    return int(serialize(index).size)


def rerank(queries: np.ndarray, gallery: np.ndarray, neighbours: np.ndarray, shortlist: int, chunk: int = 256) -> np.ndarray:
    """``neighbours`` [Q, k] with the first ``shortlist`` of each row re-ordered by inner product
    of ``queries`` [Q, D] and ``gallery`` [N, D] rows (best first; ties keep their order), the
    rest after them as they were; -1 entries stay last."""
    reordered = neighbours.copy()
    head = neighbours[:, :shortlist]
    for start in range(0, len(queries), chunk):
        rows = head[start:start + chunk]
        similarity = np.einsum("qd,qkd->qk", queries[start:start + chunk], gallery[np.maximum(rows, 0)])
        similarity[rows < 0] = -np.inf
        order = np.argsort(-similarity, axis=1, kind="stable")
        reordered[start:start + chunk, :shortlist] = np.take_along_axis(rows, order, axis=1)
    return reordered


# ----------------------------------------------------------------------------------- GLDv2


def mean_average_precision(predictions: Mapping[str, Sequence[str]], solution: Mapping[str, Sequence[str]],
                           max_predictions: int = 100) -> float:
    """GLDv2 mAP@``max_predictions`` (module docstring; official ``MeanAveragePrecision``)."""
    return float(np.mean(list(average_precisions(predictions, solution, max_predictions).values())))


def average_precisions(predictions: Mapping[str, Sequence[str]], solution: Mapping[str, Sequence[str]],
                       max_predictions: int = 100) -> dict[str, float]:
    """AP@k of every query of ``solution`` (0 for one without predictions)."""
    _check_queries(predictions, solution)
    aps = {}
    for query, expected in solution.items():
        relevant, seen, correct, ap = set(expected), set(), 0, 0.0
        for rank, image in enumerate(predictions.get(query, ())[:max_predictions], start=1):
            if image in seen:
                continue  # a duplicate: skipped, its rank stays taken
            seen.add(image)
            if image in relevant:
                correct += 1
                ap += correct / rank
        aps[query] = ap / min(len(relevant), max_predictions)
    return aps


def mean_precisions(predictions: Mapping[str, Sequence[str]], solution: Mapping[str, Sequence[str]],
                    max_predictions: int = 100) -> np.ndarray:
    """Mean precision@1..``max_predictions`` over the solution's queries (official ``MeanPrecisions``)."""
    _check_queries(predictions, solution)
    precisions = np.zeros((len(solution), max_predictions))
    for row, (query, expected) in enumerate(solution.items()):
        relevant, seen, correct = set(expected), set(), 0
        predicted = predictions.get(query, ())
        for i in range(max_predictions):
            if i < len(predicted) and predicted[i] not in seen:
                correct += predicted[i] in relevant
                seen.add(predicted[i])
            precisions[row, i] = correct / (i + 1)
    return precisions.mean(axis=0)


def global_average_precision(predictions: Mapping[str, tuple[int, float]], solution: Mapping[str, Sequence[int]],
                             ignore_non_gt_test_images: bool = False) -> float:
    """GAP of one ``(class, score)`` per test image (official ``GlobalAveragePrecision``)."""
    positives = sum(1 for landmarks in solution.values() if landmarks)
    ordered = sorted(sorted(predictions.items(), key=lambda item: (item[0], item[1][0])),
                     key=lambda item: item[1][1], reverse=True)
    gap, total, correct = 0.0, 0, 0
    for image, (landmark, _) in ordered:
        if ignore_non_gt_test_images and not solution[image]:
            continue
        total += 1
        if landmark in solution[image]:
            correct += 1
            gap += correct / total
    return gap / positives


def top1_accuracy(predictions: Mapping[str, tuple[int, float]], solution: Mapping[str, Sequence[int]]) -> float:
    """Fraction of the test images with a GT whose predicted class is in it (official ``Top1Accuracy``)."""
    with_gt = [image for image, landmarks in solution.items() if landmarks]
    return sum(image in predictions and predictions[image][0] in solution[image] for image in with_gt) / len(with_gt)


def _check_queries(predictions: Mapping[str, Any], solution: Mapping[str, Any]) -> None:
    unknown = [query for query in predictions if query not in solution]
    if unknown:
        raise ValueError(f"{len(unknown)} predicted queries are not in the solution (first: {unknown[0]})")


def csv_rows(path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file with at least ``columns`` in its header; an error naming
    the file and line for a row with another number of fields."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or not set(columns) <= set(header):
            raise ValueError(f"{path}: expected a header with the columns {','.join(columns)}; got {header}")
        rows = []
        for row in reader:
            if len(row) != len(header):
                raise ValueError(f"{path} line {reader.line_num}: expected {len(header)} fields "
                                 f"({','.join(header)}); got {len(row)}: {row}")
            rows.append((reader.line_num, dict(zip(header, row))))
    return rows


def read_solution(path: str | Path, kind: Literal["retrieval", "recognition"] = "retrieval"
                  ) -> dict[str, dict[str, list]]:
    """``{"public": {id: [...]}, "private": {...}, "ignored": {id: []}}`` from
    ``retrieval_solution_v2.1.csv`` (``id,images,Usage``: index ids) or
    ``recognition_solution_v2.1.csv`` (``id,landmarks,Usage``: landmark ints, empty for a
    non-landmark image). Ignored rows are kept only by id, so that a submission may list them;
    they are never scored (``ReadSolution``)."""
    path = Path(path)
    column = "images" if kind == "retrieval" else "landmarks"
    solution: dict[str, dict[str, list]] = {split: {} for split in (*SPLITS, "ignored")}
    for line, row in csv_rows(path, ("id", column, "Usage")):
        usage = row["Usage"].lower()
        if usage == "ignored":
            solution["ignored"][row["id"]] = []
            continue
        if usage not in SPLITS:
            raise ValueError(f"{path} line {line}: Usage must be Public, Private or Ignored; got {row['Usage']!r}")
        values = row[column].split()
        if kind == "recognition":
            try:
                values = [int(v) for v in values]
            except ValueError:
                raise ValueError(f"{path} line {line}: landmarks must be integers; got {row[column]!r}") from None
        solution[usage][row["id"]] = values
    return solution


def read_retrieval_submission(path: str | Path) -> dict[str, list[str]]:
    """``{query id: [index ids]}`` of a Kaggle retrieval CSV (``id,images``, space-separated)."""
    return {row["id"]: row["images"].split() for _, row in csv_rows(Path(path), ("id", "images"))}


def write_retrieval_submission(path: str | Path, predictions: Mapping[str, Sequence[str]]) -> None:
    """The Kaggle retrieval CSV of ``predictions``, written to a temporary file and renamed."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "images"])
        for query, images in predictions.items():
            writer.writerow([query, " ".join(images)])
    temporary.replace(path)


def score_retrieval_submission(solution: Mapping[str, Mapping[str, Sequence[str]]],
                               predictions: Mapping[str, Sequence[str]], max_predictions: int = 100,
                               precision_ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """``{"public": {"mAP@100": …, "mP@1": …}, "private": {…}}``: each split scored on its own;
    predicted Ignored queries are left out, a predicted query absent from the solution is an
    error (``ReadPredictions``)."""
    known = {query for part in solution.values() for query in part}
    unknown = [query for query in predictions if query not in known]
    if unknown:
        raise ValueError(f"{len(unknown)} predicted queries are not in the solution (first: {unknown[0]})")
    scores = {}
    for split in SPLITS:
        queries = solution[split]
        if not queries:
            continue
        own = {q: p for q, p in predictions.items() if q in queries}
        precisions = mean_precisions(own, queries, max(max_predictions, *precision_ks))
        scores[split] = {f"mAP@{max_predictions}": mean_average_precision(own, queries, max_predictions),
                         **{f"mP@{k}": float(precisions[k - 1]) for k in precision_ks}}
    return scores


# ---------------------------------------------------------------------------- revisited


def revisited_average_precision(positions: np.ndarray, num_positives: int) -> float:
    """revisitop ``compute_ap``: the trapezoidal AP of 0-based ``positions`` of the positives
    (junk removed), ``num_positives`` counting those never retrieved."""
    ap = 0.0
    for j, rank in enumerate(positions):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) / 2 / num_positives
    return ap


def revisited_query(ranking: np.ndarray, ok: Sequence[int], junk: Sequence[int],
                    kappas: Sequence[int] = (1, 5, 10)) -> tuple[float, np.ndarray, bool]:
    """(AP, mP@kappas, top-1 hit) of one query's ``ranking`` (database indices, best first);
    NaNs when ``ok`` is empty (the query is skipped)."""
    if len(ok) == 0:
        return math.nan, np.full(len(kappas), math.nan), False
    positives = np.flatnonzero(np.isin(ranking, ok))
    junk_positions = np.flatnonzero(np.isin(ranking, junk))
    positives = positives - np.searchsorted(junk_positions, positives)  # junk before each positive removed
    ap = revisited_average_precision(positives, len(ok))
    one_based = positives + 1
    last = one_based.max() if len(one_based) else math.inf
    precisions = np.array([(one_based <= min(last, k)).sum() / min(last, k) for k in kappas])
    return ap, precisions, bool(len(positives) and positives[0] == 0)


def revisited_map(ranks: np.ndarray, ground_truth: Sequence[Mapping[str, Sequence[int]]],
                  kappas: Sequence[int] = (1, 5, 10)) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """revisitop ``compute_map``: ``ranks`` [db, queries] (0-based database indices, best first)
    and per query ``{"ok": [...], "junk": [...]}``. Returns (mAP, APs, mP@kappas, P@kappas per
    query); queries without positives are NaN and left out of the means."""
    aps, precisions = [], []
    for i, query in enumerate(ground_truth):
        ap, precision, _ = revisited_query(ranks[:, i], query["ok"], query.get("junk", ()), kappas)
        aps.append(ap)
        precisions.append(precision)
    aps_array, precisions_array = np.array(aps), np.array(precisions)
    return float(np.nanmean(aps_array)), aps_array, np.nanmean(precisions_array, axis=0), precisions_array


def revisited_protocols(ground_truth: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, list[dict[str, list[int]]]]:
    """The Easy, Medium and Hard ``ok``/``junk`` lists of a ``gnd`` (revisitop ``example_evaluate.py``)."""
    return {
        "E": [{"ok": list(g["easy"]), "junk": [*g["junk"], *g["hard"]]} for g in ground_truth],
        "M": [{"ok": [*g["easy"], *g["hard"]], "junk": list(g["junk"])} for g in ground_truth],
        "H": [{"ok": list(g["hard"]), "junk": [*g["junk"], *g["easy"]]} for g in ground_truth],
    }


# -------------------------------------------------------------------- protocols and metrics


@dataclass
class QueryScores:
    """Per-query values of one ranking: ``values[name]`` [Q] (NaN: not scored for that name) and
    ``hit`` [Q] whether the top-1 result is relevant, for the flip rate; ``primary`` names the
    per-query value whose decrease is a flip under the AP predicate."""

    values: dict[str, np.ndarray]
    hit: np.ndarray
    primary: str


class RetrievalProtocol(ABC):
    """The ground truth of a retrieval benchmark, read by its DataModule, and how it scores a
    ranking. ``query_set``/``gallery_set`` name the eval sets; ``depth`` is how many neighbours it
    needs (None: the whole gallery)."""

    query_set: str = "query"
    gallery_set: str = "gallery"
    depth: int | None = None

    @abstractmethod
    def score_queries(self, neighbours: np.ndarray, query_items: np.ndarray, gallery_items: np.ndarray) -> QueryScores:
        """Per-query scores of ``neighbours`` [Q, k] (rows of the gallery, -1 for none) of the
        queries at positions ``query_items`` of the query set, against gallery rows that are the
        items ``gallery_items`` of the gallery set (skipped corrupt items are absent)."""

    @abstractmethod
    def combine(self, scores: QueryScores) -> dict[str, float]:
        """Named values of the per-query scores."""


class GLDv2Protocol(RetrievalProtocol):
    """GLDv2 retrieval: queries are the solution's test images (``query_ids``, in the query set's
    order), the gallery the index images (``index_ids``); mAP@``max_predictions`` and mP@k per
    split (Public, Private). Keeps the id rankings of its last scoring in :attr:`rankings`, for
    the Kaggle CSV."""

    query_set, gallery_set = "test", "index"

    def __init__(self, query_ids: Sequence[str], index_ids: Sequence[str], solution: Mapping[str, Mapping[str, Sequence[str]]],
                 max_predictions: int = 100, precision_ks: Sequence[int] = (1, 5, 10)) -> None:
        self.query_ids, self.index_ids = list(query_ids), np.asarray(index_ids)
        self.solution = solution
        self.max_predictions, self.precision_ks = max_predictions, tuple(precision_ks)
        self.depth = max(max_predictions, *self.precision_ks)
        self.rankings: dict[str, list[str]] = {}

    def score_queries(self, neighbours: np.ndarray, query_items: np.ndarray, gallery_items: np.ndarray) -> QueryScores:
        ids = [self.query_ids[i] for i in query_items]
        self.rankings = {query: self.index_ids[gallery_items[row[row >= 0]]].tolist() for query, row in zip(ids, neighbours)}
        # Rows: the evaluated queries, then the solution's queries that no rank evaluated (a corrupt
        # image skipped), which score 0 as in the official code (no predictions).
        evaluated = set(ids)
        rows = ids + [q for split in SPLITS for q in self.solution[split] if q not in evaluated]
        position = {query: i for i, query in enumerate(rows)}
        values: dict[str, np.ndarray] = {}
        hit = np.zeros(len(rows), bool)
        for split in SPLITS:
            queries = self.solution[split]
            predicted = {q: self.rankings[q] for q in queries if q in evaluated}
            ap = np.full(len(rows), math.nan)
            precision = {k: np.full(len(rows), math.nan) for k in self.precision_ks}
            for query, value in average_precisions(predicted, queries, self.max_predictions).items():
                row, relevant, ranking = position[query], set(queries[query]), predicted.get(query, [])
                ap[row] = value
                hit[row] = bool(ranking) and ranking[0] in relevant
                for k in self.precision_ks:
                    precision[k][row] = len(set(ranking[:k]) & relevant) / k
            values[f"mAP@{self.max_predictions}_{split}"] = ap
            for k in self.precision_ks:
                values[f"mP@{k}_{split}"] = precision[k]
        return QueryScores(values, hit, f"mAP@{self.max_predictions}_private")

    def combine(self, scores: QueryScores) -> dict[str, float]:
        return {name: _nanmean(values) for name, values in scores.values.items() if not np.isnan(values).all()}


class RevisitedProtocol(RetrievalProtocol):
    """ROxford5k / RParis6k: the ``gnd`` list (``easy``/``hard``/``junk`` database indices per
    query) over the whole database ranking; mAP and mP@``kappas`` of Easy, Medium and Hard
    (``mAP_M``, ``mP@10_M`` ...)."""

    query_set, gallery_set = "query", "database"

    def __init__(self, ground_truth: Sequence[Mapping[str, Sequence[int]]], kappas: Sequence[int] = (1, 5, 10)) -> None:
        self.protocols = revisited_protocols(ground_truth)
        self.kappas = tuple(kappas)

    def score_queries(self, neighbours: np.ndarray, query_items: np.ndarray, gallery_items: np.ndarray) -> QueryScores:
        values: dict[str, np.ndarray] = {}
        hit = np.zeros(len(query_items), bool)
        for name, protocol in self.protocols.items():
            ap = np.full(len(query_items), math.nan)
            precision = np.full((len(query_items), len(self.kappas)), math.nan)
            for row, (query, ranking) in enumerate(zip(query_items, neighbours)):
                ap[row], precision[row], top1 = revisited_query(gallery_items[ranking[ranking >= 0]], protocol[query]["ok"],
                                                                protocol[query]["junk"], self.kappas)
                if name == "M":
                    hit[row] = top1
            values[f"mAP_{name}"] = ap
            for j, k in enumerate(self.kappas):
                values[f"mP@{k}_{name}"] = precision[:, j]
        return QueryScores(values, hit, "mAP_M")

    def combine(self, scores: QueryScores) -> dict[str, float]:
        return {name: _nanmean(values) for name, values in scores.values.items()}


def _nanmean(values: np.ndarray) -> float:
    """The mean of the non-NaN values; NaN when there are none (no warning)."""
    scored = values[~np.isnan(values)]
    return float(scored.mean()) if len(scored) else math.nan


def _set_rows(sets: Mapping[str, Rows], name: str) -> Rows:
    if name not in sets:
        raise ValueError(f"retrieval needs the eval set {name!r}; evaluated: {sorted(sets)}")
    return sets[name]


class RetrievalMetric(BenchmarkMetric):
    """The protocol's scores of the ``embedding`` rows of its query set searched in those of its
    gallery set (module docstring); the mean extraction-free search time is logged."""

    fields = ("embedding",)

    def __init__(self, protocol: RetrievalProtocol, search_options: SearchOptions = SearchOptions()) -> None:
        self.protocol, self.search_options = protocol, search_options

    def query_scores(self, sets: Mapping[str, Rows], query_field: str, gallery_field: str | np.ndarray) -> QueryScores:
        """The protocol's per-query scores of the ``query_field`` features of the query set in the
        gallery set's ``gallery_field`` features (or the given gallery features, one per row)."""
        queries, gallery = _set_rows(sets, self.protocol.query_set), _set_rows(sets, self.protocol.gallery_set)
        features = gallery[gallery_field] if isinstance(gallery_field, str) else gallery_field
        start = time.perf_counter()
        _, neighbours = search(queries[query_field], features, self.protocol.depth, self.search_options)
        log.info("searched %d queries in %d gallery features (%s) in %.3f s", len(neighbours), len(features),
                 self.search_options.index, time.perf_counter() - start)
        return self.protocol.score_queries(neighbours, as_array(queries[INDEX], np.int64), as_array(gallery[INDEX], np.int64))

    def combine(self, sets: Mapping[str, Rows]) -> dict[str, float]:
        return self.protocol.combine(self.query_scores(sets, "embedding", "embedding"))


class BinaryRetrievalMetric(RetrievalMetric):
    """Binary retrieval beside float retrieval (BEBR, card 12), one search per space over the
    ``query`` and ``gallery`` sets' rows: ``float/<metric>`` the frozen float embeddings
    (``float_embedding``, exact inner product); ``hamming/<metric>`` and ``hnsw/<metric>`` the
    codes (``code``, [N, bits]) by Hamming distance, exhaustively and by the HNSW graph;
    ``reranked/<metric>`` the Hamming shortlist re-ranked in the reconstructed space
    (``embedding``). With them ``bits_per_vector``, ``index_bytes/<space>`` (the stored index)
    and ``search_ms_per_query/<space>`` (search alone, index built). The exhaustive search of the
    reconstructions themselves is the model's :class:`RetrievalMetric` (unprefixed names)."""

    fields = ("embedding", "float_embedding", "code")

    def __init__(self, protocol: RetrievalProtocol, options: BinarySearchOptions = BinarySearchOptions()) -> None:
        super().__init__(protocol)
        self.options = options

    def combine(self, sets: Mapping[str, Rows]) -> dict[str, float]:
        queries, gallery = _set_rows(sets, self.protocol.query_set), _set_rows(sets, self.protocol.gallery_set)
        size = len(gallery["code"])
        depth = size if self.protocol.depth is None else min(self.protocol.depth, size)
        query_codes, gallery_codes = pack_bits(queries["code"]), pack_bits(gallery["code"])
        results: dict[str, float] = {"bits_per_vector": float(gallery_codes.shape[1] * 8)}

        def scored(space: str, index: faiss.Index | faiss.IndexBinary, run: Callable[[], np.ndarray]) -> np.ndarray:
            start = time.perf_counter()
            neighbours = run()
            results[f"search_ms_per_query/{space}"] = 1000 * (time.perf_counter() - start) / len(neighbours)
            results[f"index_bytes/{space}"] = float(index_bytes(index))
            scores = self.protocol.score_queries(neighbours, as_array(queries[INDEX], np.int64), as_array(gallery[INDEX], np.int64))
            results.update({f"{space}/{name}": value for name, value in self.protocol.combine(scores).items()})
            return neighbours

        float_index = build_index(gallery["float_embedding"])
        scored("float", float_index, lambda: search(queries["float_embedding"], float_index, depth)[1])
        flat, hnsw = (build_binary_index(gallery_codes, kind, self.options) for kind in ("flat", "hnsw"))
        scored("hamming", flat, lambda: flat.search(query_codes, depth)[1])
        scored("hnsw", hnsw, lambda: hnsw.search(query_codes, depth)[1])
        shortlist = max(depth, min(self.options.shortlist, size))
        reconstructed_queries, reconstructed_gallery = _unit_rows(queries["embedding"], "queries"), _unit_rows(gallery["embedding"], "gallery")
        scored("reranked", flat, lambda: rerank(reconstructed_queries, reconstructed_gallery,
                                                flat.search(query_codes, shortlist)[1], shortlist)[:, :depth])
        return results


@dataclass(frozen=True)
class CompatibilityOptions:
    """The compatibility report (benchmarks.md §7): ``flip_predicate`` ``top1`` (the query's top-1
    result was relevant with the old model and is not after the upgrade) or ``ap`` (its primary
    per-query value decreased); ``oracle_self_test`` the self-test M(new*, new*) of a new model
    trained without the compatibility constraint, by metric name (default: the tested model's
    own self-test)."""

    flip_predicate: Literal["top1", "ap"] = "top1"
    oracle_self_test: dict[str, float] = field(default_factory=dict)
    refresh_ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    refresh_order: Literal["random", "uncertainty"] = "random"
    refresh_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "refresh_ratios", tuple(float(r) for r in self.refresh_ratios))  # a list from YAML
        if any(not 0.0 <= r <= 1.0 for r in self.refresh_ratios):
            raise ValueError(f"compatibility.refresh_ratios must lie in [0, 1], got {list(self.refresh_ratios)}")
        if self.refresh_order not in ("random", "uncertainty"):
            raise ValueError(f"compatibility.refresh_order must be 'random' or 'uncertainty', got {self.refresh_order!r}")


class CompatibilityMetric(RetrievalMetric):
    """A model upgrade in one pass: ``embedding`` (the new model) and ``old_embedding`` of every
    item give ``new_new/<metric>``, ``old_old/<metric>`` and ``new_old/<metric>`` (new queries, old
    gallery), ``update_gain/<metric>`` = (M(new, old) - M(old, old)) / (M(new*, new*) - M(old, old))
    (BCT), and ``negative_flip_rate`` = |{q: correct with old/old, wrong with new/old}| / |Q|.

    Hot refresh (RACT): the new model answers the queries while the gallery is backfilled, a
    fraction r of its items (``refresh_ratios``) re-embedded by the new model, the others still
    old; ``hot_refresh@<r>/<primary metric>`` and ``hot_refresh@<r>/negative_flip_rate`` (against
    old/old) at each r. The items are backfilled in a random order (``refresh_seed``) or, with
    ``refresh_order: uncertainty``, the most uncertain old features first (the ``old_uncertainty``
    field of the gallery rows, the model's: a reconstruction, RACT's measure is not published).

    With ``upgraded_gallery`` (BiCT, DMU), the stored old gallery moved into the new space
    (``upgraded_embedding``, from the old features only) gives ``new_upgraded/<metric>`` and
    ``upgraded_negative_flip_rate``. With ``stored_gallery`` (a sequential upgrade), the old
    system's gallery is ``stored_embedding``, the gallery as the previous upgrade left it, in
    place of the old model's own features."""

    fields = ("embedding", "old_embedding")

    def __init__(self, protocol: RetrievalProtocol, search_options: SearchOptions = SearchOptions(),
                 options: CompatibilityOptions = CompatibilityOptions(), upgraded_gallery: bool = False,
                 stored_gallery: bool = False) -> None:
        super().__init__(protocol, search_options)
        self.options, self.upgraded_gallery = options, upgraded_gallery
        self.old_gallery = "stored_embedding" if stored_gallery else "old_embedding"
        if options.refresh_order == "uncertainty":
            self.fields = (*self.fields, "old_uncertainty")
        if upgraded_gallery:
            self.fields = (*self.fields, "upgraded_embedding")
        if stored_gallery:
            self.fields = (*self.fields, "stored_embedding")

    def combine(self, sets: Mapping[str, Rows]) -> dict[str, float]:
        scores = {"old_old": self.query_scores(sets, "old_embedding", self.old_gallery),
                  "new_old": self.query_scores(sets, "embedding", self.old_gallery)}
        refresh = self.hot_refresh(sets, scores["old_old"])
        if self.upgraded_gallery:
            scores["new_upgraded"] = self.query_scores(sets, "embedding", "upgraded_embedding")
        scores["new_new"] = self.query_scores(sets, "embedding", "embedding")  # last: GLDv2's Kaggle rankings are the new model's
        combined = {name: self.protocol.combine(s) for name, s in scores.items()}
        results = {f"{name}/{metric}": value for name, values in combined.items() for metric, value in values.items()}
        for metric, old in combined["old_old"].items():
            oracle = self.options.oracle_self_test.get(metric, combined["new_new"][metric])
            gap = oracle - old
            results[f"update_gain/{metric}"] = (combined["new_old"][metric] - old) / gap if abs(gap) > 1e-12 else math.nan
        results["negative_flip_rate"] = self.flip_rate(scores["old_old"], scores["new_old"])
        if self.upgraded_gallery:
            results["upgraded_negative_flip_rate"] = self.flip_rate(scores["old_old"], scores["new_upgraded"])
        return results | refresh

    def flip_rate(self, old: QueryScores, upgraded: QueryScores) -> float:
        """The fraction of queries right with ``old`` and wrong with ``upgraded`` (``flip_predicate``)."""
        if self.options.flip_predicate == "top1":
            flips = old.hit & ~upgraded.hit
        else:
            before, after = old.values[old.primary], upgraded.values[old.primary]
            flips = np.nan_to_num(after, nan=0.0) < np.nan_to_num(before, nan=0.0)
        return float(flips.mean())

    def backfill_order(self, gallery: Rows) -> np.ndarray:
        """The gallery rows in the order they are re-embedded (class docstring)."""
        size = len(gallery["embedding"])
        if self.options.refresh_order == "uncertainty":
            if "old_uncertainty" not in gallery:
                raise ValueError("compatibility.refresh_order uncertainty needs the old_uncertainty of every gallery item "
                                 "(a retrieval model with an old_checkpoint computes it)")
            return np.argsort(-as_array(gallery["old_uncertainty"]), kind="stable")
        return np.random.default_rng(self.options.refresh_seed).permutation(size)

    def hot_refresh(self, sets: Mapping[str, Rows], old_old: QueryScores) -> dict[str, float]:
        if not self.options.refresh_ratios:
            return {}
        gallery = _set_rows(sets, self.protocol.gallery_set)
        old_features, new_features = as_array(gallery[self.old_gallery]), as_array(gallery["embedding"])
        order = self.backfill_order(gallery)
        results = {}
        for ratio in self.options.refresh_ratios:
            mixed = old_features.copy()
            refreshed = order[: int(round(ratio * len(order)))]
            mixed[refreshed] = new_features[refreshed]
            scores = self.query_scores(sets, "embedding", mixed)
            results[f"hot_refresh@{ratio:.2f}/{scores.primary}"] = self.protocol.combine(scores)[scores.primary]
            results[f"hot_refresh@{ratio:.2f}/negative_flip_rate"] = self.flip_rate(old_old, scores)
        return results


class RecognitionMetric(BenchmarkMetric):
    """GLDv2 recognition: GAP and top-1 accuracy per split (``GAP_public`` ...) of one (landmark,
    score) per image of the ``query_set`` that the recognition ``solution`` lists, from
    ``classify(embeddings) -> (classes, scores)`` (the model's nearest class centre); class c is
    landmark ``landmark_ids[c]``, item i of the set is image ``image_ids[i]``."""

    fields = ("embedding",)

    def __init__(self, classify: Callable[[Tensor], tuple[Tensor, Tensor]], image_ids: Sequence[str],
                 landmark_ids: Sequence[int], solution: Mapping[str, Mapping[str, Sequence[int]]], query_set: str = "test") -> None:
        self.classify, self.image_ids, self.landmark_ids = classify, list(image_ids), list(landmark_ids)
        self.solution, self.query_set = solution, query_set

    def combine(self, sets: Mapping[str, Rows]) -> dict[str, float]:
        rows = _set_rows(sets, self.query_set)
        classes, scores = self.classify(rows["embedding"])
        predictions = {self.image_ids[i]: (self.landmark_ids[c], s)
                       for i, c, s in zip(rows[INDEX].tolist(), classes.tolist(), scores.tolist())}
        results = {}
        for split in SPLITS:
            solution = self.solution[split]
            if solution:
                own = {image: p for image, p in predictions.items() if image in solution}
                results[f"GAP_{split}"] = global_average_precision(own, solution)
                results[f"top1_{split}"] = top1_accuracy(own, solution)
        return results


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metrics.retrieval",
                                     description="Score a GLDv2 Kaggle retrieval submission (id,images) against the "
                                                 "official retrieval_solution_v2.1.csv with visionzoo's metric code.")
    commands = parser.add_subparsers(dest="benchmark", required=True)
    gldv2 = commands.add_parser("gldv2")
    gldv2.add_argument("solution", help="retrieval_solution_v2.1.csv (id,images,Usage)")
    gldv2.add_argument("submission", help="the submission CSV (id,images)")
    gldv2.add_argument("--max-predictions", type=int, default=100)
    gldv2.add_argument("--out", help='write {"public": {...}, "private": {...}} as JSON to this file')
    args = parser.parse_args(argv)
    scores = score_retrieval_submission(read_solution(args.solution), read_retrieval_submission(args.submission),
                                        args.max_predictions)
    for split, values in scores.items():
        print(f"{split:8s} " + "  ".join(f"{name} {100 * value:.2f}" for name, value in values.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(scores, indent=2) + "\n")


if __name__ == "__main__":
    main()
