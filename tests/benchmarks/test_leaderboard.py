"""The leaderboard: newest result per run, means over distinct runs that say what they cover,
untrained baselines apart, malformed results.json reported and skipped."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import leaderboard


def _result(root: Path, run: str, category: str, auroc: float, time: str, **extra) -> None:
    path = root / "mvtec/msflow" / run / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "mvtec", "method": "msflow", "dataset": {"category": category},
                                "metrics": {"image_auroc": auroc}, "time": time, **extra}))


def _rows(root: Path) -> list[list[str]]:
    return leaderboard.leaderboard_rows(leaderboard.collect_results(root), {})["mvtec"][1]


def test_repeated_runs_of_a_category_count_once_with_the_newest_result(tmp_path):
    _result(tmp_path, "bottle", "bottle", 0.90, "2026-01-01T00:00:00+00:00")
    _result(tmp_path, "bottle_again", "bottle", 0.70, "2026-02-01T00:00:00+00:00")
    _result(tmp_path, "cable", "cable", 0.80, "2026-01-05T00:00:00+00:00")
    _result(tmp_path, "cable_untrained", "cable", 0.50, "2026-03-01T00:00:00+00:00", untrained=True)
    rows = _rows(tmp_path)
    assert [row[1:3] for row in rows] == [
        ["bottle (newest of 2)", "70.00"], ["cable", "80.00"], ["cable (untrained)", "50.00"],
        ["mean of 2 runs (2 of the paper's 15 categories): not comparable", "75.00"],
    ]


def test_the_mean_of_all_paper_categories_is_comparable(tmp_path):
    for i, category in enumerate(leaderboard.PAPER_CATEGORIES["mvtec"]):
        _result(tmp_path, category, category, 0.5 + i / 100, "2026-01-01T00:00:00+00:00")
    assert _rows(tmp_path)[-1][1:3] == ["mean of the 15 categories", "57.00"]


def test_a_malformed_results_file_is_named_and_skipped(tmp_path, capsys):
    _result(tmp_path, "bottle", "bottle", 0.9, "2026-01-01T00:00:00+00:00")
    for name, content in {"truncated": '{"benchmark": "mvtec", "meth', "text_metric": json.dumps(
            {"benchmark": "mvtec", "method": "msflow", "metrics": {"image_auroc": "0.9"}}),
            "list": "[1, 2]", "no_method": json.dumps({"benchmark": "mvtec", "metrics": {}})}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(content)
    assert [row[1] for row in _rows(tmp_path)] == ["bottle"]
    err = capsys.readouterr().err
    for name in ("truncated", "text_metric", "list", "no_method"):
        assert f"skipping {tmp_path / name / 'results.json'}" in err


def test_model_upgrades_get_their_own_table_of_self_and_cross_tests(tmp_path):
    path = tmp_path / "gldv2/bct/upgrade/results.json"
    path.parent.mkdir(parents=True)
    metrics = {"old_old/mAP@100_private": 0.5, "new_new/mAP@100_private": 0.8, "new_old/mAP@100_private": 0.6,
               "update_gain/mAP@100_private": 1 / 3, "negative_flip_rate": 0.1}
    path.write_text(json.dumps({"benchmark": "gldv2", "method": "bct", "metrics": metrics, "time": "2026-01-01"}))
    _result(tmp_path, "plain", "bottle", 0.9, "2026-01-01")
    tables = leaderboard.leaderboard_rows(leaderboard.collect_results(tmp_path), {})
    names, rows = tables["gldv2: model upgrades"]
    assert names == ["metric", "old/old", "new/new", "new/old", "update gain"]
    assert rows == [["bct", "upgrade", "mAP@100_private", "50.00", "80.00", "60.00", "0.333", "visionzoo"],
                    ["bct", "upgrade", "negative flip rate", "", "", "10.00", "", "visionzoo"]]
    assert "## gldv2: model upgrades" in leaderboard.markdown(tables, {}) and "mvtec" in tables


def test_binary_retrieval_gets_a_row_per_search_space(tmp_path):
    """A BEBR result: its spaces (float, the reconstructions, Hamming, HNSW, re-ranked) as rows,
    with bits, index bytes and time, not one row of every prefixed name."""
    path = tmp_path / "gldv2/bebr/binary/results.json"
    path.parent.mkdir(parents=True)
    metrics = {"bits_per_vector": 32.0, "mAP@100_private": 0.45, "index_bytes/float": 25645.0, "search_ms_per_query/float": 0.01}
    for space, value in (("float", 0.55), ("hamming", 0.39), ("hnsw", 0.38), ("reranked", 0.45)):
        metrics[f"{space}/mAP@100_private"] = value
    metrics |= {"index_bytes/hamming": 433.0, "index_bytes/hnsw": 27658.0, "search_ms_per_query/hamming": 0.004}
    path.write_text(json.dumps({"benchmark": "gldv2", "method": "bebr", "metrics": metrics, "time": "2026-01-01"}))
    tables = leaderboard.leaderboard_rows(leaderboard.collect_results(tmp_path), {})
    assert list(tables) == ["gldv2: binary retrieval"]
    names, rows = tables["gldv2: binary retrieval"]
    assert names == ["space", "bits", "mAP@100_private", "index bytes", "ms/query"]
    assert [row[2:7] for row in rows] == [["float", "", "55.00", "25645", "0.010"], ["reconstructed", "32", "45.00", "", ""],
                                          ["hamming", "32", "39.00", "433", "0.004"], ["hnsw", "32", "38.00", "27658", ""],
                                          ["reranked", "32", "45.00", "", ""]]


def test_tracking_results_show_their_headline_columns_and_counts_as_counts(tmp_path):
    from benchmarks.leaderboard import collect_results, leaderboard_rows

    run = tmp_path / "mot17/fairmot/val_half"
    run.mkdir(parents=True)
    metrics = {"HOTA": 0.5, "DetA": 0.4, "AssA": 0.6, "LocA": 0.8, "MOTA": 0.6, "MOTP": 0.75, "IDF1": 0.7, "IDP": 0.8,
               "IDR": 0.6, "IDSW": 1.0, "Frag": 0.0, "MT": 3.0, "PT": 1.0, "ML": 0.0, "CLR_TP": 10.0}
    (run / "results.json").write_text(json.dumps({"benchmark": "mot17", "method": "fairmot", "metrics": metrics,
                                                  "dataset": {"name": "val_half"}, "time": "2026-01-01T00:00:00"}))
    names, rows = leaderboard_rows(collect_results(tmp_path), {})["mot17"]
    assert names[:3] == ["HOTA", "DetA", "AssA"] and "CLR_TP" not in names
    cells = dict(zip(names, rows[0][2:]))
    assert cells["HOTA"] == "50.00" and cells["IDSW"] == "1" and cells["MT"] == "3" and cells["Frag"] == "0"
