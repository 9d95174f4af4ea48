"""Leaderboard: every ``results.json`` under a folder, as a markdown table per benchmark,
with the papers' headline numbers (``paper_numbers.yaml``) beside them.

    python -m benchmarks.leaderboard runs/            # markdown on stdout
    python -m benchmarks.leaderboard runs/ --json     # the collected rows as JSON

Metrics are shown in percent, counts (id switches, mostly tracked ...) as counts. Each run (an MVTec category, a UCF101 split ...) is shown by its
newest ``results.json``; a method with several runs also gets a row with their mean, over
distinct runs only. Where the papers' number is a mean over a fixed set of categories (MVTec AD's
15), the row says how many of them it covers and is marked not comparable when some are
missing. Untrained baselines (``--ckpt_path none``) are labelled and left out of means. A
``results.json`` that cannot be read is reported by name and skipped.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

PAPER_NUMBERS = Path(__file__).with_name("paper_numbers.yaml")

# The categories a benchmark's headline numbers average over (benchmarks.md: MVTec AD's 15).
MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
                    "tile", "toothbrush", "transistor", "wood", "zipper")
PAPER_CATEGORIES = {"mvtec": MVTEC_CATEGORIES, "mvtec_adbench": MVTEC_CATEGORIES}
# The columns of benchmarks whose results.json holds more than a table can show (every other
# benchmark shows all its metrics), and the metrics that are counts, not fractions.
SHOWN_METRICS = {"mot17": ("HOTA", "DetA", "AssA", "LocA", "MOTA", "MOTP", "IDF1", "IDP", "IDR", "IDSW", "Frag", "MT", "PT", "ML")}
COUNTS = {"IDSW", "Frag", "MT", "PT", "ML", "CLR_TP", "CLR_FN", "CLR_FP", "IDTP", "IDFN", "IDFP"}


def collect_results(runs: Path) -> list[dict[str, Any]]:
    """Every readable ``results.json`` below ``runs``; unreadable ones are reported on stderr."""
    results = []
    for path in sorted(runs.rglob("results.json")):
        try:
            result = json.loads(path.read_text())
            _check_result(result)
        except (OSError, ValueError) as error:
            print(f"skipping {path}: not a visionzoo results file ({error})", file=sys.stderr)
            continue
        result["path"] = str(path)
        results.append(result)
    return results


def _check_result(result: Any) -> None:
    """The fields the table reads, with their types; a ValueError says which is wrong."""
    if not isinstance(result, dict):
        raise ValueError(f"a JSON object was expected, got {type(result).__name__}")
    for key in ("benchmark", "method"):
        if not isinstance(result.get(key), str):
            raise ValueError(f"{key!r} must be a string, got {result.get(key)!r}")
    metrics = result.get("metrics")
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
        raise ValueError("'metrics' must map metric names to numbers")
    if not isinstance(result.get("dataset", {}), dict):
        raise ValueError("'dataset' must be an object")


def run_label(result: dict[str, Any]) -> str:
    dataset = result.get("dataset") or {}
    return str(dataset.get("category") or dataset.get("name") or Path(result["path"]).parent.name)


def _metric_order(name: str) -> list[str | int]:
    """Sort key putting numbers in numeric order: R@5 before R@10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _cell(value: float | None, name: str = "") -> str:
    if value is None:
        return ""
    if name in COUNTS:
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    return f"{100 * value:.2f}" if abs(value) <= 1.0 else f"{value:.4g}"


