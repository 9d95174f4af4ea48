"""CMD's compressed-domain inputs: MV direction and sign (CoViAR: dst − src), GOP structure,
I-frames, re-encoding and its command line, errors, and CMD's MV clamp and flip."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from av.video.frame import PictureType
from PIL import Image

from datamodules.formats.compressed_video import CompressedVideo, dense_motion_vectors
from datamodules.prepare.__main__ import main
from datamodules.prepare.mpeg4 import reencode_mpeg4
from datamodules.pretext.cmd import flip_motion_vectors, mv_preprocess
from datamodules.formats.images import CorruptFileError

SQUARE = 32


def smooth_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Random texture, smooth at the scale of a few pixels, so that motion estimation locks on."""
    small = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def moving_square(
    num_frames: int, height: int, width: int, velocity: tuple[int, int], seed: int = 0
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Frames of a textured square moving by ``velocity`` = (dy, dx) pixels a frame over a static
    textured background, and the square's top-left corner (y, x) in each frame."""
    rng = np.random.default_rng(seed)
    background, square = smooth_texture(rng, height, width), smooth_texture(rng, SQUARE, SQUARE)
    frames, corners = [], []
    for t in range(num_frames):
        y, x = 8 + velocity[0] * t, 8 + velocity[1] * t
        frame = background.copy()
        frame[y : y + SQUARE, x : x + SQUARE] = square
        frames.append(frame)
        corners.append((y, x))
    return np.stack(frames), corners


def write_video(
    path: Path, frames: np.ndarray, codec: str = "mpeg4", gop_size: int = 12, max_b_frames: int = 0
) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop_size
        stream.codec_context.max_b_frames = max_b_frames
        stream.options = {"qmin": "2", "qmax": "2"}
        stream.codec_context.qscale = True
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def decoded_frames(path: Path) -> list[av.VideoFrame]:
    with av.open(str(path)) as container:
        return list(container.decode(video=0))


@pytest.fixture(scope="module")
def rightward(tmp_path_factory) -> tuple[CompressedVideo, list[tuple[int, int]], np.ndarray]:
    """30 frames, GOP 12 (I-frames 0, 12, 24), a square moving right by 2 pixels a frame."""
    frames, corners = moving_square(30, 64, 112, velocity=(0, 2))
    path = write_video(tmp_path_factory.mktemp("right") / "v_right.avi", frames, gop_size=12)
    return CompressedVideo(path), corners, frames


def square_interior(mv: np.ndarray, corner: tuple[int, int], inset: int = 6) -> np.ndarray:
    y, x = corner
    return mv[y + inset : y + SQUARE - inset, x + inset : x + SQUARE - inset].reshape(-1, 2)


def far_background(mv: np.ndarray, corners: list[tuple[int, int]], distance: int = 16) -> np.ndarray:
    """Pixels at least ``distance`` away from the square in any of the given frames."""
    keep = np.ones(mv.shape[:2], bool)
    for y, x in corners:
        top, left = max(0, y - distance), max(0, x - distance)
        keep[top : y + SQUARE + distance, left : x + SQUARE + distance] = False
    assert keep.sum() > 200
    return mv[keep]


def assert_moves(
    mv: np.ndarray, corners: list[tuple[int, int]], t: int, expected: tuple[float, float]
) -> None:
    interior = square_interior(mv, corners[t])
    assert np.median(interior[:, 0]) == pytest.approx(expected[0], abs=0.75), f"frame {t} mv_x"
    assert np.median(interior[:, 1]) == pytest.approx(expected[1], abs=0.75), f"frame {t} mv_y"
    background = far_background(mv, corners[t - 1 : t + 1])
    assert np.median(np.abs(background)) == 0 and np.abs(background).mean() < 0.25, f"frame {t} background"


def test_dense_motion_vectors_paints_blocks_around_their_centres():
    # PyAV's MotionVectors.to_ndarray() layout of FFmpeg's AVMotionVector.
    dtype = np.dtype(
        [("source", "int32"), ("w", "uint8"), ("h", "uint8"), ("src_x", "int16"), ("src_y", "int16"),
         ("dst_x", "int16"), ("dst_y", "int16"), ("flags", "uint64"), ("motion_x", "int32"),
         ("motion_y", "int32"), ("motion_scale", "uint16")],
        align=True,
    )
    vectors = np.zeros(4, dtype)
    fields = ("source", "w", "h", "src_x", "src_y", "dst_x", "dst_y")
    for record, values in zip(vectors, [
        (-1, 16, 16, 22, 8, 24, 8),  # centre (24, 8): columns 16..31, rows 0..15; content moved right
        (-1, 8, 8, 6, 31, 4, 28),  # rows 24..31, but only rows whose source row (+3) is inside
        (-1, 16, 16, 40, 24, 40, 24),  # a zero vector
        (1, 16, 16, 30, 8, 40, 8),  # a future reference: skipped
    ]):
        for field, value in zip(fields, values):
            record[field] = value
    expected = np.zeros((32, 48, 2), np.float32)
    expected[0:16, 16:32] = (2, 0)
    expected[24:29, 0:8] = (-2, -3)
    np.testing.assert_array_equal(dense_motion_vectors(vectors, 32, 48), expected)


def test_rightward_motion_gives_positive_mv_x(rightward):
    video, corners, _ = rightward
    p_frames = [t for t in range(1, 12) if video.frame_types[t] == "P"]
    assert p_frames == list(range(1, 12))
    mvs = video.motion_vectors(p_frames)
    assert mvs.shape == (len(p_frames), 64, 112, 2) and mvs.dtype == np.float32
    for mv, t in zip(mvs, p_frames):
        # CoViAR's sign: dst − src, the content's displacement since the previous frame.
        assert_moves(mv, corners, t, expected=(2.0, 0.0))


def test_downward_motion_gives_positive_mv_y(tmp_path):
    frames, corners = moving_square(14, 96, 64, velocity=(2, 0), seed=1)
    video = CompressedVideo(write_video(tmp_path / "v_down.avi", frames, gop_size=12))
    p_frames = list(range(1, 12))
    for mv, t in zip(video.motion_vectors(p_frames), p_frames):
        assert_moves(mv, corners, t, expected=(0.0, 2.0))


def test_frame_types_follow_the_gop(tmp_path):
    frames, _ = moving_square(12, 64, 64, velocity=(0, 1))
    path = write_video(tmp_path / "v_gop.avi", frames, gop_size=5)
    video = CompressedVideo(path)
    assert video.num_frames == 12 and (video.height, video.width) == (64, 64)
    assert video.iframe_indices == [0, 5, 10]
    assert video.frame_types == ["I", "P", "P", "P", "P"] * 2 + ["I", "P"]
    assert video.frame_types == [PictureType(frame.pict_type).name for frame in decoded_frames(path)]


def test_motion_vectors_of_iframes_are_zero_and_requests_may_repeat(rightward):
    video, _, _ = rightward
    assert not video.motion_vectors([0, 12, 24]).any()
    singles = np.stack([video.motion_vectors([t])[0] for t in (25, 3, 14)])
    assert np.abs(singles).max() > 0
    mixed = video.motion_vectors([25, 3, 12, 3, 14])
    np.testing.assert_array_equal(mixed[[0, 1, 4]], singles)
    np.testing.assert_array_equal(mixed[3], singles[1])
    assert not mixed[2].any()
    assert video.motion_vectors([]).shape == (0, 64, 112, 2)
    with pytest.raises(IndexError, match="30 frames"):
        video.motion_vectors([30])


def test_iframe_is_the_decoded_rgb_frame(rightward):
    video, _, frames = rightward
    reference = decoded_frames(video.path)
    for index in (0, 12, 24):
        image = video.iframe(index)
        assert image.shape == (64, 112, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, reference[index].to_ndarray(format="rgb24"))
        error = np.abs(image.astype(int) - frames[index]).mean()  # chroma subsampling: about 10
        swapped = np.abs(image.astype(int) - frames[index, ..., ::-1]).mean()
        assert error < 15 and swapped > 3 * error, (error, swapped)  # RGB, not CoViAR's BGR
    with pytest.raises(ValueError, match="P-frame, not an I-frame"):
        video.iframe(5)


def test_nearest_iframe_and_candidates(rightward):
    video, _, _ = rightward  # I-frames 0, 12, 24 of 30
    assert video.nearest_iframe(10, 14) == 12  # inside the clip
    assert video.nearest_iframe(3, 4) == 0  # 3 before, versus 8 after
    assert video.nearest_iframe(7, 9) == 12  # 3 after, versus 7 before
    assert video.nearest_iframe(27, 29) == 24
    assert video.nearest_iframe(17, 19) == 12  # a tie (5 and 5): the earlier one
    assert video.iframe_candidates(3, 4) == [0]
    assert video.iframe_candidates(6, 8) == [12]
    assert video.iframe_candidates(2, 19) == [0, 12, 24]
    # No I-frame within [first − margin, last + margin]: the nearest overall.
    assert video.iframe_candidates(18, 19, margin=3) == []
    assert video.nearest_iframe(18, 19) == 24  # 5 after, versus 6 before
    assert video.iframe_candidates(18, 18, margin=5) == []
    assert video.nearest_iframe(18, 18) == 12  # a tie again
    with pytest.raises(ValueError, match="after its last frame"):
        video.nearest_iframe(5, 4)


def test_reader_pickles_for_dataloader_workers(rightward):
    video, _, _ = rightward
    copy = pickle.loads(pickle.dumps(video))
    np.testing.assert_array_equal(copy.motion_vectors([3]), video.motion_vectors([3]))


def test_reencode_mpeg4_from_another_codec_and_gop(tmp_path):
    # Noise frames are all scene cuts: the re-encoded GOP must stay regular anyway.
    noise = np.random.default_rng(2).integers(0, 256, (13, 48, 64, 3), dtype=np.uint8)
    src = write_video(tmp_path / "v_src.avi", noise, codec="mpeg2video", gop_size=30, max_b_frames=2)
    source_types = [PictureType(frame.pict_type).name for frame in decoded_frames(src)]
    assert "B" in source_types
    with pytest.raises(ValueError, match="'mpeg2video'.*re-encode"):
        CompressedVideo(src)

    dst = tmp_path / "out" / "v_src.avi"
    assert reencode_mpeg4(src, dst, gop_size=5) == 13
    assert sorted(os.listdir(dst.parent)) == ["v_src.avi"]
    video = CompressedVideo(dst)
    assert (video.num_frames, video.height, video.width) == (13, 48, 64)
    assert video.iframe_indices == [0, 5, 10]
    assert set(video.frame_types) == {"I", "P"}
    before = np.stack([frame.to_ndarray(format="rgb24") for frame in decoded_frames(src)]).astype(int)
    after = np.stack([frame.to_ndarray(format="rgb24") for frame in decoded_frames(dst)]).astype(int)
    assert np.abs(after - before).mean() < 12  # quantiser 2 on pure noise


def test_mpeg4_with_b_frames_must_be_reencoded(tmp_path):
    frames, _ = moving_square(10, 64, 64, velocity=(0, 1))
    path = write_video(tmp_path / "v_b.avi", frames, gop_size=12, max_b_frames=2)
    with pytest.raises(ValueError, match="B-frame.*re-encode"):
        CompressedVideo(path)


def test_corrupt_files_raise_corrupt_video_error(tmp_path):
    garbage = tmp_path / "v_garbage.avi"
    garbage.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CorruptFileError, match=str(garbage)):
        CompressedVideo(garbage)
    with pytest.raises(CorruptFileError, match=str(garbage)):
        reencode_mpeg4(garbage, tmp_path / "out" / "v_garbage.avi")
    assert os.listdir(tmp_path / "out") == []

    audio = tmp_path / "v_audio.wav"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(CorruptFileError, match=f"{audio}: the file has no video stream"):
        CompressedVideo(audio)
    with pytest.raises(FileNotFoundError):
        CompressedVideo(tmp_path / "v_missing.avi")


