"""Video ResNets: the (2+1)D width formula, every named backbone's shapes (CMD's exactly at
112 px), CMD's even/odd token split, gradients, and the factory's error."""

import pytest
import timm
import torch

from lightning_modules.nn.backbones import create_backbone
from lightning_modules.nn.video_resnet import (
    Conv2Plus1d,
    VideoResNet,
    cmd_tokens,
    midplanes,
    r2plus1d_26,
    r3d_10,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_midplanes_hand_worked():
    # 3x3x3, 64 -> 64: 27*64*64 / (9*64 + 3*64) = 110592 / 768 = 144 (torchvision's layer1 M)
    assert midplanes(64, 64) == 144
    # 3x7x7 stem, 3 -> 64: 3*49*3*64 / (49*3 + 3*64) = 28224 / 339 = 83.26 -> 83
    assert midplanes(3, 64, t=3, d=7) == 83
    conv = Conv2Plus1d(64, 64)
    assert conv[0].out_channels == 144 and conv[3].in_channels == 144
    weights = sum(m.weight.numel() for m in conv if isinstance(m, torch.nn.Conv3d))
    assert weights == 27 * 64 * 64  # the factorisation keeps the 3-D conv's parameter count


# name -> (input channels, layer4 map for a 8 x 64 x 64 clip)
SMALL = {
    "r2plus1d_10": (3, (512, 1, 4, 4)),
    "r2plus1d_18": (3, (512, 1, 4, 4)),
    "r2plus1d_26": (3, (2048, 1, 2, 2)),
    "r2plus1d_test": (3, (64, 1, 4, 4)),
    "r3d_10": (2, (512, 1, 4, 4)),
}


@pytest.mark.parametrize("name", timm.list_models(module="video_resnet"))
def test_named_backbone_shapes(name):
    channels, layer4 = SMALL[name]
    model = timm.create_model(name).eval()
    x = torch.randn(1, channels, 8, 64, 64)
    with torch.no_grad():
        features, pooled = model.forward_features(x), model(x)
    assert model.num_features == layer4[0]
    assert features.shape == (1, *layer4)
    assert pooled.shape == (1, model.num_features)
    assert torch.allclose(pooled, features.mean(dim=(2, 3, 4)))


def test_factory_in_channels_zero_init_and_unknown_name():
    assert create_backbone("r2plus1d_10", False, in_chans=2).stem[0].in_channels == 2
    assert create_backbone("r3d_10", False).stem[0].in_channels == 2
    zero = create_backbone("r2plus1d_test", False, zero_init_residual=True)
    assert all(torch.all(block.residual[-1].weight == 0) for layer in (zero.layer1, zero.layer4) for block in layer)
    with pytest.raises(ValueError, match="no classifier"):
        create_backbone("r2plus1d_10", False, num_classes=10)
    with pytest.raises(ValueError, match="unknown timm backbone 'r2plus1d_50'; similar names: .*r2plus1d_10"):
        create_backbone("r2plus1d_50", False)


def test_cmd_shapes_and_tokens_even_odd_split():
    model = r2plus1d_26().eval()
    seen = {}
    model.layer3.register_forward_hook(lambda m, i, o: seen.__setitem__("x3", o))
    model.layer4.register_forward_hook(lambda m, i, o: seen.__setitem__("x4", o))
    with torch.no_grad():
        tokens = cmd_tokens(model, torch.randn(1, 3, 16, 112, 112))
    x3, x4 = seen["x3"], seen["x4"]
    assert x3.shape == (1, 1024, 4, 7, 7)
    assert x4.shape == (1, 2048, 2, 4, 4)
    assert tokens.shape == (1, 2048, 2, 7, 7)
    # channels [0, 1024) hold frames 0 and 2 of layer3, [1024, 2048) frames 1 and 3
    rows = torch.arange(7) * 4 // 7  # nearest 4 -> 7 takes source floor(i * 4 / 7): 0 0 1 1 2 2 3
    up = x4[:, :, :, rows][:, :, :, :, rows]
    for t in range(2):
        assert torch.allclose(tokens[:, :1024, t], x3[:, :, 2 * t] + up[:, :1024, t])
        assert torch.allclose(tokens[:, 1024:, t], x3[:, :, 2 * t + 1] + up[:, 1024:, t])
    with pytest.raises(ValueError, match="even"):
        cmd_tokens(model, torch.randn(1, 3, 4, 32, 32))  # layer3 time axis 1


def test_cmd_motion_vector_encoder_shape():
    model = r3d_10().eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 2, 8, 112, 112)).shape == (1, 512, 1, 7, 7)


def test_layer_strides_are_configurable():
    model = VideoResNet(
        "bottleneck", (1, 1, 1, 1), widths=(2, 4, 8, 16), stem_pool=True,
        layer_strides=((1, 1), (2, 2), (2, 2), (4, 2)),
    ).eval()
    with torch.no_grad():
        shapes = [tuple(o.shape[1:]) for o in model.forward_layers(torch.randn(1, 3, 16, 112, 112))]
    assert shapes == [(8, 16, 28, 28), (16, 8, 14, 14), (32, 4, 7, 7), (64, 1, 4, 4)]


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("conv", ["2plus1d", "3d"])
def test_gradients_reach_every_parameter(block, conv):
    model = VideoResNet(block, (2, 1, 1, 1), conv, in_channels=2, widths=(4, 8, 16, 32)).train()
    model(torch.randn(2, 2, 4, 32, 32)).square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_zero_init_residual_starts_blocks_as_shortcuts():
    for zero in (True, False):
        for block in ("basic", "bottleneck"):
            model = VideoResNet(block, (1, 1, 1, 1), widths=(4, 8, 16, 32), zero_init_residual=zero)
            for layer in (model.layer1, model.layer4):
                assert torch.all(layer[0].residual[-1].weight == (0.0 if zero else 1.0))
