"""MSFlow's flow blocks: exact inverses, and log-determinants equal to the numerical Jacobian's."""

import math

import pytest
import torch

from lightning_modules.nn.flows import AllInOneBlock, FusionFlow, ParallelFlow, positional_encoding_2d


def _jacobian_log_det(function, x: torch.Tensor) -> float:
    jacobian = torch.autograd.functional.jacobian(function, x)
    jacobian = jacobian.reshape(x.numel(), x.numel())
    sign, log_abs_det = torch.linalg.slogdet(jacobian)
    assert sign != 0
    return float(log_abs_det)


@pytest.fixture(autouse=True)
def _double_precision():
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _perturb(module: torch.nn.Module) -> None:
    """Move parameters away from their identity-like initialisation."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))


def test_global_affine_starts_as_identity_scale():
    block = AllInOneBlock(channels=4, condition_channels=4)
    assert torch.allclose(block._scale(), torch.ones(1, 4, 1, 1))


def test_positional_encoding_shape_and_range():
    encoding = positional_encoding_2d(64, 5, 7)
    assert encoding.shape == (64, 5, 7)
    assert encoding.abs().max() <= 1.0
    assert not torch.allclose(encoding[:, 0, 0], encoding[:, 0, 1])  # varies along x
    assert not torch.allclose(encoding[:, 0, 0], encoding[:, 1, 0])  # and along y


@pytest.mark.parametrize("channels", [4, 5])
def test_parallel_flow_is_invertible_and_log_det_is_exact(channels):
    flow = ParallelFlow(channels, num_blocks=3, condition_channels=4)
    _perturb(flow)
    x = torch.randn(1, channels, 2, 3)
    z, log_det = flow(x)
    assert torch.allclose(flow.inverse(z), x, atol=1e-10)
    expected = _jacobian_log_det(lambda v: flow(v)[0], x)
    assert math.isclose(float(log_det.detach()[0]), expected, rel_tol=1e-8, abs_tol=1e-8)


def test_log_det_is_per_sample():
    flow = ParallelFlow(4, num_blocks=2, condition_channels=4)
    _perturb(flow)
    x = torch.randn(3, 4, 2, 2)
    _, log_det = flow(x)
    for i in range(3):
        assert torch.allclose(log_det[i], flow(x[i : i + 1])[1][0])


def test_fusion_flow_is_invertible_and_log_det_is_exact():
    """Two scales, C = 4, maps of 2x2 and 1x1 (the card's toy case)."""
    flow = FusionFlow([4, 4])
    _perturb(flow)
    xs = [torch.randn(1, 4, 2, 2), torch.randn(1, 4, 1, 1)]
    zs, log_det = flow(xs)
    for x, x_back in zip(xs, flow.inverse(zs)):
        assert torch.allclose(x_back, x, atol=1e-10)

    sizes = [x.numel() for x in xs]

    def flat(v: torch.Tensor) -> torch.Tensor:
        parts = [p.reshape(x.shape) for p, x in zip(v.split(sizes), xs)]
        return torch.cat([z.reshape(-1) for z in flow(parts)[0]])

    expected = _jacobian_log_det(flat, torch.cat([x.reshape(-1) for x in xs]))
    assert math.isclose(float(log_det.detach()[0]), expected, rel_tol=1e-8, abs_tol=1e-8)
