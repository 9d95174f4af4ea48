"""Clips per second of the UCF101 training loader against a plain sequential decode.

    python -m benchmarks.perf.video_loading --root data/mini/ucf101 --backends torchcodec decord pyav \
        --workers 0 2 4 --clips 256 --out runs/perf/video_loading.json

For each backend it measures, on the same videos of the split-1 train list,

- ``sequential``: one process, no DataLoader: open each video, read the clip's frames, no
  augmentation (the floor a loader should beat with workers);
- ``loader`` with W workers: ``UCF101DataModule.train_dataloader()`` as training uses it
  (random clip positions, random resized crop, flip, normalisation), batches of
  ``--batch-size``, after one warm-up batch (worker start-up is reported apart);

and checks that the frames a backend returns are the requested ones: for ``--check-videos``
videos, the frames at a clip's indices must equal those of a full sequential PyAV decode
(mean absolute difference below 2 grey levels; decord and PyAV convert YUV to RGB with their own
rounding). Prints a table (clips/s and the ratio to the sequential decode of the same backend)
and writes every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from datamodules.clips import clip_indices, random_start
from datamodules.formats.video import Backend, VideoReader
from datamodules.ucf101 import UCF101DataModule


def _sequential(videos: list[Path], backend: Backend, num_frames: int, frame_stride: int, clips: int) -> float:
    """Clips/s of reading ``clips`` clips one after another in this process."""
    generator = torch.Generator().manual_seed(0)
    span = (num_frames - 1) * frame_stride + 1
    started = time.perf_counter()
    for k in range(clips):
        video = VideoReader(videos[k % len(videos)], backend)
        video.frames(clip_indices(random_start(len(video), span, generator), num_frames, frame_stride, len(video)))
    return clips / (time.perf_counter() - started)


def _loader(args: argparse.Namespace, backend: Backend, workers: int) -> dict[str, float]:
    datamodule = UCF101DataModule(
        str(args.root), num_frames=args.num_frames, frame_stride=args.frame_stride, image_size=args.image_size,
        resize=args.resize, batch_size=args.batch_size, num_workers=workers, backend=backend,
    )
    datamodule.setup("fit")
    started = time.perf_counter()
    batches = iter(datamodule.train_dataloader())
    next(batches)  # workers start and fill their first batches
    warm = time.perf_counter()
    measured = 0
    while measured < args.clips:
        try:
            measured += len(next(batches)["label"])
        except StopIteration:
            batches = iter(datamodule.train_dataloader())
    return {"clips_per_s": measured / (time.perf_counter() - warm), "startup_s": warm - started}


def _frames_match(videos: list[Path], backend: Backend, num_frames: int, frame_stride: int) -> float:
    """The largest mean absolute difference, over the checked videos, between the backend's
    frames at a clip's indices and the same frames of a full sequential PyAV decode."""
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for path in videos:
        reference = VideoReader(path, "pyav")
        everything = reference.frames(range(len(reference)))
        video = VideoReader(path, backend)
        span = (num_frames - 1) * frame_stride + 1
        indices = clip_indices(random_start(len(video), span, generator), num_frames, frame_stride, len(video))
        difference = np.abs(video.frames(indices).astype(np.float32) - everything[indices].astype(np.float32))
        worst = max(worst, float(difference.mean()))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("data/mini/ucf101"))
    parser.add_argument("--backends", nargs="+", choices=["torchcodec", "decord", "pyav"],
                        default=["torchcodec", "decord", "pyav"])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--clips", type=int, default=128, help="clips measured per configuration")
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--frame-stride", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--resize", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--check-videos", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/perf/video_loading.json"))
    args = parser.parse_args(argv)

    videos = [record.path for record in UCF101DataModule(str(args.root)).records("train")]
    rows = []
    for backend in args.backends:
        difference = _frames_match(videos[: args.check_videos], backend, args.num_frames, args.frame_stride)
        sequential = _sequential(videos, backend, args.num_frames, args.frame_stride, args.clips)
        rows.append({"backend": backend, "loader": "sequential", "workers": 0, "clips_per_s": sequential,
                     "ratio": 1.0, "frames_mean_abs_difference": difference, "frames_match": difference < 2.0})
        for workers in args.workers:
            measured = _loader(args, backend, workers)
            rows.append({"backend": backend, "loader": "datamodule", "workers": workers, **measured,
                         "ratio": measured["clips_per_s"] / sequential})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "root")} | {"root": str(args.root)}
    args.out.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
    print(f"{'backend':8} {'loader':11} {'workers':>7} {'clips/s':>9} {'x seq.':>7}  frames")
    for row in rows:
        check = "" if "frames_match" not in row else ("match" if row["frames_match"] else "DIFFER") + f" ({row['frames_mean_abs_difference']:.2f})"
        print(f"{row['backend']:8} {row['loader']:11} {row['workers']:>7} {row['clips_per_s']:>9.1f} {row['ratio']:>7.2f}  {check}")
    print(f"\nwritten to {args.out}")
    return 0 if all(row.get("frames_match", True) for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
