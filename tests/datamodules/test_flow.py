"""Optical flow files: the colour wheel against hand-computed colours, .flo round trip and its
errors."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.formats.flow import color_wheel, flow_to_color, read_flo, write_flo


def test_the_wheel_has_its_six_ramps():
    wheel = color_wheel()
    assert wheel.shape == (55, 3)
    np.testing.assert_allclose(wheel[0], [255, 0, 0])  # red
    np.testing.assert_allclose(wheel[15], [255, 255, 0])  # yellow after 15 steps
    np.testing.assert_allclose(wheel[21], [0, 255, 0])  # green after 6 more
    np.testing.assert_allclose(wheel[25], [0, 255, 255])  # cyan after 4 more
    np.testing.assert_allclose(wheel[36], [0, 0, 255])  # blue after 11 more
    np.testing.assert_allclose(wheel[49], [255, 0, 255])  # magenta after 13 more
    np.testing.assert_allclose(wheel[54], [255, 0, 255 - 255 * 5 / 6])


def test_flow_colours_by_hand():
    """At the largest magnitude (radius 1): right → angle of (−1, −0) = −π → hue 0, red; left →
    angle 0 → hue 27 = 2/11 into cyan→blue, (0, 255 − 255·2/11, 255); down → angle −π/2 → hue 13.5,
    halfway between (255, 221, 0) and (255, 238, 0); no motion is white. Half the magnitude
    desaturates halfway: right → (255, 127, 127). Beyond the normaliser: 75 % of the colour."""
    flow = np.array([[[1, 0], [-1, 0], [0, 1], [0, 0]]], np.float32)
    colours = flow_to_color(flow, max_magnitude=1.0)[0]
    np.testing.assert_array_equal(colours[0], [255, 0, 0])
    np.testing.assert_array_equal(colours[1], [0, 208, 255])
    np.testing.assert_array_equal(colours[2], [255, 229, 0])
    np.testing.assert_array_equal(colours[3], [255, 255, 255])
    np.testing.assert_array_equal(flow_to_color(np.array([[[1, 0]]], np.float32), max_magnitude=2.0)[0, 0], [255, 127, 127])
    np.testing.assert_array_equal(flow_to_color(np.array([[[1, 0]]], np.float32), max_magnitude=0.5)[0, 0], [191, 0, 0])


def test_flo_round_trip_and_errors(tmp_path):
    flow = np.random.default_rng(0).normal(size=(5, 7, 2)).astype(np.float32)
    write_flo(tmp_path / "a.flo", flow)
    np.testing.assert_array_equal(read_flo(tmp_path / "a.flo"), flow)
    assert (tmp_path / "a.flo").read_bytes()[:4] == b"PIEH"  # the tag 202021.25 as little-endian float32
    (tmp_path / "b.flo").write_bytes(b"ABCD" + bytes(20))
    with pytest.raises(ValueError, match=r"b\.flo: not a \.flo file"):
        read_flo(tmp_path / "b.flo")
    (tmp_path / "c.flo").write_bytes((tmp_path / "a.flo").read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"c\.flo: 284 bytes where a 7x5 flow has 292"):
        read_flo(tmp_path / "c.flo")


def test_davis_sequences_carry_their_flow_in_either_format(mini_davis, tmp_path):
    import shutil

    from datamodules.davis import DAVISDataModule

    images = DAVISDataModule(str(mini_davis), year=2016, task="unsupervised", flow_root=str(mini_davis / "FlowImages/480p"))
    images.setup("test")
    flo = DAVISDataModule(str(mini_davis), year=2016, task="unsupervised", flow_root=str(mini_davis / "Flow/480p"),
                          flow_format="flo")
    flo.setup("test")
    a, b = images.sequences[1], flo.sequences[1]
    assert a.flows.shape == a.frames.shape and a.flows.dtype == np.uint8
    assert np.abs(a.flows.astype(int) - b.flows.astype(int)).max() <= 1  # the PNG is the same rendering
    moving = a.annotations[3] == 1
    assert (a.flows[3][~moving] == 255).all(axis=-1).mean() > 0.9  # the background does not move: white
    assert (a.flows[3][moving] != 255).any(axis=-1).mean() > 0.9
    root = tmp_path / "flow"
    shutil.copytree(mini_davis / "FlowImages/480p", root)
    (root / "val-01/00004.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)optical flow layout .* incomplete.*val-01/00004\.png.*davis_flow"):
        DAVISDataModule(str(mini_davis), year=2016, flow_root=str(root)).setup("test")


def test_raft_prepare_command_writes_every_frame_resumes_and_names_its_errors(mini_davis, tmp_path, capsys):
    """torchvision's RAFT-small with random weights (saved as the local weights file) on one mini
    sequence: a .flo and a PNG per frame, the layout data.flow_root reads; a second run computes
    nothing; no --weights is an error naming it."""
    import shutil

    import torch
    from torchvision.models.optical_flow import raft_small

    from datamodules.prepare.__main__ import main

    root = tmp_path / "DAVIS"
    shutil.copytree(mini_davis / "JPEGImages/480p/val-00", root / "JPEGImages/480p/val-00")
    torch.manual_seed(0)
    torch.save(raft_small(weights=None).state_dict(), tmp_path / "raft_small.pth")
    args = ["davis_flow", str(root), str(tmp_path / "flow"), "--weights", str(tmp_path / "raft_small.pth"),
            "--model", "raft_small", "--updates", "2", "--device", "cpu"]
    assert main(args) == 0
    files = sorted(p.name for p in (tmp_path / "flow/val-00").iterdir())
    assert files == sorted([f"{t:05d}.flo" for t in range(10)] + [f"{t:05d}.png" for t in range(10)])
    assert read_flo(tmp_path / "flow/val-00/00003.flo").shape == (48, 80, 2)
    before = (tmp_path / "flow/val-00/00003.flo").stat().st_mtime_ns
    assert main(args) == 0 and (tmp_path / "flow/val-00/00003.flo").stat().st_mtime_ns == before  # resumed: nothing redone
    with pytest.raises(SystemExit):
        main(["davis_flow", str(root), str(tmp_path / "flow")])
    assert "--weights: give RAFT's weights as a local file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["davis_flow", str(root), str(tmp_path / "flow"), "--weights", str(tmp_path / "raft_small.pth")])  # raft_large
    assert "not a raft_large state dict" in capsys.readouterr().err
