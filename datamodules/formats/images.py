"""Image and mask readers that decode fully and name the file when it is corrupt, and the
JPEG encoding/decoding of in-memory images (RecordIO payloads, verification ``.bin`` pairs)."""

import io
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike

import numpy as np
from PIL import Image

# What PIL raises for undecodable bytes: UnidentifiedImageError and truncation are OSErrors,
# broken PNG chunks are SyntaxErrors, some plugins raise ValueError or EOFError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


class CorruptFileError(ValueError):
    """A file exists but cannot be decoded (an image or a video); the message names the file."""


@contextmanager
def _open(source: str | PathLike[str] | io.BytesIO, name: object = None) -> Iterator[Image.Image]:
    """``Image.open`` that turns decoding errors (but not a missing file) into CorruptFileError
    naming ``name`` (default: the path)."""
    try:
        with Image.open(source) as image:
            yield image
    except FileNotFoundError:
        raise
    except _DECODE_ERRORS as error:
        raise CorruptFileError(
            f"cannot decode image {source if name is None else name}: {error}; expected a PNG/JPEG file"
        ) from error


def read_image(path: str | PathLike[str]) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB; grayscale, palette and RGBA become RGB."""
    with _open(path) as image:
        image.load()
        return np.asarray(image.convert("RGB"))


def read_mask(path: str | PathLike[str]) -> np.ndarray:
    """Read a mask as (H, W) bool, positive where the value is > 0 (MVTec AD protocol)."""
    with _open(path) as image:
        image.load()
        return np.asarray(image.convert("L")) > 0


def read_size(path: str | PathLike[str]) -> tuple[int, int]:
    """(height, width) of an image from its header, without decoding the pixels."""
    with _open(path) as image:
        return image.height, image.width


def decode_image(payload: bytes, name: str = "image") -> np.ndarray:
    """Decode JPEG/PNG bytes to (H, W, 3) uint8 RGB with PIL. insightface encodes cv2's BGR arrays,
    which gives standard JPEGs, so PIL's RGB is right (``cv2.imdecode`` would give BGR)."""
    with _open(io.BytesIO(payload), name) as image:
        return np.asarray(image.convert("RGB"))


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of an (H, W, 3) uint8 RGB array."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image; got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
