"""Frame-accurate reading of video files with torchcodec, decord or PyAV.

``auto`` (the default) takes torchcodec where it loads (it needs the system's FFmpeg shared
libraries; `make ffmpeg` installs Debian's), else decord. torchcodec (exact seek mode: it scans
the packets once, then seeks to the keyframe before each request) and decord (seeks likewise)
are fast for clip sampling. Some files (broken indexes, variable frame rates) make decord
mis-seek; the ``pyav`` backend is the way out: it decodes sequentially from the first frame,
slower but exact. All return RGB uint8 frames [T, H, W, 3] for any list of frame indices
(unsorted, repeated).
An unreadable file raises :class:`~datamodules.formats.images.CorruptFileError` naming it, and
so does a truncated one: a file cut short keeps the frame count its header declares, while the
demuxer finds fewer frames (a video cut at half its bytes reads as one frame, which clip sampling
would repeat into a still clip).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from datamodules.formats.images import CorruptFileError

Backend = Literal["auto", "torchcodec", "decord", "pyav"]
DecodingBackend = Literal["torchcodec", "decord", "pyav"]


@functools.cache
def torchcodec_unavailable() -> str | None:
    """Why torchcodec cannot decode here (None when it can): it is not installed, or its
    libraries do not load (it needs the system's FFmpeg shared libraries)."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads its FFmpeg libraries)
    except (ImportError, OSError, RuntimeError) as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def backend_choice(backend: Backend) -> str:
    """What ``backend`` decodes with, in words, for the run's log."""
    resolved = resolve_backend(backend)
    if backend == "auto" and resolved != "torchcodec":
        return f"{resolved} (torchcodec unavailable: {torchcodec_unavailable()})"
    return resolved


def resolve_backend(backend: Backend) -> DecodingBackend:
    """The decoder ``backend`` names; ``auto`` is torchcodec where it loads (the fastest, about
    2.4x decord's frames/s on UCF101 clips), else decord. An explicit ``torchcodec`` that cannot
    load is an error saying why and what to install."""
    if backend == "auto":
        return "torchcodec" if torchcodec_unavailable() is None else "decord"
    if backend == "torchcodec" and torchcodec_unavailable() is not None:
        raise RuntimeError(f"backend torchcodec cannot load ({torchcodec_unavailable()}): it needs the FFmpeg shared "
                           "libraries (Debian: apt-get install libavcodec59 libavformat59 libavutil57 libswscale6 "
                           "libswresample4 libavdevice59 libavfilter8; `make ffmpeg` does it), or use backend auto/decord")
    if backend not in ("torchcodec", "decord", "pyav"):
        raise ValueError(f"backend must be 'auto', 'torchcodec', 'decord' or 'pyav', got {backend!r}")
    return backend


def check_not_truncated(path: Path, declared: int, readable: int) -> None:
    """A CorruptFileError naming ``path`` when fewer frames can be read than its header declares
    (0: declares none), with one frame of slack for headers that count differently."""
    if readable < declared - 1:
        raise CorruptFileError(f"video {path} is truncated: its header declares {declared} frames, {readable} can be read")


class VideoReader:
    """One open video. ``num_threads`` is the decoder's threads per reader (decord, torchcodec):
    1 when several DataLoader workers decode in parallel (the default), more for a single reader."""

    def __init__(self, path: str | Path, backend: Backend = "auto", num_threads: int = 1) -> None:
        self.path = Path(path)
        self.backend = backend = resolve_backend(backend)
        if not self.path.is_file():
            raise FileNotFoundError(f"video not found: {self.path}")
        if backend == "torchcodec":
            from torchcodec.decoders import VideoDecoder

            try:  # exact mode scans the packets: the count is what can be read, not the header's
                self._torchcodec = VideoDecoder(str(self.path), seek_mode="exact", num_ffmpeg_threads=num_threads,
                                                dimension_order="NHWC")
                self.num_frames = len(self._torchcodec)
            except (RuntimeError, ValueError) as error:
                raise CorruptFileError(f"cannot decode video {self.path} with torchcodec: {error}") from error
        elif backend == "decord":
            import decord

            try:
                self._decord = decord.VideoReader(str(self.path), num_threads=num_threads)
                self.num_frames = len(self._decord)
            except (decord.DECORDError, RuntimeError) as error:  # decord raises both
                raise CorruptFileError(f"cannot decode video {self.path} with decord: {error}") from error
        elif backend == "pyav":
            self.num_frames = len(self._decode_pyav(None))
        if self.num_frames == 0:
            raise CorruptFileError(f"video {self.path} has no frames")
        check_not_truncated(self.path, self._declared_frames(), self.num_frames)

    def __len__(self) -> int:
        return self.num_frames

    def frames(self, indices: Sequence[int]) -> np.ndarray:
        """Frames ``indices`` as RGB uint8 [T, H, W, 3]."""
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("no frame indices requested")
        bad = [i for i in indices if not 0 <= i < self.num_frames]
        if bad:
            raise IndexError(f"frames {bad} out of range for {self.path} ({self.num_frames} frames)")
        if self.backend == "torchcodec":
            try:
                return self._torchcodec.get_frames_at(indices).data.numpy()
            except (RuntimeError, ValueError) as error:
                raise CorruptFileError(f"cannot decode frames of {self.path} with torchcodec: {error}") from error
        if self.backend == "decord":
            import decord

            try:
                return self._decord.get_batch(indices).asnumpy()
            except (decord.DECORDError, RuntimeError) as error:  # decord raises both
                raise CorruptFileError(f"cannot decode frames of {self.path} with decord: {error}") from error
        decoded = self._decode_pyav(max(indices))
        return np.stack([decoded[i] for i in indices])

    def _declared_frames(self) -> int:
        """The frame count the container's header declares (0 when it declares none)."""
        import av

        try:
            with av.open(str(self.path)) as container:
                return int(container.streams.video[0].frames) if container.streams.video else 0
        except av.error.FFmpegError:
            return 0

    def _decode_pyav(self, last: int | None) -> list[np.ndarray]:
        """Every frame from the start up to ``last`` (all frames for None) as RGB arrays."""
        import av

        frames: list[np.ndarray] = []
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise CorruptFileError(f"{self.path} has no video stream")
                for frame in container.decode(video=0):
                    frames.append(frame.to_ndarray(format="rgb24"))
                    if last is not None and len(frames) > last:
                        break
        except av.error.FFmpegError as error:
            raise CorruptFileError(f"cannot decode video {self.path} with PyAV: {error}") from error
        return frames
