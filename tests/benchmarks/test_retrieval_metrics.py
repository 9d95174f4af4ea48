"""Retrieval metrics: GLDv2 against the published values of the official ``metrics_test.py`` (same
inputs), revisitop's compute_map on hand-worked rankings, the solution/submission files, the
protocols over eval-set rows, and the compatibility report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from benchmarks.metrics.retrieval import (
    BinaryRetrievalMetric,
    BinarySearchOptions,
    CompatibilityMetric,
    CompatibilityOptions,
    GLDv2Protocol,
    RetrievalMetric,
    RevisitedProtocol,
    SearchOptions,
    build_binary_index,
    global_average_precision,
    index_bytes,
    main,
    mean_average_precision,
    mean_precisions,
    pack_bits,
    read_retrieval_submission,
    read_solution,
    rerank,
    revisited_map,
    revisited_protocols,
    score_retrieval_submission,
    search,
    top1_accuracy,
    write_retrieval_submission,
)

# The inputs of tensorflow/models delf google_landmarks_dataset/metrics_test.py.
RECOGNITION_SOLUTION = {"0123456789abcdef": [0, 12], "0223456789abcdef": [100, 200, 300], "0323456789abcdef": [1],
                        "0423456789abcdef": [], "0523456789abcdef": []}
RECOGNITION_PREDICTIONS = {"0223456789abcdef": (0, 0.01), "0323456789abcdef": (1, 10.0), "0423456789abcdef": (150, 15.0)}
RETRIEVAL_SOLUTION = {"0123456789abcdef": ["fedcba9876543210", "fedcba9876543220"],
                      "0223456789abcdef": ["fedcba9876543210"],
                      "0323456789abcdef": ["fedcba9876543230", "fedcba9876543240", "fedcba9876543250"],
                      "0423456789abcdef": ["fedcba9876543230"]}
RETRIEVAL_PREDICTIONS = {"0223456789abcdef": ["fedcba9876543200", "fedcba9876543210"],
                         "0323456789abcdef": ["fedcba9876543240"],
                         "0423456789abcdef": ["fedcba9876543230", "fedcba9876543240"]}


def test_gldv2_metrics_reproduce_the_official_test_values():
    assert global_average_precision(RECOGNITION_PREDICTIONS, RECOGNITION_SOLUTION) == pytest.approx(0.166667, abs=1e-6)
    assert global_average_precision(RECOGNITION_PREDICTIONS, RECOGNITION_SOLUTION,
                                    ignore_non_gt_test_images=True) == pytest.approx(0.333333, abs=1e-6)
    assert top1_accuracy(RECOGNITION_PREDICTIONS, RECOGNITION_SOLUTION) == pytest.approx(0.333333, abs=1e-6)
    assert mean_average_precision(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION) == pytest.approx(0.458333, abs=1e-6)
    assert mean_average_precision(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION, max_predictions=1) == pytest.approx(0.5)
    np.testing.assert_allclose(mean_precisions(RETRIEVAL_PREDICTIONS, RETRIEVAL_SOLUTION, max_predictions=2), [0.5, 0.375])


def test_gldv2_map_pitfalls():
    solution = {"q": [f"g{i}" for i in range(150)]}
    # The denominator is min(|GT|, 100): 100 correct predictions give AP 1, not 100/150.
    assert mean_average_precision({"q": [f"g{i}" for i in range(100)]}, solution) == pytest.approx(1.0)
    # A duplicate keeps its rank: g0, g0, g1 -> (1/1 + 2/3) / min(150, 100).
    assert mean_average_precision({"q": ["g0", "g0", "g1"]}, solution) == pytest.approx((1 + 2 / 3) / 100)
    with pytest.raises(ValueError, match="not in the solution"):
        mean_average_precision({"unknown": ["g0"]}, solution)


def _write(path, text):
    path.write_text(text)
    return path


def test_solution_splits_ignored_rows_and_submission_round_trip(tmp_path, capsys):
    solution_csv = _write(tmp_path / "retrieval_solution_v2.1.csv",
                          "id,images,Usage\n"
                          "q1,g1 g2,Public\nq2,g3,Private\nq3,None,Ignored\nq4,g4 g5,Private\n")
    solution = read_solution(solution_csv)
    assert solution["public"] == {"q1": ["g1", "g2"]}
    assert solution["private"] == {"q2": ["g3"], "q4": ["g4", "g5"]}
    assert list(solution["ignored"]) == ["q3"]
    predictions = {"q1": ["g2", "g9"], "q2": ["g3"], "q3": ["g1"], "q4": ["g9", "g5"]}
    write_retrieval_submission(tmp_path / "submission.csv", predictions)
    assert read_retrieval_submission(tmp_path / "submission.csv") == predictions
    scores = score_retrieval_submission(solution, predictions, precision_ks=(1,))
    assert scores["public"] == {"mAP@100": pytest.approx(0.5), "mP@1": 1.0}
    assert scores["private"]["mAP@100"] == pytest.approx((1.0 + 0.25) / 2)  # q4: 1/2 at rank 2, over min(2, 100)
    main(["gldv2", str(solution_csv), str(tmp_path / "submission.csv"), "--out", str(tmp_path / "scores.json")])
    assert json.loads((tmp_path / "scores.json").read_text())["private"]["mAP@100"] == pytest.approx(0.625)
    assert "public" in capsys.readouterr().out
    with pytest.raises(ValueError, match="not in the solution"):
        score_retrieval_submission(solution, {"q9": ["g1"]})


def test_malformed_csv_rows_name_the_file_and_line(tmp_path):
    path = _write(tmp_path / "solution.csv", "id,images,Usage\nq1,g1,Public\nq2,g2\n")
    with pytest.raises(ValueError, match=r"solution\.csv line 3: expected 3 fields"):
        read_solution(path)
    path = _write(tmp_path / "usage.csv", "id,images,Usage\nq1,g1,Publik\n")
    with pytest.raises(ValueError, match=r"usage\.csv line 2: Usage must be"):
        read_solution(path)
    path = _write(tmp_path / "recognition.csv", "id,landmarks,Usage\nq1,12 x,Public\n")
    with pytest.raises(ValueError, match=r"recognition\.csv line 2: landmarks must be integers"):
        read_solution(path, "recognition")


def test_revisited_map_on_the_hand_worked_ranking():
    """10 database images, positives at ranks 0, 2, 5 and junk at rank 1: AP 0.85 (the junk is
    removed, positives at 0, 1, 4), mP@[1, 5, 10] = [1, 0.6, 0.6] (the denominator of mP@10 is 5)."""
    ranking = np.array([7, 3, 0, 1, 2, 9, 4, 5, 6, 8])
    ground_truth = [{"ok": [7, 0, 9], "junk": [3]}]
    mean_ap, aps, precisions, _ = revisited_map(ranking[:, None], ground_truth)
    assert mean_ap == pytest.approx(0.85) and aps[0] == pytest.approx(0.85)
    np.testing.assert_allclose(precisions, [1.0, 0.6, 0.6])
    # A query without positives is skipped, not counted as 0.
    mean_ap, aps, _, _ = revisited_map(np.stack([ranking, ranking], 1), [*ground_truth, {"ok": [], "junk": []}])
    assert mean_ap == pytest.approx(0.85) and math.isnan(aps[1])


def test_revisited_protocols_move_easy_and_hard_between_ok_and_junk():
    protocols = revisited_protocols([{"easy": [1], "hard": [2], "junk": [3]}])
    assert protocols["E"][0] == {"ok": [1], "junk": [3, 2]}
    assert protocols["M"][0] == {"ok": [1, 2], "junk": [3]}
    assert protocols["H"][0] == {"ok": [2], "junk": [3, 1]}


def test_search_is_exact_inner_product_and_ivf_finds_the_same_neighbours():
    generator = np.random.default_rng(0)
    gallery = generator.normal(size=(500, 16)).astype(np.float32)
    queries = gallery[:20] + 0.01 * generator.normal(size=(20, 16)).astype(np.float32)
    similarities, neighbours = search(queries, gallery, 5)
    assert (neighbours[:, 0] == np.arange(20)).all()
    normalised = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    np.testing.assert_allclose(similarities, np.sort(q @ normalised.T, axis=1)[:, ::-1][:, :5], rtol=1e-5)
    _, ivf = search(queries, gallery, 5, SearchOptions(index="ivf", nlist=8, nprobe=8))
    assert (ivf[:, 0] == np.arange(20)).all()


def _rows(features, items=None):
    features = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    return {"embedding": features, "old_embedding": features, "index": torch.arange(len(features)) if items is None else items}


def test_gldv2_protocol_scores_the_eval_sets_per_split_and_keeps_the_kaggle_rankings():
    """Two gallery images on axis 0 and 1; the public query on axis 0 finds its image first, the
    private query's image is second; a private query that no rank evaluated counts 0."""
    index = {"embedding": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "index": torch.tensor([0, 1])}
    test = {"embedding": torch.tensor([[1.0, 0.1], [1.0, 0.2]]), "index": torch.tensor([0, 1])}
    solution = {"public": {"qa": ["ia"]}, "private": {"qb": ["ib"], "qc": ["ia"]}}
    protocol = GLDv2Protocol(["qa", "qb", "qc"], ["ia", "ib"], solution, precision_ks=(1,))
    values = RetrievalMetric(protocol).combine({"test": test, "index": index})
    assert values["mAP@100_public"] == pytest.approx(1.0)
    assert values["mAP@100_private"] == pytest.approx((0.5 + 0.0) / 2)
    assert values["mP@1_public"] == 1.0 and values["mP@1_private"] == 0.0
    assert protocol.rankings == {"qa": ["ia", "ib"], "qb": ["ia", "ib"]}