def leaderboard_rows(results: list[dict[str, Any]], paper: dict[str, Any]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per benchmark: (metric names, rows of [method, run, *metrics, source])."""
    by_benchmark: dict[str, list[dict[str, Any]]] = defaultdict(list)
    upgrades: dict[str, list[dict[str, Any]]] = defaultdict(list)
    binary: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        benchmark = result.get("benchmark") or "unknown"
        is_upgrade = any(name.startswith(PAIRS) for name in result["metrics"])
        if "bits_per_vector" in result["metrics"]:
            binary[benchmark].append(result)
        if is_upgrade:
            upgrades[benchmark].append(result)
        elif "bits_per_vector" not in result["metrics"]:
            by_benchmark[benchmark].append(result)
    tables = {f"{benchmark}: model upgrades": compatibility_table(entries) for benchmark, entries in upgrades.items()}
    tables |= {f"{benchmark}: binary retrieval": binary_table(entries) for benchmark, entries in binary.items()}
    for benchmark, entries in sorted(by_benchmark.items()):
        papers = paper.get(benchmark, {})
        names = list(SHOWN_METRICS.get(benchmark, ())) or sorted(
            {name for e in entries for name in e["metrics"]} | {n for p in papers.values() for n in p["metrics"]}, key=_metric_order)
        rows = []
        for method, runs in sorted(_group(entries, "method").items()):
            newest = _newest_per_run(runs)
            for (label, untrained), (run, repeats) in sorted(newest.items()):
                skipped = run.get("skipped_corrupt") or 0
                shown = (label + (" (untrained)" if untrained else "") + (f" (newest of {repeats})" if repeats > 1 else "")
                         + (f" ({skipped} corrupt samples skipped)" if skipped else ""))
                rows.append([method, shown, *(_cell(run["metrics"].get(n), n) for n in names), "visionzoo"])
            trained = {label: run for (label, untrained), (run, _) in newest.items() if not untrained}
            if len(trained) > 1:
                means = [[r["metrics"][n] for r in trained.values() if n in r["metrics"]] for n in names]
                rows.append([method, _mean_label(benchmark, set(trained)),
                             *(_cell(sum(v) / len(v), n) if v else "" for v, n in zip(means, names)), "visionzoo"])
            if method in papers:
                reported = papers[method]["metrics"]
                rows.append([method, "paper", *(f"{reported[n]:.2f}" if n in reported else "" for n in names), "paper (see note)"])
        tables[benchmark] = (names, rows)
    return tables


PAIRS = ("old_old/", "new_new/", "new_old/")  # compatibility metrics: query model / gallery model


def compatibility_table(entries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """A model-upgrade test (``benchmarks.metrics.retrieval.CompatibilityMetric``) as rows of
    [method, run, metric, old/old, new/new, new/old (new queries, old gallery), update gain,
    source], then the negative flip rate; the newest result of each run."""
    rows = []
    for method, runs in sorted(_group(entries, "method").items()):
        for (label, _), (run, _) in sorted(_newest_per_run(runs).items()):
            metrics = run["metrics"]
            for name in sorted({n.split("/", 1)[1] for n in metrics if n.startswith(PAIRS)}, key=_metric_order):
                rows.append([method, label, name, *(_cell(metrics.get(pair + name)) for pair in PAIRS),
                             f"{metrics[f'update_gain/{name}']:.3f}" if f"update_gain/{name}" in metrics else "", "visionzoo"])
            if "negative_flip_rate" in metrics:
                rows.append([method, label, "negative flip rate", "", "", _cell(metrics["negative_flip_rate"]), "", "visionzoo"])
    return ["metric", "old/old", "new/new", "new/old", "update gain"], rows


BINARY_SPACES = ("float", "reconstructed", "hamming", "hnsw", "reranked")  # benchmarks.metrics.retrieval.BinaryRetrievalMetric


def binary_table(entries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """A binary-retrieval test (BEBR, ``BinaryRetrievalMetric``) as rows of [method, run, search
    space, bits a vector, the protocol's metrics, index bytes, ms a query, source]: one row per
    space of the newest result of each run. The reconstructions' metrics are the unprefixed ones
    (``new_new/`` in a compatible upgrade, whose cross-tests are in the upgrades table)."""
    names = sorted({n.split("/", 1)[1] for e in entries for n in e["metrics"] if n.startswith("float/")}, key=_metric_order)
    rows = []
    for method, runs in sorted(_group(entries, "method").items()):
        for (label, untrained), (run, _) in sorted(_newest_per_run(runs).items()):
            metrics, shown = run["metrics"], label + (" (untrained)" if untrained else "")
            for space in BINARY_SPACES:
                prefixes = ("", "new_new/") if space == "reconstructed" else (f"{space}/",)
                prefix = next((p for p in prefixes if f"{p}{names[0]}" in metrics), prefixes[0]) if names else ""
                size, time = metrics.get(f"index_bytes/{space}"), metrics.get(f"search_ms_per_query/{space}")
                rows.append([method, shown, space, "" if space == "float" else f"{metrics['bits_per_vector']:.0f}",
                             *(_cell(metrics.get(prefix + n), n) for n in names),
                             "" if size is None else f"{size:.0f}", "" if time is None else f"{time:.3f}", "visionzoo"])
    return ["space", "bits", *names, "index bytes", "ms/query"], rows


def _group(entries: list[dict[str, Any]], key: str) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        grouped[entry[key]].append(entry)
    return grouped


def _newest_per_run(runs: list[dict[str, Any]]) -> dict[tuple[str, bool], tuple[dict[str, Any], int]]:
    """Per (run label, untrained): the newest result (by its ``time``) and how many there were."""
    grouped: dict[tuple[str, bool], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        grouped[run_label(run), bool(run.get("untrained"))].append(run)
    return {key: (max(group, key=lambda r: str(r.get("time", ""))), len(group)) for key, group in grouped.items()}


def _mean_label(benchmark: str, labels: set[str]) -> str:
    """``mean of N``, or for a benchmark whose papers average fixed categories, how many of them
    the mean covers and whether it compares with the papers' mean."""
    categories = PAPER_CATEGORIES.get(benchmark)
    if categories is None:
        return f"mean of {len(labels)}"
    covered = len(labels & set(categories))
    if covered == len(categories) == len(labels):
        return f"mean of the {len(categories)} categories"
    return f"mean of {len(labels)} runs ({covered} of the paper's {len(categories)} categories): not comparable"


def markdown(tables: dict[str, tuple[list[str], list[list[str]]]], paper: dict[str, Any]) -> str:
    lines = []
    for benchmark, (names, rows) in tables.items():
        lines += [f"## {benchmark}", "", "| " + " | ".join(["method", "run", *names, "source"]) + " |"]
        lines.append("|" + "---|" * (len(names) + 3))
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        notes = [f"- {m}: {p['source']}" for m, p in paper.get(benchmark, {}).items() if any(r[0] == m for r in rows)]
        lines += ["", "Paper numbers:", *notes] if notes else []
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="folder searched recursively for results.json")
    parser.add_argument("--json", action="store_true", help="print the collected results as JSON")
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        parser.error(f"{args.runs}: no such folder")
    results = collect_results(args.runs)
    if not results:
        print(f"no results.json under {args.runs}; run `visionzoo test ...` first", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{k: r[k] for k in ("benchmark", "method", "dataset", "metrics", "path")} for r in results], indent=2))
        return 0
    paper = yaml.safe_load(PAPER_NUMBERS.read_text())
    print(markdown(leaderboard_rows(results, paper), paper))
    return 0


if __name__ == "__main__":
    sys.exit(main())
