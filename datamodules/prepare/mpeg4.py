"""Offline re-encoding for CMD's compressed-domain inputs: every UCF101 video to MPEG-4 Part 2 with
P-frames only and a regular GOP, as CoViAR reads them (:mod:`datamodules.formats.compressed_video`
says why and how). ``python -m datamodules.prepare mpeg4 <root>/UCF-101 <root>/UCF-101-mpeg4``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from fractions import Fraction
from multiprocessing import get_context
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import av

from datamodules.formats.compressed_video import open_video
from datamodules.formats.images import CorruptFileError

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.stream import VideoStream


def _decoded_frames(container: InputContainer, stream: VideoStream, path: Path) -> Iterator[av.VideoFrame]:
    try:
        yield from container.decode(stream)
    except av.FFmpegError as error:
        raise CorruptFileError(f"{path}: decoding failed ({error})") from None


def _write_mpeg4(src: Path, out: Path, gop_size: int, qscale: int) -> int:
    with open_video(src) as (source, in_stream), av.open(str(out), "w") as target:
        in_stream.codec_context.thread_count = 1
        rate = in_stream.average_rate or in_stream.guessed_rate or Fraction(25)
        width, height = in_stream.codec_context.width, in_stream.codec_context.height
        stream = target.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        codec = stream.codec_context
        codec.gop_size, codec.max_b_frames, codec.thread_count = gop_size, 0, 1
        codec.qscale = True  # a fixed quantiser, set by qmin = qmax
        stream.options = {"qmin": str(qscale), "qmax": str(qscale), "sc_threshold": "1000000000"}
        num_frames = 0
        for frame in _decoded_frames(source, in_stream, src):
            picture = frame.reformat(width, height, "yuv420p")
            picture.pts, picture.time_base = num_frames, 1 / Fraction(rate)
            target.mux(stream.encode(picture))
            num_frames += 1
        if num_frames == 0:
            raise CorruptFileError(f"{src}: no frame could be decoded")
        target.mux(stream.encode(None))
    return num_frames


def reencode_mpeg4(
    src: str | PathLike[str], dst: str | PathLike[str], gop_size: int = 12, qscale: int = 2
) -> int:
    """Re-encode ``src`` to MPEG-4 Part 2 at ``dst`` as CMD/CoViAR expect (module docstring): fixed
    quantiser ``qscale``, an I-frame every ``gop_size`` frames and only P-frames, each predicted from
    the previous frame, in between; same frame size and frame count. The container follows ``dst``'s
    suffix. The file is written under a hidden temporary name in ``dst``'s folder and renamed when
    complete, so ``dst`` never holds a partial video. Returns the number of frames.

    Raises :class:`CorruptFileError` when ``src`` cannot be read.
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(f".{dst.stem}.partial{dst.suffix}")
    try:
        num_frames = _write_mpeg4(src, partial, gop_size, qscale)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(dst)
    return num_frames


def _reencode_job(job: tuple[Path, Path, int]) -> tuple[Path, str | None]:
    """``(src, None)``, or ``(src, what went wrong)``: one bad file must not stop a batch."""
    src, dst, gop_size = job
    try:
        reencode_mpeg4(src, dst, gop_size)
    except Exception as error:  # reported with the file's name by reencode_tree
        return src, f"{type(error).__name__}: {error}"
    return src, None


def reencode_tree(
    src_root: Path, dst_root: Path, workers: int = 1, gop_size: int = 12
) -> list[tuple[str, str]]:
    """Re-encode every ``<Class>/v_*.avi`` under ``src_root`` (the ``UCF-101`` folder) to the same
    relative path under ``dst_root`` with :func:`reencode_mpeg4`, skipping videos already there, and
    print progress. Returns the failures as ``(relative path, error)``."""
    if src_root.resolve() == dst_root.resolve():
        raise ValueError(f"the output folder must differ from the input folder {src_root}")
    sources = sorted(src_root.glob("*/v_*.avi"))
    if not sources:
        raise FileNotFoundError(f"no <Class>/v_*.avi videos under {src_root}; pass the UCF-101 folder itself")
    jobs = [(src, dst_root / src.relative_to(src_root), gop_size) for src in sources]
    jobs = [job for job in jobs if not job[1].exists()]
    skipped = len(sources) - len(jobs)
    print(
        f"{len(sources)} videos under {src_root}: {skipped} already re-encoded, "
        f"re-encoding {len(jobs)} into {dst_root} with {workers} worker(s)",
        flush=True,
    )
    if workers > 1 and jobs:
        with get_context("spawn").Pool(workers) as pool:
            failures = _report(pool.imap_unordered(_reencode_job, jobs), len(jobs), src_root)
    else:
        failures = _report(map(_reencode_job, jobs), len(jobs), src_root)
    print(f"done: {len(jobs) - len(failures)} re-encoded, {skipped} skipped, {len(failures)} failed", flush=True)
    for name, error in failures:
        print(f"  FAILED {name}: {error}", flush=True)
    return failures


def _report(results: Iterable[tuple[Path, str | None]], total: int, src_root: Path) -> list[tuple[str, str]]:
    failures, every = [], max(50, total // 100)  # about 100 progress lines for the real set
    for done, (src, error) in enumerate(results, 1):
        name = str(src.relative_to(src_root))
        if error is not None:
            failures.append((name, error))
            print(f"FAILED {name}: {error}", flush=True)
        if done % every == 0 or done == total:
            print(f"[{done}/{total}] {len(failures)} failed so far", flush=True)
    return sorted(failures)
