"""Image and mask readers that decode fully and name the file when it is corrupt."""

from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike

import numpy as np
from PIL import Image

# What PIL raises for undecodable bytes: UnidentifiedImageError and truncation are OSErrors,
# broken PNG chunks are SyntaxErrors, some plugins raise ValueError or EOFError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


class CorruptFileError(ValueError):
    """A file exists but cannot be decoded as an image."""


@contextmanager
def _open(path: str | PathLike[str]) -> Iterator[Image.Image]:
    """``Image.open`` that turns decoding errors (but not a missing file) into CorruptFileError."""
    try:
        with Image.open(path) as image:
            yield image
    except FileNotFoundError:
        raise
    except _DECODE_ERRORS as error:
        raise CorruptFileError(
            f"cannot decode image {path}: {error}; expected a PNG/JPEG file"
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
