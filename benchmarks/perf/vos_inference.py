"""STM and LCM inference speed and memory against sequence length and memory interval.

    python -m benchmarks.perf.vos_inference --methods stm lcm --backbone resnet50 --height 480 --width 854 \
        --objects 2 --lengths 10 30 --memory-every 5 1 --device cuda --out runs/perf/vos_inference.json

For each method, length and memory interval a random sequence of that many frames with ``--objects``
objects in its first frame goes through :meth:`~lightning_modules.sequence_evaluation.SequenceEvaluatedModule.predict_sequence`
of :class:`~lightning_modules.vos.stm.STM` or :class:`~lightning_modules.vos.lcm.LCM` (random weights: the cost does not depend on them):
frames per second and the peak memory (CUDA: ``max_memory_allocated``; CPU: the growth of the
process's peak resident set, which understates the rows after the first of a run: run one
configuration per process for CPU memory). ``--memory-every 1`` is the worst case (every frame
kept).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from datamodules.davis import SequenceItem
from lightning_modules.vos.lcm import LCM
from lightning_modules.vos.stm import STM

METHODS = {"stm": STM, "lcm": LCM}


def sequence(length: int, height: int, width: int, objects: int) -> SequenceItem:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (length, height, width, 3), dtype=np.uint8)
    first = np.zeros((height, width), np.uint8)
    for k in range(1, objects + 1):
        first[k * height // (objects + 2) : (k + 1) * height // (objects + 2), width // 4 : width // 2] = k
    annotations = np.repeat(first[None], length, axis=0)
    return SequenceItem("perf", frames, annotations, [f"{t:05d}" for t in range(length)], first)


def measure(model: STM, item: SequenceItem, device: str) -> tuple[float, int]:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    model.predict_sequence(item)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return (len(item.frames) - 1) / seconds, int(peak)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.vos_inference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["stm", "lcm"])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=854)
    parser.add_argument("--objects", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--memory-every", type=int, nargs="+", default=[5, 1])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = []
    print(f"{args.backbone}, {args.height}x{args.width}, {args.objects} objects, {args.device}")
    print("| method | frames | memory every | frames/s | peak memory MiB |\n|---|---|---|---|---|")
    for method in args.methods:
        for every in args.memory_every:
            model = METHODS[method](backbone=args.backbone, pretrained=False, memory_every=every).eval().to(args.device)
            for length in args.lengths:
                fps, peak = measure(model, sequence(length, args.height, args.width, args.objects), args.device)
                rows.append({"method": method, "frames": length, "memory_every": every, "frames_per_s": fps,
                             "peak_memory_bytes": peak})
                print(f"| {method} | {length} | {every} | {fps:.2f} | {peak / 2**20:.0f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": args.device, "backbone": args.backbone, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
