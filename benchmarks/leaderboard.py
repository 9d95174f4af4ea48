"""Leaderboard: every ``results.json`` under a folder, as a markdown table per benchmark,
with the papers' headline numbers (``paper_numbers.yaml``) beside them.

    python -m benchmarks.leaderboard runs/            # markdown on stdout
    python -m benchmarks.leaderboard runs/ --json     # the collected rows as JSON

Metrics are shown in percent. A method with results on several runs of one benchmark (e.g.
several MVTec categories) also gets a row with their mean.
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


def collect_results(runs: Path) -> list[dict[str, Any]]:
    """Every readable ``results.json`` below ``runs``; unreadable ones are reported on stderr."""
    results = []
    for path in sorted(runs.rglob("results.json")):
        try:
            result = json.loads(path.read_text())
            if not isinstance(result.get("metrics"), dict) or "method" not in result:
                raise ValueError("no 'metrics' or 'method' entry")
        except (OSError, ValueError) as error:
            print(f"skipping {path}: not a visionzoo results file ({error})", file=sys.stderr)
            continue
        result["path"] = str(path)
        results.append(result)
    return results


def run_label(result: dict[str, Any]) -> str:
    dataset = result.get("dataset") or {}
    return str(dataset.get("category") or dataset.get("name") or Path(result["path"]).parent.name)


def _metric_order(name: str) -> list[str | int]:
    """Sort key putting numbers in numeric order: R@5 before R@10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _cell(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}" if abs(value) <= 1.0 else f"{value:.4g}"


def leaderboard_rows(results: list[dict[str, Any]], paper: dict[str, Any]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per benchmark: (metric names, rows of [method, run, *metrics, source])."""
    by_benchmark: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        by_benchmark[result.get("benchmark") or "unknown"].append(result)
    tables = {}
    for benchmark, entries in sorted(by_benchmark.items()):
        papers = paper.get(benchmark, {})
        names = sorted({name for e in entries for name in e["metrics"]} | {n for p in papers.values() for n in p["metrics"]},
                       key=_metric_order)
        rows = []
        by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for entry in entries:
            by_method[entry["method"]].append(entry)
        for method, runs in sorted(by_method.items()):
            for run in sorted(runs, key=run_label):
                label = run_label(run) + (" (untrained)" if run.get("untrained") else "")
                rows.append([method, label, *(_cell(run["metrics"].get(n)) for n in names), "visionzoo"])
            trained = [run for run in runs if not run.get("untrained")]  # untrained baselines are not results
            if len(trained) > 1:
                means = [[r["metrics"][n] for r in trained if n in r["metrics"]] for n in names]
                rows.append([method, f"mean of {len(trained)}", *(_cell(sum(v) / len(v)) if v else "" for v in means), "visionzoo"])
            if method in papers:
                reported = papers[method]["metrics"]
                rows.append([method, "paper", *(f"{reported[n]:.2f}" if n in reported else "" for n in names), "paper (see note)"])
        tables[benchmark] = (names, rows)
    return tables


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
