"""The framework internals that ``lightning_modules/framework.py`` touches, each checked for the
behaviour visionzoo relies on: a test here fails when an upgrade of lightning, torchdata or torch
changes one of them (the pins of pyproject.toml are the versions they were checked against)."""

from __future__ import annotations

from importlib.metadata import version

import lightning
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_modules import framework
from runner import free_port


def test_the_pinned_versions_are_the_checked_ones():
    assert (version("lightning"), version("torchdata")) == ("2.6.6", "0.11.0")
    assert torch.__version__.split("+")[0] == "2.14.1"


def test_ddp_ignore_list_is_the_attribute_ddp_reads():
    module = lightning.LightningModule()
    module.layer = nn.Linear(2, 2)
    framework.keep_out_of_ddp(module, ("layer.weight",))
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(module)
        assert set(ddp.parameters_to_ignore) == {"layer.weight"}  # neither bucketed for all-reduce nor broadcast
    finally:
        dist.destroy_process_group()


class _Probe(lightning.LightningModule):
    """Records what the fit-loop helpers say at every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.seen: list[tuple[int, bool, int]] = []
        self.loader_built_early = False

    def training_step(self, batch, batch_idx):
        self.seen.append((batch_idx, framework.is_last_batch(self.trainer), framework.logged_step(self.trainer)))
        return self.layer(batch[0]).square().mean()

    def configure_optimizers(self):
        framework.build_train_loader(self.trainer)
        self.loader_built_early = self.trainer.train_dataloader is not None
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_loop_helpers_report_the_last_batch_the_logged_step_and_build_the_loader_early():
    model = _Probe()
    trainer = lightning.Trainer(accelerator="cpu", max_epochs=2, max_steps=-1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2)
    trainer.fit(model, DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2))
    assert model.loader_built_early
    assert [(i, last) for i, last, _ in model.seen] == [(0, False), (1, False), (2, False), (3, True)] * 2
    # The step the loggers write moves once per optimizer step (2 batches), before the step of the batch.
    assert [step for *_, step in model.seen] == [0, 0, 1, 1, 2, 2, 3, 3]



class _StopsMidEpoch(_Probe):
    """Stops training after its second batch of four, as a signal does, marking that step saved
    or not."""

    def __init__(self, mark: bool) -> None:
        super().__init__()
        self.mark = mark

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if batch_idx == 1:
            if self.mark:
                framework.mark_step_checkpointed(self.trainer, "elsewhere.ckpt")
            self.trainer.should_stop = True


@pytest.mark.parametrize("mark", [False, True])
def test_a_step_marked_checkpointed_gets_no_epoch_end_checkpoint_after_a_mid_epoch_stop(tmp_path, mark):
    trainer = lightning.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=tmp_path,
                                callbacks=[lightning.pytorch.callbacks.ModelCheckpoint(tmp_path, save_last=True)])
    trainer.fit(_StopsMidEpoch(mark), DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2))
    assert trainer.global_step == 2
    assert (tmp_path / "last.ckpt").exists() is not mark  # unmarked, Lightning saves the stopped epoch as ended

@pytest.mark.parametrize("num_workers", [0, 1])
def test_stateful_loader_state_keeps_the_position_where_the_restore_reads_it(num_workers):
    loader = StatefulDataLoader(TensorDataset(torch.arange(6.0)), batch_size=2, num_workers=num_workers)
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    main = state.get("_snapshot", {}).get("_main_snapshot", state)
    assert main["_sampler_iter_yielded"] == 1


def test_fit_loop_holds_the_loaders_the_restore_replaces():
    class Check(lightning.Callback):
        def on_train_start(self, trainer, pl_module):
            loop = trainer.fit_loop
            self.flattened = list(loop._combined_loader.flattened)
            self.fetcher = loop._data_fetcher is not None
            self.states_to_load = loop._combined_loader_states_to_load

    check = Check()
    loader = StatefulDataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer = lightning.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=[check])
    trainer.fit(_Probe(), loader)
    assert check.flattened == [loader] and check.fetcher and check.states_to_load == []
    from lightning.fabric.utilities.data import _set_sampler_epoch

    sampler = torch.utils.data.DistributedSampler(TensorDataset(torch.randn(4)), num_replicas=1, rank=0)
    _set_sampler_epoch(DataLoader(TensorDataset(torch.randn(4)), sampler=sampler), 7)
    assert sampler.epoch == 7


def test_appending_csv_logger_keeps_the_rows_of_an_earlier_run(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,loss,step\n0,1.5,0\n")
    logger = framework.AppendingCSVLogger(save_dir=str(tmp_path), name="", version="")
    logger.log_metrics({"loss": 0.5, "acc": 0.9}, step=1)
    logger.save()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == ["acc", "epoch", "loss", "step"]
    assert lines[1:] == [",0,1.5,0", "0.9,,0.5,1"]


def test_checkpoint_files_read_locally_and_urls_are_not_local(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "a.ckpt")
    assert torch.equal(framework.read_checkpoint(str(tmp_path / "a.ckpt"))["state_dict"]["w"], torch.ones(2))
    assert framework.is_local_path(tmp_path / "a.ckpt") and not framework.is_local_path("s3://bucket/a.ckpt")
