"""Optical flow of every DAVIS frame with torchvision's RAFT, for the zero-shot methods.

``python -m datamodules.prepare davis_flow DAVIS_ROOT OUT --weights RAFT.pth [--model raft_large]``
reads ``JPEGImages/<resolution>/<seq>/*.jpg`` and writes, per frame, the forward flow to the next
frame as ``OUT/<seq>/<frame>.flo`` and its colour-wheel rendering ``OUT/<seq>/<frame>.png`` (the
layout ``data.flow_root`` reads); the last frame of a sequence, which has no next frame, gets the
negated flow to its previous one. Frames are scaled to [−1, 1] (RAFT's input), padded by edge
replication to multiples of 8 and at least 128 (RAFT's correlation pyramid), and the flow cropped
back. The weights are a local file (no download here): torchvision's ``Raft_Large_Weights`` /
``Raft_Small_Weights`` state dicts, or any RAFT state dict of the same architecture.

Resumable: a frame whose two files exist is skipped; files are written under a temporary name
and renamed. A sequence that fails (a corrupt frame) is reported and the others go on; the
failures are listed at the end and the exit status is 1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from datamodules.formats.flow import flow_to_color, write_flo
from datamodules.formats.images import read_image

log = logging.getLogger(__name__)
MIN_SIZE, MULTIPLE = 128, 8


def load_raft(model: Literal["raft_large", "raft_small"], weights: Path | None) -> torch.nn.Module:
    """torchvision's RAFT with the state dict of ``weights`` (an error naming ``--weights`` without one)."""
    from torchvision.models import optical_flow

    if weights is None:
        raise ValueError("--weights: give RAFT's weights as a local file (torchvision's raft_large_C_T_SKHT_V2 or "
                         "raft_small_C_T_V2 .pth); they cannot be downloaded here")
    if not weights.is_file():
        raise FileNotFoundError(f"--weights {weights}: no such file")
    network = getattr(optical_flow, model)(weights=None)
    try:
        network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except RuntimeError as error:
        raise ValueError(f"--weights {weights}: not a {model} state dict ({str(error).splitlines()[0]})") from None
    return network.eval()


def _input(image: np.ndarray, device: str) -> tuple[torch.Tensor, tuple[int, int]]:
    height, width = image.shape[:2]
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)
    pad_h = max(MIN_SIZE, -(-height // MULTIPLE) * MULTIPLE) - height
    pad_w = max(MIN_SIZE, -(-width // MULTIPLE) * MULTIPLE) - width
    return F.pad(tensor, (0, pad_w, 0, pad_h), mode="replicate"), (height, width)


@torch.no_grad()
def estimate_flow(network: torch.nn.Module, first: np.ndarray, second: np.ndarray, updates: int, device: str) -> np.ndarray:
    """Flow [H, W, 2] from RGB ``first`` to ``second`` (RAFT's last refinement)."""
    a, (height, width) = _input(first, device)
    b, _ = _input(second, device)
    flow = network(a, b, num_flow_updates=updates)[-1][0, :, :height, :width]
    return flow.permute(1, 2, 0).cpu().numpy()


def _write_atomically(target: Path, write) -> None:
    partial = target.with_name(f".{target.name}.partial{target.suffix}")
    write(partial)
    partial.replace(target)


def compute_davis_flow(davis_root: Path, out: Path, weights: Path | None, model: Literal["raft_large", "raft_small"] = "raft_large",
                       resolution: str = "480p", updates: int = 12, device: str = "cpu") -> list[str]:
    """Flow of every frame of every sequence (module docstring); returns the failures."""
    frame_root = davis_root / "JPEGImages" / resolution
    if not frame_root.is_dir():
        raise FileNotFoundError(f"{frame_root}: no such folder; expected DAVIS's JPEGImages/{resolution}/<seq>/")
    network = load_raft(model, weights).to(device)
    failures = []
    sequences = sorted(path for path in frame_root.iterdir() if path.is_dir())
    for index, sequence in enumerate(sequences, start=1):
        frames = sorted(sequence.glob("*.jpg"))
        try:
            written = 0
            for t, frame in enumerate(frames):
                flo, png = out / sequence.name / f"{frame.stem}.flo", out / sequence.name / f"{frame.stem}.png"
                if flo.is_file() and png.is_file():
                    continue
                if t + 1 < len(frames):
                    flow = estimate_flow(network, read_image(frame), read_image(frames[t + 1]), updates, device)
                else:  # the last frame: the negated flow to the previous one
                    flow = -estimate_flow(network, read_image(frame), read_image(frames[t - 1]), updates, device)
                png.parent.mkdir(parents=True, exist_ok=True)
                _write_atomically(flo, lambda path: write_flo(path, flow))
                colour = cv2.cvtColor(flow_to_color(flow), cv2.COLOR_RGB2BGR)
                _write_atomically(png, lambda path: cv2.imwrite(str(path), colour))
                written += 1
            log.info(f"[{index}/{len(sequences)}] {sequence.name}: {written} of {len(frames)} frames computed")
        except Exception as error:  # noqa: BLE001 - one bad sequence must not stop the others
            failures.append(f"{sequence.name}: {type(error).__name__}: {error}")
            log.error(f"[{index}/{len(sequences)}] {sequence.name} failed: {error}")
    for failure in failures:
        log.error(f"failed: {failure}")
    return failures