def test_revisited_protocol_maps_gallery_rows_to_database_items():
    """Database item 1 was skipped (corrupt): rows 0, 1 are items 0, 2. The query is item 2's."""
    database = {"embedding": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "index": torch.tensor([0, 2])}
    query = {"embedding": torch.tensor([[0.1, 1.0]]), "index": torch.tensor([0])}
    protocol = RevisitedProtocol([{"easy": [2], "hard": [], "junk": [1]}])
    values = RetrievalMetric(protocol).combine({"query": query, "database": database})
    assert values["mAP_E"] == pytest.approx(1.0) and values["mAP_M"] == pytest.approx(1.0)
    assert math.isnan(values["mAP_H"])  # no hard positives: skipped


def test_compatibility_report_self_cross_update_gain_and_flip_rate():
    """Three queries, each with one relevant gallery item. Old model: queries 0, 1 right at top-1.
    The upgraded (new query, old gallery) system: queries 0 and 2 right, so query 1 flips; NFR 1/3
    over all queries (not 1/2 over those the old model got right)."""
    gallery_old = torch.eye(3)
    query_old = torch.tensor([[1.0, 0.1, 0.0], [0.1, 1.0, 0.0], [1.0, 0.0, 0.1]])
    query_new = torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.2, 0.0], [0.0, 0.1, 1.0]])
    gallery_new = torch.eye(3)
    solution = {"public": {}, "private": {"q0": ["g0"], "q1": ["g1"], "q2": ["g2"]}}
    protocol = GLDv2Protocol(["q0", "q1", "q2"], ["g0", "g1", "g2"], solution, precision_ks=(1,))
    sets = {"test": {"embedding": query_new, "old_embedding": query_old, "index": torch.arange(3)},
            "index": {"embedding": gallery_new, "old_embedding": gallery_old, "index": torch.arange(3)}}
    values = CompatibilityMetric(protocol).combine(sets)
    old, cross, new = values["old_old/mP@1_private"], values["new_old/mP@1_private"], values["new_new/mP@1_private"]
    assert (old, cross, new) == (pytest.approx(2 / 3), pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert values["negative_flip_rate"] == pytest.approx(1 / 3)
    assert math.isnan(values["update_gain/mP@1_private"])  # no gap between old and new self-tests
    oracle = CompatibilityMetric(protocol, options=CompatibilityOptions(oracle_self_test={"mP@1_private": 1.0}))
    assert oracle.combine(sets)["update_gain/mP@1_private"] == pytest.approx(0.0)
    ap_flips = CompatibilityMetric(protocol, options=CompatibilityOptions(flip_predicate="ap")).combine(sets)
    assert ap_flips["negative_flip_rate"] == pytest.approx(1 / 3)
    assert protocol.rankings["q2"][0] == "g2"  # the Kaggle rankings are the new model's own


def test_hot_refresh_backfills_the_gallery_in_order_and_reports_map_and_flips_at_each_ratio():
    """Four queries, each with one relevant gallery item among four. A new query has similarity 1
    with its item's new feature and -1 with its old one (0 with the others), so its item is first
    (AP 1, a top-1 hit) once refreshed and last (AP 1/4) before. Old/old gets queries 0 and 1
    right, so the flips at r are those of 0, 1 not yet refreshed. Uncertainty-first refreshes the
    items by decreasing old_uncertainty."""
    eye = torch.eye(4)
    gallery_old, gallery_new = -eye, eye.clone()
    query_old = -torch.stack([eye[0], eye[1], eye[3], eye[2]])
    query_new = eye.clone()
    solution = {"public": {}, "private": {f"q{i}": [f"g{i}"] for i in range(4)}}
    protocol = GLDv2Protocol([f"q{i}" for i in range(4)], [f"g{i}" for i in range(4)], solution, precision_ks=(1,))
    uncertainty = torch.tensor([0.1, 0.9, 0.5, 0.2])  # refresh order 1, 2, 3, 0
    sets = {"test": {"embedding": query_new, "old_embedding": query_old, "index": torch.arange(4)},
            "index": {"embedding": gallery_new, "old_embedding": gallery_old, "old_uncertainty": uncertainty,
                      "index": torch.arange(4)}}
    options = CompatibilityOptions(refresh_order="uncertainty", refresh_ratios=(0.0, 0.25, 0.5, 1.0))
    values = CompatibilityMetric(protocol, options=options).combine(sets)
    for ratio, right, flips in ((0.0, set(), {0, 1}), (0.25, {1}, {0}), (0.5, {1, 2}, {0}), (1.0, {0, 1, 2, 3}, set())):
        assert values[f"hot_refresh@{ratio:.2f}/mAP@100_private"] == pytest.approx((len(right) + (4 - len(right)) / 4) / 4)
        assert values[f"hot_refresh@{ratio:.2f}/negative_flip_rate"] == pytest.approx(len(flips) / 4), ratio
    assert protocol.rankings["q0"][0] == "g0"  # the Kaggle rankings are still the new model's own
    random = CompatibilityMetric(protocol, options=CompatibilityOptions(refresh_seed=3)).backfill_order(sets["index"])
    assert sorted(random.tolist()) == [0, 1, 2, 3]
    np.testing.assert_array_equal(random, np.random.default_rng(3).permutation(4))
    with pytest.raises(ValueError, match="refresh_ratios must lie in"):
        CompatibilityOptions(refresh_ratios=(0.5, 1.5))


def test_an_upgraded_old_gallery_is_searched_by_the_new_queries():
    """The stored old gallery moved into the new space (BiCT/DMU's ψ): here moved exactly onto the
    new gallery, so new→upgraded equals new→new and flips no query that new→old flips."""
    eye = torch.eye(3)
    solution = {"public": {}, "private": {f"q{i}": [f"g{i}"] for i in range(3)}}
    protocol = GLDv2Protocol([f"q{i}" for i in range(3)], [f"g{i}" for i in range(3)], solution, precision_ks=(1,))
    sets = {"test": {"embedding": eye, "old_embedding": -eye, "upgraded_embedding": eye, "index": torch.arange(3)},
            "index": {"embedding": eye, "old_embedding": -eye, "upgraded_embedding": eye, "index": torch.arange(3)}}
    metric = CompatibilityMetric(protocol, options=CompatibilityOptions(refresh_ratios=()), upgraded_gallery=True)
    assert "upgraded_embedding" in metric.fields
    values = metric.combine(sets)
    assert values["new_upgraded/mP@1_private"] == values["new_new/mP@1_private"] == 1.0
    assert values["new_old/mP@1_private"] == 0.0
    assert values["upgraded_negative_flip_rate"] == 0.0 and values["negative_flip_rate"] == 1.0


def test_codes_are_packed_most_significant_bit_first_and_searched_by_hamming_distance():
    """Bits 1000 0001 are byte 129 (faiss's binary vectors); a query at Hamming distance 0, 1
    and 3 from the three gallery codes ranks them in that order with those distances, exhaustively
    and through the HNSW graph; the flat index stores 2 bytes a code (and a small header)."""
    codes = torch.tensor([[1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    assert pack_bits(codes).tolist() == [[129, 255]]
    assert pack_bits(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.uint8)).tolist() == [[129]]
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_bits(np.ones((1, 12)))
    gallery = np.array([[0b10000001, 0], [0b10000000, 0], [0b10000001, 0b00000111]], dtype=np.uint8)
    query = gallery[:1]
    for kind in ("flat", "hnsw"):
        distances, neighbours = build_binary_index(gallery, kind).search(query, 3)
        assert neighbours.tolist() == [[0, 1, 2]] and distances.tolist() == [[0, 1, 3]]
    flat = build_binary_index(gallery, "flat")
    assert 3 * 2 <= index_bytes(flat) < 3 * 2 + 100
    assert index_bytes(build_binary_index(gallery, "hnsw", BinarySearchOptions(hnsw_neighbours=4))) > index_bytes(flat)


def test_rerank_orders_the_shortlist_by_inner_product_and_keeps_the_rest():
    """Shortlist of 2 of [2, 0, 1]: gallery row 0 has the larger inner product, so it moves
    first; row 1, past the shortlist, stays third; -1 (no neighbour) stays last."""
    query = np.array([[1.0, 0.0]])
    gallery = np.array([[0.9, 0.1], [1.0, 0.0], [0.1, 0.9]])
    assert rerank(query, gallery, np.array([[2, 0, 1]]), shortlist=2).tolist() == [[0, 2, 1]]
    assert rerank(query, gallery, np.array([[2, -1, 0]]), shortlist=3).tolist() == [[0, 2, -1]]


def test_binary_metric_reports_each_search_space_with_bits_bytes_and_time():
    """Two gallery images; the float embeddings find each query's image first. The private
    query's code equals ia's and is one bit from ib's, so Hamming search (flat and HNSW) ranks ia
    first (AP 1/2); the reconstructions re-rank that shortlist, ib first again."""
    index = {"float_embedding": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "embedding": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
             "code": torch.tensor([[1] * 8, [1] * 7 + [0]], dtype=torch.uint8), "index": torch.tensor([0, 1])}
    test = {"float_embedding": torch.tensor([[1.0, 0.1], [0.1, 1.0]]), "embedding": torch.tensor([[1.0, 0.1], [0.1, 1.0]]),
            "code": torch.tensor([[1] * 8, [1] * 8], dtype=torch.uint8), "index": torch.tensor([0, 1])}
    solution = {"public": {"qa": ["ia"]}, "private": {"qb": ["ib"]}}
    protocol = GLDv2Protocol(["qa", "qb"], ["ia", "ib"], solution, precision_ks=(1,))
    values = BinaryRetrievalMetric(protocol).combine({"test": test, "index": index})
    assert values["float/mAP@100_private"] == pytest.approx(1.0)
    assert values["hamming/mAP@100_private"] == pytest.approx(0.5) and values["hnsw/mAP@100_private"] == pytest.approx(0.5)
    assert values["reranked/mAP@100_private"] == pytest.approx(1.0)
    assert values["bits_per_vector"] == 8
    assert values["index_bytes/hamming"] < values["index_bytes/float"]
    assert all(values[f"search_ms_per_query/{space}"] >= 0 for space in ("float", "hamming", "hnsw", "reranked"))
