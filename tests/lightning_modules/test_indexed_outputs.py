"""The evaluation layer: indexed outputs come back once each, in dataset order, per eval set,
from any number of ranks; metrics find their sets by name; a batch or metric that lacks a field
is an error naming it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.metrics.video import RetrievalRecall
from lightning_modules.base import Evaluation
from lightning_modules.distributed.indexed_outputs import IndexedOutputs, first_occurrences

from runner import free_port


def test_first_occurrences_orders_by_value_and_keeps_the_first_repeat():
    assert first_occurrences(torch.tensor([5, 2, 5, 0, 2])).tolist() == [3, 1, 0]


def test_rows_come_back_in_dataset_order_once_each_per_eval_set():
    outputs = IndexedOutputs()
    outputs.append(["b", "a", "b"], torch.tensor([1, 0, 0]), value=torch.tensor([[11.0], [20.0], [10.0]]))
    outputs.append("a", torch.tensor([2, 0]), value=torch.tensor([[22.0], [99.0]]))  # index 0 of a: a repeat
    gathered = outputs.gather()
    assert list(gathered) == ["a", "b"]
    assert gathered["a"]["index"].tolist() == [0, 2] and gathered["a"]["value"].flatten().tolist() == [20.0, 22.0]
    assert gathered["b"]["index"].tolist() == [0, 1] and gathered["b"]["value"].flatten().tolist() == [10.0, 11.0]


def test_a_row_count_that_differs_from_the_batch_is_an_error_naming_the_output():
    with pytest.raises(ValueError, match="'logits' has 2 rows for a batch of 3"):
        IndexedOutputs().append("test", torch.arange(3), logits=torch.zeros(2, 4))


def _retrieval_batches(seed: int) -> list[dict]:
    """Clips of 6 gallery and 4 query videos (2 clips each), features of 3 dimensions."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for name, videos in (("gallery", 6), ("test", 4)):
        index = torch.arange(videos * 2)
        batches.append({"eval_set": [name] * len(index), "index": index, "video_index": index // 2,
                        "label": (index // 2) % 3, "features": torch.randn(len(index), 3, generator=generator)})
    return batches


def test_eval_sets_are_found_by_name_whatever_the_loader_order():
    gallery, queries = _retrieval_batches(0)
    results = []
    for order in ([gallery, queries], [queries, gallery]):
        evaluation = Evaluation([RetrievalRecall("test", "gallery", ks=(1, 2))])
        for batch in order:
            evaluation.update(batch)
        results.append(evaluation.compute())
    assert results[0] == results[1] and set(results[0]) == {"R@1", "R@2"}


def test_missing_fields_and_sets_are_errors_naming_them():
    gallery, queries = _retrieval_batches(0)
    evaluation = Evaluation([RetrievalRecall("test", "gallery")])
    with pytest.raises(KeyError, match="needs the field 'eval_set'"):
        evaluation.update({k: v for k, v in queries.items() if k != "eval_set"})
    with pytest.raises(KeyError, match=r"RetrievalRecall reads \['features'\]"):
        evaluation.update({k: v for k, v in queries.items() if k != "features"})
    evaluation.update(queries)
    with pytest.raises(ValueError, match=r"retrieval needs the eval sets \['gallery'\]; evaluated: \['test'\]"):
        evaluation.compute()


def _gather_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        outputs = IndexedOutputs()
        # Rank r holds items r, r + 2, ... of "test" (5 items: rank 1 pads with a repeat of 0),
        # and only rank 0 holds "extra" (a set whose every batch on rank 1 was skipped).
        index = torch.tensor([0, 2, 4]) if rank == 0 else torch.tensor([1, 3, 0])
        outputs.append("test", index, maps=index[:, None, None].float().expand(-1, 2, 3), label=index % 2)
        if rank == 0:
            outputs.append("extra", torch.tensor([1, 0]), feature=torch.tensor([[1.0], [0.0]]))
        torch.save(outputs.gather(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_gather_every_item_once_including_a_set_one_rank_lacks(tmp_path):
    mp.spawn(_gather_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        gathered = torch.load(tmp_path / f"rank{rank}.pt")
        assert list(gathered) == ["extra", "test"]
        assert gathered["test"]["index"].tolist() == [0, 1, 2, 3, 4]
        assert torch.equal(gathered["test"]["maps"], torch.arange(5).float()[:, None, None].expand(-1, 2, 3))
        assert gathered["test"]["label"].tolist() == [0, 1, 0, 1, 0]
        assert gathered["extra"]["feature"].flatten().tolist() == [0.0, 1.0]
