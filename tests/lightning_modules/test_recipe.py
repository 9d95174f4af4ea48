"""The one optimiser-and-schedule recipe: its schedules against the authors' schedulers, its
parameter groups, the linear scaling rule, its errors, and the recipes every config asks for."""

from __future__ import annotations

import math

import lightning
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import CONFIGS
from lightning_modules.base import VisionZooModule
from lightning_modules.nn.schedules import lr_factor
from lightning_modules.recipe import OptimizerRecipe


class _Regression(VisionZooModule):
    method_name = "regression"

    def __init__(self, optim: OptimizerRecipe) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.PReLU(), nn.Linear(4, 1))
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        x, y = batch
        return nn.functional.mse_loss(self.body(x).squeeze(1), y)


def _lrs(recipe: OptimizerRecipe, epochs: int, batches: int = 5, batch_size: int = 4) -> list[float]:
    """The lr of every training step of a run of ``epochs`` epochs of ``batches`` batches."""
    data = TensorDataset(torch.randn(batches * batch_size, 4), torch.randn(batches * batch_size))
    model = _Regression(recipe)
    trainer = lightning.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(data, batch_size=batch_size))
    return model.lrs


def test_msflow_schedule_is_linear_warmup_chained_with_multistep_per_epoch():
    """torch's LinearLR(start_factor, total_iters=W) chained with MultiStepLR, stepped per epoch."""
    recipe = OptimizerRecipe(lr=1e-3, optimizer="adam", schedule="step", milestones=(5, 8), gamma=0.33,
                             warmup_epochs=3, warmup_start_factor=0.1, interval="epoch")
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1e-3)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=3)
    steps = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[5, 8], gamma=0.33)
    expected = []
    for _ in range(10):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        warmup.step()
        steps.step()
    per_step = _lrs(recipe, epochs=10, batches=2)
    assert per_step[::2] == pytest.approx(expected, rel=1e-9) and per_step[1::2] == per_step[::2]


def test_face_schedule_is_arcface_torchs_polynomial_warmup():
    """arcface_torch's PolynomialLRWarmup: base·t/W during warm-up, then base·(1 − (t−W)/(T−W))²."""
    total, warmup = 50, 10  # 10 epochs of 5 steps, 2 warm-up epochs
    lrs = _lrs(OptimizerRecipe(lr=0.1, schedule="polynomial", warmup_epochs=2, decay_norm_and_bias=False), epochs=10)
    expected = [0.1 * t / warmup if t < warmup else 0.1 * (1 - (t - warmup) / (total - warmup)) ** 2 for t in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_cosine_warmup_over_a_fraction_down_to_a_scaled_min_lr():
    lrs = _lrs(OptimizerRecipe(lr=0.2, lr_batch_size=8, warmup_fraction=0.2, warmup_start_factor=0.5, min_lr=0.02),
               epochs=4)  # global batch 4: lr 0.1, min_lr 0.01; 20 steps, 4 of warm-up
    expected = [0.1 * (0.5 + 0.5 * t / 4) if t < 4 else 0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * (t - 4) / 16))
                for t in range(20)]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_step_milestones_count_epochs_and_a_constant_schedule_stays():
    assert [lr_factor(s, schedule="step", warmup_steps=0, total_steps=30, milestones=(10, 20), gamma=0.5)
            for s in (0, 9, 10, 19, 20, 29)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert _lrs(OptimizerRecipe(lr=0.3, schedule="step", milestones=(1, 2), gamma=0.1), epochs=3, batches=1) \
        == pytest.approx([0.3, 0.03, 0.003])
    assert _lrs(OptimizerRecipe(lr=0.3, schedule="constant"), epochs=2, batches=2) == pytest.approx([0.3] * 4)


def test_no_weight_decay_on_normalisation_prelu_and_biases_when_asked():
    model = _Regression(OptimizerRecipe(lr=0.1, weight_decay=5e-4, decay_norm_and_bias=False))
    decay, no_decay = model.optimizer_parameter_groups()
    assert [id(p) for p in decay["params"]] == [id(model.body[0].weight), id(model.body[3].weight)]
    assert {id(p) for p in no_decay["params"]} == {id(model.body[0].bias), id(model.body[1].weight),
                                                   id(model.body[1].bias), id(model.body[2].weight),
                                                   id(model.body[3].bias)}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (5e-4, 0.0)
    everything = _Regression(OptimizerRecipe(lr=0.1, weight_decay=5e-4)).optimizer_parameter_groups()
    assert len(everything) == 1 and len(everything[0]["params"]) == 7


def test_frozen_parameters_and_those_with_their_own_optimizer_are_left_out():
    class WithPolicy(_Regression):
        def parameters_with_own_optimizer(self):
            return self.body[3].parameters()

    model = WithPolicy(OptimizerRecipe(lr=0.1))
    model.body[0].requires_grad_(False)
    (group,) = model.optimizer_parameter_groups()
    assert [id(p) for p in group["params"]] == [id(p) for p in [*model.body[1].parameters(), *model.body[2].parameters()]]


@pytest.mark.parametrize("fields, key", [
    ({"lr": 0.0}, "lr must be positive"),
    ({"lr": 0.1, "lr_batch_size": 0}, "lr_batch_size"),
    ({"lr": 0.1, "min_lr": 0.2}, "min_lr"),
    ({"lr": 0.1, "warmup_epochs": 1, "warmup_fraction": 0.1}, "not both"),
    ({"lr": 0.1, "milestones": (3, 2), "schedule": "step"}, "milestones must be increasing"),
    ({"lr": 0.1, "milestones": (3,)}, "milestones are for schedule: step"),
    ({"lr": 0.1, "warmup_start_factor": 2.0}, "warmup_start_factor"),
])
def test_a_wrong_recipe_is_an_error_naming_the_key(fields, key):
    with pytest.raises(ValueError, match=f"model.init_args.optim: .*{key}"):
        OptimizerRecipe(**fields)


def test_a_recipe_read_back_from_hyperparameters_is_the_same_recipe(tmp_path):
    recipe = OptimizerRecipe(lr=0.1, schedule="step", milestones=(1, 2))
    model = _Regression(recipe)
    torch.save({"hyper_parameters": dict(model.hparams)}, tmp_path / "h.ckpt")
    assert torch.load(tmp_path / "h.ckpt", weights_only=True)["hyper_parameters"]["optim"] == recipe
    from_config = _Regression({**recipe.__dict__, "milestones": [1, 2]})  # as LightningCLI saves it
    assert from_config.recipe == recipe


@pytest.mark.parametrize("config", sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.glob("*/*.yaml")
                                          if "mini" not in p.name and p.parent.name != "trainer"))
