"""Compressed-domain inputs of CMD: MPEG-4 Part 2 I-frames and raw motion vectors, read with PyAV.

CMD (Huang et al., "Self-supervised Video Representation Learning by Context and Motion
Decoupling", CVPR 2021; method card §8) takes its context input from I-frames and its motion
target from motion vectors (MVs), both decoded by CoViAR (Wu et al., CVPR 2018;
``chaoyuaw/pytorch-coviar``, ``data_loader/coviar_data_loader.c``) from MPEG-4-re-encoded video.
This module reproduces CoViAR's I-frame and non-accumulated MV representations from FFmpeg's
``+export_mvs`` side data through PyAV, without the CoViAR extension.

**Re-encode first.** CoViAR decodes MPEG-4 Part 2 only, and its MVs assume that every non-I frame
is a P-frame predicted from the previous frame. Videos must therefore be re-encoded once, offline,
before CMD can read them. For UCF101::

    python -m datamodules.prepare mpeg4 <root>/UCF-101 <root>/UCF-101-mpeg4 --workers 8

mirrors every ``<Class>/v_*.avi`` into the second folder under the same relative path. It skips
files already done (so an interrupted run resumes), writes each file under a hidden temporary name
and renames it when complete, and lists the files that failed at the end instead of stopping.
Each file goes through :func:`datamodules.prepare.mpeg4.reencode_mpeg4`:

- codec ``mpeg4`` at a fixed quantiser of 2: CoViAR's ``data/reencode.sh`` runs
  ``ffmpeg -q:v 1 -c:v mpeg4``, and the encoder clips quantiser 1 to its default ``qmin`` of 2;
- no B-frames, an I-frame every ``gop_size`` = 12 frames (FFmpeg's default GOP) and no extra
  I-frames at scene cuts, so the I-frames are regular;
- the frame size kept: CMD crops the MV map together with the RGB frames of the original AVI, so
  their sizes must agree (CoViAR's own script also rescales to 340×256; CMD's data is not rescaled);
- every decoded frame re-encoded, so frame ``i`` of the re-encoded file is frame ``i`` of the
  original.

**Motion vectors** (:meth:`CompressedVideo.motion_vectors`) follow CoViAR's non-accumulated MV
representation exactly. FFmpeg's ``AVMotionVector`` (``libavutil/motion_vector.h``) describes a
``w``×``h`` block centred at ``(dst_x, dst_y)`` in the current frame and predicted from the block
centred at ``(src_x, src_y)`` in the reference frame, with ``src = dst + motion / motion_scale``
(FFmpeg's integer division, so whole pixels truncated toward zero, which CoViAR reads as is). The
value ``(dst_x − src_x, dst_y − src_y)`` is painted over the pixels ``dst_x − w/2 … dst_x + w/2 − 1``
(and likewise in y) whose source pixel is also inside the frame. **Sign convention:** the MV at a
pixel is its position in the current frame minus its source position in the previous frame, i.e.
the displacement of the content between the two frames: content moving right by ``d`` pixels a
frame gives ``mv_x ≈ +d``, content moving down gives ``mv_y ≈ +d`` (the negated FFmpeg
``motion_x / motion_scale``). Only vectors from the past reference (``source = −1``) are used;
I-frames, intra-coded blocks and frames without side data are zero.

**I-frames** (:meth:`CompressedVideo.iframe`) are returned as RGB. CoViAR returns BGR, and CMD's
dataset hands that array to PIL as if it were RGB, so the code's I-frames are channel-swapped;
``frame[..., ::-1]`` reproduces that.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from operator import index as as_index
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np

from datamodules.formats.images import CorruptFileError
from datamodules.formats.video import check_not_truncated

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.stream import VideoStream

# ISO/IEC 14496-2 §6.2.5: every VOP (frame) starts with this start code, followed by the 2-bit
# vop_coding_type (0 I, 1 P, 2 B, 3 S).
_VOP_START_CODE = b"\x00\x00\x01\xb6"
_VOP_TYPES = "IPBS"
_REENCODE_HINT = (
    "CMD's motion vectors need MPEG-4 Part 2 with P-frames only; re-encode it with "
    "`python -m datamodules.prepare mpeg4 SRC_ROOT DST_ROOT` (datamodules.prepare.mpeg4)"
)


@contextmanager
def open_video(path: Path) -> Iterator[tuple[InputContainer, VideoStream]]:
    """The container and its first video stream; CorruptFileError when either cannot be had."""
    try:
        container = av.open(str(path))
    except FileNotFoundError:
        raise
    except (av.FFmpegError, OSError) as error:
        raise CorruptFileError(f"{path}: cannot be opened as a video ({error})") from None
    with container:
        if not container.streams.video:
            raise CorruptFileError(f"{path}: the file has no video stream")
        yield container, container.streams.video[0]


class CompressedVideo:
    """I-frames and CoViAR-style raw motion vectors of one MPEG-4 Part 2 video (module docstring).

    Frame ``i`` is the ``i``-th frame in display order, which is also decoding order since the
    video has no B-frames. The constructor reads the whole file into memory (the compressed
    packets only) and closes it; each call decodes with its own decoder, from the I-frame that
    starts the GOP. Open one per sample: it holds no file handle and pickles, so it is safe in
    DataLoader workers.

    ``frame_types`` holds ``'I'`` or ``'P'`` (``'S'`` for a sprite VOP) per frame, read from the VOP
    headers without decoding; ``iframe_indices`` the positions of the I-frames; ``width`` and
    ``height`` the frame size.

    Raises FileNotFoundError for a missing file, :class:`CorruptFileError` for an unreadable or
    corrupt one, and ValueError for a video that was not re-encoded (another codec, B-frames).
    """

    def __init__(self, path: str | PathLike[str]) -> None:
        self.path = Path(path)
        with open_video(self.path) as (container, stream):
            codec = stream.codec_context
            if codec.name != "mpeg4":
                raise ValueError(f"{self.path}: the video codec is {codec.name!r}; {_REENCODE_HINT}")
            self.width, self.height = codec.width, codec.height
            self._extradata = codec.extradata
            declared = int(stream.frames)
            self._packets: list[bytes] = []
            try:
                for packet in container.demux(stream):
                    if packet.size:
                        self._packets.append(bytes(packet))
            except av.FFmpegError as error:
                raise CorruptFileError(
                    f"{self.path}: reading failed after {len(self._packets)} frames ({error})"
                ) from None
        if not self._packets:
            raise CorruptFileError(f"{self.path}: the video stream has no frames")
        check_not_truncated(self.path, declared, len(self._packets))
        self.frame_types: list[str] = [self._frame_type(i, data) for i, data in enumerate(self._packets)]
        self.iframe_indices: list[int] = [i for i, kind in enumerate(self.frame_types) if kind == "I"]
        if self.frame_types[0] != "I":
            raise CorruptFileError(
                f"{self.path}: the video starts with a {self.frame_types[0]}-frame, not an I-frame"
            )

    def _frame_type(self, index: int, data: bytes) -> str:
        vops = data.count(_VOP_START_CODE)
        if vops == 0:
            raise CorruptFileError(f"{self.path}: frame {index} has no MPEG-4 VOP header")
        if vops > 1:
            raise ValueError(
                f"{self.path}: frame {index} packs {vops} frames (packed bitstream); {_REENCODE_HINT}"
            )
        start = data.index(_VOP_START_CODE) + len(_VOP_START_CODE)
        if start == len(data):
            raise CorruptFileError(f"{self.path}: frame {index} is truncated in its VOP header")
        kind = _VOP_TYPES[data[start] >> 6]
        if kind == "B":
            raise ValueError(f"{self.path}: frame {index} is a B-frame; {_REENCODE_HINT}")
        return kind

    @property
    def num_frames(self) -> int:
        return len(self._packets)

    def _check_index(self, index: int) -> int:
        index = as_index(index)
        if not 0 <= index < self.num_frames:
            raise IndexError(
                f"{self.path}: frame {index} is out of range; the video has {self.num_frames} frames"
            )
        return index

    def _decode(self, start: int, stop: int) -> Iterator[tuple[int, av.VideoFrame]]:
        """``(index, frame)`` of frames ``start .. stop − 1``; ``start`` must be an I-frame."""
        decoder = av.CodecContext.create("mpeg4", "r")
        decoder.extradata = self._extradata
        decoder.thread_count = 1
        decoder.options = {"flags2": "+export_mvs"}
        index = start
        try:
            for data in [*self._packets[start:stop], None]:
                for frame in decoder.decode(None if data is None else av.Packet(data)):
                    yield index, frame
                    index += 1
        except av.FFmpegError as error:
            raise CorruptFileError(f"{self.path}: decoding frame {index} failed ({error})") from None
        if index != stop:
            raise CorruptFileError(
                f"{self.path}: decoding frames {start} to {stop - 1} gave {index - start} frames, "
                f"not {stop - start}"
            )

    def motion_vectors(self, frame_indices: Sequence[int]) -> np.ndarray:
        """Dense raw MVs ``[T, H, W, 2]`` float32 (channel 0 = x, 1 = y, in pixels; sign convention
        in the module docstring) of the requested frames, in the order requested (repeats allowed).

        Each GOP holding a requested P-frame is decoded from its I-frame up to the last requested
        frame in it; I-frames are all-zero.
        """
        indices = [self._check_index(i) for i in frame_indices]
        out = np.zeros((len(indices), self.height, self.width, 2), np.float32)
        rows: dict[int, list[int]] = {}
        for row, index in enumerate(indices):
            if self.frame_types[index] != "I":
                rows.setdefault(index, []).append(row)
        last_in_gop: dict[int, int] = {}
        for index in rows:
            start = self._gop_start(index)
            last_in_gop[start] = max(last_in_gop.get(start, index), index)
        for start, last in last_in_gop.items():
            for index, frame in self._decode(start, last + 1):
                side_data = frame.side_data.get("MOTION_VECTORS") if index in rows else None
                if side_data is not None:
                    mv = dense_motion_vectors(side_data.to_ndarray(), self.height, self.width)
                    out[rows[index]] = mv
        return out

    def _gop_start(self, index: int) -> int:
        return self.iframe_indices[bisect_right(self.iframe_indices, index) - 1]

    def iframe(self, index: int) -> np.ndarray:
        """RGB ``[H, W, 3]`` uint8 of the I-frame ``index`` (CoViAR's representation 0 is BGR; see the
        module docstring)."""
        index = self._check_index(index)
        if self.frame_types[index] != "I":
            raise ValueError(
                f"{self.path}: frame {index} is a {self.frame_types[index]}-frame, not an I-frame "
                f"(I-frames: {self.iframe_indices})"
            )
        ((_, frame),) = self._decode(index, index + 1)
        return frame.to_ndarray(format="rgb24")

    def iframe_candidates(self, first: int, last: int, margin: int = 5) -> list[int]:
        """The I-frames within ``[first − margin, last + margin]`` of a clip spanning frames
        ``first .. last``: the set CMD's code (``dataset/dataset.py``) draws its I-frame from,
        uniformly at random; the code treats an empty set as a failed sample."""
        return [i for i in self.iframe_indices if first - margin <= i <= last + margin]

    def nearest_iframe(self, first: int, last: int) -> int:
        """The I-frame nearest to the clip ``first .. last`` (distance 0 inside it; the earlier one of
        a tie). It lies in :meth:`iframe_candidates` whenever that set is non-empty (the method card's
        "I-frame nearest the clip, within [first − 5, last + 5]"); otherwise it is the nearest I-frame
        of the whole video."""
        if first > last:
            raise ValueError(f"the clip's first frame {first} is after its last frame {last}")
        return min(self.iframe_indices, key=lambda i: (max(first - i, i - last, 0), i))


def dense_motion_vectors(vectors: np.ndarray, height: int, width: int) -> np.ndarray:
    """CoViAR's raw MV map ``[H, W, 2]`` float32 of one frame (``create_and_load_mv_residual`` with
    ``accumulate=False``) from its ``AVMotionVector`` records (the structured array of PyAV's
    ``MotionVectors.to_ndarray()``): ``(dst_x − src_x, dst_y − src_y)`` painted over each block's
    pixels ``dst − size/2 … dst + size/2 − 1`` whose source pixel is also in the frame; vectors from a
    future reference (``source`` ≠ −1) are skipped; uncovered pixels are 0."""
    mv = np.zeros((height, width, 2), np.float32)
    moving = (vectors["src_x"] != vectors["dst_x"]) | (vectors["src_y"] != vectors["dst_y"])
    vectors = vectors[(vectors["source"] == -1) & moving]
    columns = (vectors[name].tolist() for name in ("w", "h", "src_x", "src_y", "dst_x", "dst_y"))
    for w, h, src_x, src_y, dst_x, dst_y in zip(*columns):
        # Offsets [−w/2, w/2) from the centres, where both the pixel and its source are in the frame.
        x0, x1 = max(-(w // 2), -dst_x, -src_x), min(w // 2, width - dst_x, width - src_x)
        y0, y1 = max(-(h // 2), -dst_y, -src_y), min(h // 2, height - dst_y, height - src_y)
        if x0 < x1 and y0 < y1:
            mv[dst_y + y0 : dst_y + y1, dst_x + x0 : dst_x + x1] = (dst_x - src_x, dst_y - src_y)
    return mv
