"""The contracts every method and DataModule share: work after an optimizer step runs once per
step under gradient accumulation; a DataModule that lacks a contract member fails at once,
naming it."""

from __future__ import annotations

from typing import Any

import lightning
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.base import VisionZooDataModule
from lightning_modules.base import VisionZooModule


class _CountingSteps(VisionZooModule):
    method_name = "counting"

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.after_step = 0

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.weight * batch).sum()

    def after_optimizer_step(self) -> None:
        self.after_step += 1

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("accumulate, batches, steps", [(1, 6, 6), (2, 6, 3), (4, 6, 2)])
def test_after_optimizer_step_runs_once_per_step_under_accumulation(accumulate, batches, steps, tmp_path):
    model = _CountingSteps()
    trainer = lightning.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                                accumulate_grad_batches=accumulate)
    trainer.fit(model, DataLoader(torch.ones(batches, 1), batch_size=1))
    assert trainer.global_step == steps and model.after_step == steps  # the epoch's last batch steps too


def test_a_datamodule_without_its_benchmark_fails_when_defined():
    with pytest.raises(TypeError, match="_NoBenchmark must set the class attribute `benchmark`"):
        class _NoBenchmark(VisionZooDataModule):  # noqa: F841
            pass


def test_a_datamodule_missing_a_contract_member_fails_when_instantiated_naming_it():
    class _NoDescribe(VisionZooDataModule):
        benchmark = "toy"
        run_name = "toy"
        num_skipped = 0

        def eval_set_names(self, stage: str) -> list[str]:
            return []

    with pytest.raises(TypeError, match="abstract method.*describe"):
        _NoDescribe()
