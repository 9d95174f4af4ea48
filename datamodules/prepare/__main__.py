"""``python -m datamodules.prepare COMMAND ...``: offline data preparation.

- ``mpeg4 SRC_ROOT DST_ROOT [--workers N] [--gop-size G]``: re-encode ``UCF-101/<Class>/v_*.avi``
  to MPEG-4 Part 2 for CMD (:mod:`datamodules.prepare.mpeg4`), resumable; exit status 1 when
  some video failed, each listed at the end.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

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
    args = parser.parse_args(argv)
    try:
        failures = reencode_tree(args.src_root, args.dst_root, args.workers, args.gop_size)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
