"""A NaN loss stops training with a message naming the step, and the last checkpoint keeps
the last good weights."""

import re

import pytest
import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from callbacks.nan_guard import FiniteLossGuard, NonFiniteLossError


class _DivergesAtStep(LightningModule):
    def __init__(self, bad_step: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.bad_step = bad_step

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        return loss * float("nan") if self.global_step == self.bad_step else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_nan_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path):
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    trainer = Trainer(max_epochs=1, callbacks=[FiniteLossGuard(), checkpoints], logger=False,
                      enable_progress_bar=False, accelerator="cpu")
    model = _DivergesAtStep(bad_step=3)
    with pytest.raises(NonFiniteLossError, match="global step 3 .*last healthy checkpoint: .*last.ckpt"):
        trainer.fit(model, data)
    assert torch.isfinite(model.layer.weight).all()  # the NaN step never reached the weights
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 3
    assert torch.isfinite(saved["state_dict"]["layer.weight"]).all()


class _HugeLearningRate(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e30)


def test_checkpoints_written_while_diverging_are_not_called_good(tmp_path):
    """At lr 1e30 the first update makes the weights ~1e29; the loss turns inf/NaN only later."""
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)
    first = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True, save_top_k=-1)
    trainer = Trainer(max_epochs=1, callbacks=[FiniteLossGuard(), first], logger=False, enable_progress_bar=False,
                      accelerator="cpu", default_root_dir=tmp_path)
    with pytest.raises(NonFiniteLossError) as error:
        trainer.fit(_HugeLearningRate(), data)
    message = str(error.value)
    assert "global step 1" in message and "diverged before the loss turned NaN, not worth resuming" in message
    assert re.search(r"step=1.ckpt \(loss [\d.]+, largest weight [\d.]+e\+\d\d\)", message)  # finite loss, huge weights
    assert "no healthy checkpoint" in message


class _FusedDivergesAtStep(_DivergesAtStep):
    """NaN at one step only (a bad batch), fused SGD with momentum; the weights after each step."""

    def __init__(self, bad_step: int) -> None:
        super().__init__(bad_step)
        self.weights_after: list[torch.Tensor] = []

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.weights_after.append(self.layer.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, fused=True)


def test_deferred_checks_skip_the_non_finite_step_on_the_device_and_raise_before_the_next_checkpoint(tmp_path):
    """Checked every 8 steps, the NaN of step 3 is skipped by the fused optimizer (the weights
    after step 3 are those after step 2; the finite step 4 trains on), and the checkpoint due at
    step 5 is not written: the guard raises there, naming step 3."""
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
    trainer = Trainer(max_epochs=1, callbacks=[FiniteLossGuard(check_every_n_steps=8), checkpoints], logger=False,
                      enable_progress_bar=False, accelerator="cpu", default_root_dir=tmp_path)
    model = _FusedDivergesAtStep(bad_step=3)
    with pytest.raises(NonFiniteLossError, match="non-finite at global step 3 .*stopped at step 5"):
        trainer.fit(model, data)
    after = model.weights_after  # steps 0-3: the checkpoint callback raised before the module's hook of step 4
    assert len(after) == 4 and all(torch.isfinite(w).all() for w in after)
    assert torch.equal(after[3], after[2]) and not torch.equal(model.layer.weight.detach(), after[3])
    momentum = next(iter(trainer.optimizers[0].state.values()))["momentum_buffer"]
    assert torch.isfinite(momentum).all()
    assert not list(tmp_path.glob("*step=5*.ckpt"))


def test_deferred_checks_raise_at_the_check_interval():
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)
    trainer = Trainer(max_epochs=1, callbacks=[FiniteLossGuard(check_every_n_steps=4)], logger=False,
                      enable_progress_bar=False, enable_checkpointing=False, accelerator="cpu")
    model = _FusedDivergesAtStep(bad_step=1)
    with pytest.raises(NonFiniteLossError, match="non-finite at global step 1 .*stopped at step 4"):
        trainer.fit(model, data)
    assert torch.equal(model.weights_after[1], model.weights_after[0])