def test_every_trained_config_gives_a_valid_recipe(config):
    init_args = yaml.safe_load((CONFIGS / config).read_text())["model"]["init_args"]
    if config.endswith(("retrieval.yaml", "revisited_eval.yaml")):
        assert "optim" not in init_args  # test-only configs
        return
    OptimizerRecipe(**init_args["optim"])


class _WithBackbone(VisionZooModule):
    method_name = "clipped"

    def __init__(self, optim: OptimizerRecipe) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.head(self.backbone(x)).squeeze(1), y) * 100.0


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_backbone_gradient_norm_is_clipped_and_the_head_is_not(precision):
    """arcface_torch's clip_grad_norm_(backbone, 5): with plain SGD at lr 1 one step moves the
    backbone by exactly its clipped gradient. Under 16-mixed the fused optimizer would unscale
    only in its step: the clip must see the true gradient, not the loss-scaled one."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randn(8)
    model = _WithBackbone(OptimizerRecipe(lr=1.0, momentum=0.0, schedule="constant", backbone_grad_clip_norm=0.5))
    reference = _WithBackbone(model.recipe)
    reference.load_state_dict(model.state_dict())
    reference.training_step((x, y), 0).backward()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = lightning.Trainer(accelerator="cpu", max_steps=1, precision=precision, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    backbone_step = torch.cat([(before[n] - p.detach()).flatten() for n, p in model.named_parameters() if n.startswith("backbone")])
    backbone_grad = torch.cat([p.grad.flatten() for p in reference.backbone.parameters()])
    assert float(backbone_grad.norm()) > 5.0  # far above the limit
    tolerance = 1e-5 if precision == "32-true" else 2e-2
    torch.testing.assert_close(backbone_step, backbone_grad * 0.5 / backbone_grad.norm(), rtol=tolerance, atol=tolerance)
    head_step = torch.cat([(before[n] - p.detach()).flatten() for n, p in model.named_parameters() if n.startswith("head")])
    head_grad = torch.cat([p.grad.flatten() for p in reference.head.parameters()])
    torch.testing.assert_close(head_step, head_grad, rtol=tolerance, atol=tolerance * float(head_grad.abs().max()))
