"""``python -m datamodules.prepare COMMAND ...``: offline data preparation.

- ``mpeg4 SRC_ROOT DST_ROOT [--workers N] [--gop-size G]``: re-encode ``UCF-101/<Class>/v_*.avi``
  to MPEG-4 Part 2 for CMD (:mod:`datamodules.prepare.mpeg4`), resumable; exit status 1 when
  some video failed, each listed at the end.
- ``davis_flow DAVIS_ROOT OUT --weights RAFT.pth [--model raft_large|raft_small]``: the optical
  flow of every DAVIS frame with torchvision's RAFT (:mod:`datamodules.prepare.davis_flow`),
  ``.flo`` and colour PNGs, resumable; exit status 1 when some sequence failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from datamodules.prepare.davis_flow import compute_davis_flow
from datamodules.prepare.mpeg4 import reencode_tree


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.prepare", description="Offline data preparation.")
    commands = parser.add_subparsers(dest="command", required=True)
    mpeg4 = commands.add_parser(
        "mpeg4", help="re-encode UCF-101/<Class>/v_*.avi to MPEG-4 Part 2 (P-frames only, fixed GOP) for CMD, resumable"
    )
    mpeg4.add_argument("src_root", type=Path, help="the UCF-101 folder holding the class folders")
    mpeg4.add_argument("dst_root", type=Path, help="the output folder, mirroring src_root")
    mpeg4.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    mpeg4.add_argument("--gop-size", type=int, default=12, help="frames from one I-frame to the next (default 12)")
    flow = commands.add_parser("davis_flow", help="optical flow of every DAVIS frame with torchvision's RAFT, resumable")
    flow.add_argument("davis_root", type=Path, help="the DAVIS folder holding JPEGImages/")
    flow.add_argument("out", type=Path, help="the output folder: <seq>/<frame>.flo and .png")
    flow.add_argument("--weights", type=Path, help="RAFT's state dict, a local file (required)")
    flow.add_argument("--model", choices=["raft_large", "raft_small"], default="raft_large")
    flow.add_argument("--resolution", default="480p")
    flow.add_argument("--updates", type=int, default=12, help="RAFT's refinement iterations (default 12)")
    flow.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "mpeg4":
            failures = reencode_tree(args.src_root, args.dst_root, args.workers, args.gop_size)
        else:
            failures = compute_davis_flow(args.davis_root, args.out, args.weights, args.model, args.resolution, args.updates,
                                          args.device)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