def test_a_truncated_video_is_corrupt(rightward, tmp_path):
    """Cut short, an AVI still declares all its frames: the reader counts the packets it finds."""
    cut = tmp_path / "v_cut.avi"
    source = rightward[0].path
    cut.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match=rf"{cut.name} is truncated: its header declares \d+ frames, \d+ can be read"):
        CompressedVideo(cut)


def test_command_line_mirrors_resumes_and_reports_failures(tmp_path, capsys):
    src, dst = tmp_path / "UCF-101", tmp_path / "UCF-101-mpeg4"
    names = [
        "Archery/v_Archery_g01_c01.avi", "Archery/v_Archery_g02_c01.avi", "Bowling/v_Bowling_g01_c01.avi"
    ]
    for seed, name in enumerate(names):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        frames = moving_square(6, 48, 48, velocity=(0, 1), seed=seed)[0]
        write_video(src / name, frames, gop_size=30, max_b_frames=2)
    (src / "Bowling/v_Bowling_g02_c01.avi").write_bytes(b"not a video" * 100)

    assert main(["mpeg4", str(src), str(dst), "--workers", "2", "--gop-size", "4"]) == 1
    out = capsys.readouterr().out
    assert "4 videos" in out and "3 re-encoded, 0 skipped, 1 failed" in out
    assert "FAILED Bowling/v_Bowling_g02_c01.avi: CorruptFileError" in out
    written = sorted(str(p.relative_to(dst)) for p in dst.rglob("*"))
    assert written == ["Archery", *names[:2], "Bowling", names[2]]  # no partial files left
    for name in names:
        video = CompressedVideo(dst / name)
        assert video.num_frames == 6 and video.iframe_indices == [0, 4]

    mtimes = {name: (dst / name).stat().st_mtime_ns for name in names}
    assert main(["mpeg4", str(src), str(dst)]) == 1
    out = capsys.readouterr().out
    assert "3 already re-encoded, re-encoding 1" in out and "0 re-encoded, 3 skipped, 1 failed" in out
    assert {name: (dst / name).stat().st_mtime_ns for name in names} == mtimes

    (src / "Bowling/v_Bowling_g02_c01.avi").unlink()
    assert main(["mpeg4", str(src), str(dst)]) == 0
    assert "0 re-encoded, 3 skipped, 0 failed" in capsys.readouterr().out


