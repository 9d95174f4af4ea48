"""Tracking speed: detection (FairMOT's or CorrTracker's network on one letterboxed frame) and
association (the JDE tracker) measured separately, against the number of objects per frame.

    python -m benchmarks.perf.tracking --methods fairmot corrtracker --backbone dla34 --height 608 --width 1088 \\
        --objects 10 50 150 --frames 30 --device cuda --out runs/perf/tracking.json

Detection runs the network with random weights on random frames (its cost does not depend on
the weights or on the number of objects: the top-K peak decoding is fixed). Association feeds
the tracker ``objects`` synthetic targets walking at constant velocity with fixed random
embeddings for ``frames`` frames (its cost grows with the objects: the cost matrices and the
Kalman gating). Frames per second of each, and of both in sequence.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lightning_modules.mot.corrtracker import CorrTracker
from lightning_modules.mot.fairmot import FairMOT
from lightning_modules.mot.tracker import JDETracker

METHODS = {"fairmot": FairMOT, "corrtracker": CorrTracker}


def detection_fps(model: FairMOT, height: int, width: int, frames: int, device: str) -> float:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (frames, height, width, 3), dtype=np.uint8)
    state: dict = {}
    model.detect(images[0], (height, width), state)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for image in images:
        model.detect(image, (height, width), state)
    if device == "cuda":
        torch.cuda.synchronize()
    return frames / (time.perf_counter() - started)


def association_fps(objects: int, frames: int, embedding_dim: int) -> float:
    rng = np.random.default_rng(0)
    start = rng.uniform([0, 0], [1800, 800], (objects, 2))
    velocity = rng.uniform(-3, 3, (objects, 2))
    embeddings = rng.normal(size=(objects, embedding_dim))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    tracker = JDETracker()
    started = time.perf_counter()
    for t in range(frames):
        corner = start + t * velocity
        boxes = np.concatenate([corner, corner + [40, 100]], axis=1)
        tracker.update(boxes, np.full(objects, 0.9), embeddings)
    return frames / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.tracking", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["fairmot", "corrtracker"])
    parser.add_argument("--backbone", default="dla34")
    parser.add_argument("--deformable", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--height", type=int, default=608)
    parser.add_argument("--width", type=int, default=1088)
    parser.add_argument("--objects", type=int, nargs="+", default=[10, 50, 150])
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = []
    print(f"{args.backbone} ({'deformable' if args.deformable else 'plain'} neck), {args.height}x{args.width}, {args.device}")
    print("| method | objects | detection frames/s | association frames/s | both frames/s |\n|---|---|---|---|---|")
    for method in args.methods:
        model = METHODS[method](backbone=args.backbone, pretrained=False, deformable=args.deformable, num_ids=100)
        model = model.eval().to(args.device)
        detection = detection_fps(model, args.height, args.width, args.frames, args.device)
        for objects in args.objects:
            association = association_fps(objects, args.frames, model.hparams.embedding_dim)
            both = 1 / (1 / detection + 1 / association)
            rows.append({"method": method, "objects": objects, "detection_fps": detection, "association_fps": association,
                         "fps": both})
            print(f"| {method} | {objects} | {detection:.2f} | {association:.1f} | {both:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": args.device, "backbone": args.backbone, "height": args.height,
                                        "width": args.width, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
