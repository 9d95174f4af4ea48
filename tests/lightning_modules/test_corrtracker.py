"""CorrTracker (card 6b): the local correlation's shape and its peak at a known shift, the
aggregation and reconstruction by a volume, the fusion starting as the identity, the switches,
and the previous frame's levels carried across a sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.mot.corrtracker import CorrTracker
from lightning_modules.nn.correlation import (SpatialCorrelation, TemporalCorrelation, aggregate, local_correlation,
                                              reconstruction_loss)

RADIUS = 2


def shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """y(p) = x(p + (dx, dy)) (zero outside): what x shows at p + d, y shows at p."""
    return torch.roll(x, shifts=(-dy, -dx), dims=(2, 3))


def test_the_correlation_of_a_shifted_map_peaks_at_the_shift():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(2, 16, 12, 14), dim=1)
    dx, dy = 1, -2
    b = shifted(a, -dx, -dy)  # b(p + d) = a(p)
    volume = local_correlation(a, b, RADIUS)
    assert volume.shape == (2, (2 * RADIUS + 1) ** 2, 12, 14)
    peak = volume[:, :, 3:-3, 3:-3].argmax(dim=1)  # away from the borders and the roll's wrap
    expected = (dy + RADIUS) * (2 * RADIUS + 1) + (dx + RADIUS)  # row-major (dy, dx)
    assert (peak == expected).all()


def test_aggregation_and_reconstruction_by_a_volume_at_the_true_shift():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 10, 12)
    dx, dy = 1, 1
    previous = shifted(image, dx, dy)  # previous(p) = image(p + d): image(p) = previous(p - d)
    one_hot = torch.full((1, (2 * RADIUS + 1) ** 2, 10, 12), -1e4)
    one_hot[:, (-dy + RADIUS) * (2 * RADIUS + 1) + (-dx + RADIUS)] = 1e4
    rebuilt = aggregate(one_hot.softmax(dim=1), previous, RADIUS)
    torch.testing.assert_close(rebuilt[..., 2:-2, 2:-2], image[..., 2:-2, 2:-2])
    assert reconstruction_loss(one_hot, previous, image, RADIUS) < reconstruction_loss(torch.zeros_like(one_hot), previous,
                                                                                       image, RADIUS)


def test_the_fusions_start_as_the_identity():
    features, previous = torch.randn(1, 8, 6, 7), torch.randn(1, 8, 6, 7)
    spatial, volume = SpatialCorrelation(8, RADIUS)(features)
    temporal, _ = TemporalCorrelation(8, RADIUS)(features, previous)
    torch.testing.assert_close(spatial, features)
    torch.testing.assert_close(temporal, features)
    assert volume.shape == (1, 25, 6, 7)


def _small(**kwargs) -> CorrTracker:
    return CorrTracker(backbone="dla46_c", pretrained=False, deformable=False, head_channels=16, embedding_dim=8, num_ids=20,
                       radius=RADIUS, **kwargs)


def test_switches_and_the_frame_pairs_training_needs():
    off = _small(spatial_levels=(), temporal_levels=())
    assert not any(k.startswith(("spatial", "temporal")) for k in off.state_dict())
    with pytest.raises(ValueError, match=r"level 7 is not one of 0\.\.3"):
        _small(spatial_levels=(7,))
    model = _small()
    batch = {"image": torch.randn(1, 3, 64, 96), "boxes": [torch.tensor([[8.0, 8.0, 20.0, 40.0]])], "track_ids": [torch.tensor([1])]}
    with pytest.raises(ValueError, match=r"data\.previous_frame true"):
        model.training_step(batch, 0)


def test_tracking_carries_the_previous_frames_levels():
    model = _small().eval()
    state = {"input_size": (64, 96)}
    frames = np.random.default_rng(0).integers(0, 255, (2, 64, 96, 3), dtype=np.uint8)
    model.detect(frames[0], (64, 96), state)
    first = [level.clone() for level in state["previous_levels"]]
    model.detect(frames[1], (64, 96), state)
    assert len(first) == 4 and not torch.equal(first[-1], state["previous_levels"][-1])
