"""The one backbone factory: the suite's own models from timm's registry (timm's own model tests'
shape: every registered model is built and run), local weight files, and the one way to freeze."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from lightning_modules.base import VisionZooModule
from lightning_modules.nn.backbones import create_backbone, create_embedding_backbone, freeze_
from lightning_modules.nn.iresnet import IResNet
from lightning_modules.nn.video_resnet import VideoResNet

SUITE_MODELS = timm.list_models(module=["iresnet", "video_resnet"])


def _input(model: nn.Module) -> torch.Tensor:
    if isinstance(model, IResNet):
        return torch.randn(2, 3, 112, 112)
    return torch.randn(2, model.stem[0].in_channels, 4, 32, 32)


def test_the_suite_models_are_timms():
    assert sorted(SUITE_MODELS) == sorted(["iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "r2plus1d_10",
                                   "r2plus1d_18", "r2plus1d_26", "r2plus1d_test", "r3d_10"])


@pytest.mark.parametrize("name", SUITE_MODELS)
def test_every_suite_model_builds_runs_and_refuses_hub_weights(name):
    torch.manual_seed(0)
    model = create_backbone(name, pretrained=False)
    assert isinstance(model, (IResNet, VideoResNet))
    with torch.no_grad():  # in train mode: the deep iResNets' fresh running statistics overflow in eval mode
        output = model(_input(model))
    expected = 512 if isinstance(model, IResNet) else model.num_features
    assert output.shape == (2, expected) and torch.isfinite(output).all()
    with pytest.raises(ValueError, match=f"'{name}' has no pretrained weights to fetch.*--model.init_args.weights"):
        create_backbone(name, pretrained=True)


@pytest.mark.parametrize("name", ["iresnet18", "r2plus1d_test"])
def test_a_local_weights_file_loads_into_a_suite_model(name, tmp_path):
    torch.manual_seed(1)
    trained = create_backbone(name, pretrained=False)
    torch.save(trained.state_dict(), tmp_path / "weights.pth")
    torch.manual_seed(2)
    loaded = create_backbone(name, pretrained=False, weights=str(tmp_path / "weights.pth"))
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_embedding_backbones_end_in_batchnorm_and_the_iresnet_is_not_wrapped():
    iresnet = create_embedding_backbone("iresnet18", 128, dropout=0.1)
    assert isinstance(iresnet, IResNet) and iresnet.embedding[-1].num_features == 128
    assert iresnet.embedding[1].p == 0.1
    other = create_embedding_backbone("test_resnet", 64)
    assert isinstance(other[1], nn.BatchNorm1d) and other[0].num_classes == 64


class _Method(VisionZooModule):
    method_name = "frozen_test"

    def __init__(self) -> None:
        super().__init__()
        self.frozen_part = freeze_(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)))
        self.trained_part = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))


def test_a_frozen_module_stays_in_eval_mode_untrained_and_keeps_its_keys():
    model = _Method().train()
    assert all(not m.training for m in model.frozen_part.modules())
    assert all(m.training for m in model.trained_part.modules())
    assert not any(p.requires_grad for p in model.frozen_part.parameters())
    assert "frozen_part.0.weight" in model.state_dict()  # not wrapped: checkpoint keys unchanged
    before = model.frozen_part[1].running_mean.clone()
    model.frozen_part(torch.randn(8, 4) + 3)
    assert torch.equal(model.frozen_part[1].running_mean, before)  # eval-mode BatchNorm: statistics fixed
    duplicate = copy.deepcopy(model).train()
    assert not duplicate.frozen_part.training and duplicate.trained_part.training
    model.eval().train()
    assert not model.frozen_part.training