def test_mv_preprocess_clamps_and_scales():
    mv = np.array([[-25.0, -10.0], [-3.0, 0.0], [4.5, 10.0], [11.0, 40.0]], np.float32)
    expected = np.array([[-1.0, -1.0], [-0.3, 0.0], [0.45, 1.0], [1.0, 1.0]], np.float32)
    out = mv_preprocess(mv)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    tensor = mv_preprocess(torch.from_numpy(mv))
    assert isinstance(tensor, torch.Tensor)
    torch.testing.assert_close(tensor, torch.from_numpy(expected))
    np.testing.assert_allclose(mv_preprocess(mv, clamp=5.0)[0], [-1.0, -1.0])


def test_flip_mirrors_without_negating_x():
    mv = np.zeros((1, 2, 3, 2), np.float32)  # [T, H, W, 2]
    mv[0, 0, 0] = (3.0, -1.0)  # top-left pixel moves right and up
    mv[0, 1, 2] = (-2.0, 5.0)
    flipped = flip_motion_vectors(mv)
    expected = np.zeros_like(mv)
    expected[0, 0, 2] = (3.0, -1.0)  # now top-right, x-component unchanged (CMD's code)
    expected[0, 1, 0] = (-2.0, 5.0)
    np.testing.assert_array_equal(flipped, expected)
    assert flipped.flags.c_contiguous
    torch.testing.assert_close(flip_motion_vectors(torch.from_numpy(mv)), torch.from_numpy(expected))
    np.testing.assert_array_equal(flip_motion_vectors(flipped), mv)
    with pytest.raises(ValueError, match=r"\[\.\.\., H, W, 2\]"):
        flip_motion_vectors(np.zeros((2, 4, 4), np.float32))
