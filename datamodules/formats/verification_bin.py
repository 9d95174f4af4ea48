"""Face verification pair sets in insightface's ``.bin`` format (LFW, CFP-FP, AgeDB-30, ...).

Layout (benchmarks.md §3.2; insightface ``arcface_torch/eval/verification.py::load_bin``): a pickle
of ``(bins, issame_list)``, where ``bins`` holds 2P encoded JPEG images, as ``bytes`` or as uint8
``np.ndarray`` (files built with ``cv2.imencode``), and ``issame_list`` P bools; pair i is
``bins[2i], bins[2i + 1]``. Files from Python 2 need ``pickle.load(..., encoding="bytes")``.

A pickle can run code when loaded, so these files are read with an unpickler that resolves only
the few globals real ``.bin`` files refer to (numpy arrays and scalars, ``_codecs.encode`` for
bytes pickled by Python 3 at protocol 2, ``bytearray``); any other global is an error naming the
file and the global, before anything of it runs.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from os import PathLike

import numpy as np

from datamodules.formats.images import decode_image, encode_jpeg


class VerificationBinError(ValueError):
    """A verification ``.bin`` file is not a pickle of (2P encoded images, P bools)."""


ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"), ("builtins", "bytearray"), ("__builtin__", "bytearray"),
})


class _ForbiddenGlobal(Exception):
    pass


class _PairSetUnpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED_GLOBALS` (module docstring)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in ALLOWED_GLOBALS:
            raise _ForbiddenGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def read_verification_bin(path: str | PathLike[str]) -> tuple[list[np.ndarray], np.ndarray]:
    """The 2P images as (H, W, 3) uint8 RGB arrays, and ``issame`` as a bool array [P]."""
    with open(path, "rb") as file:
        try:
            content = _PairSetUnpickler(file, encoding="bytes").load()
        except _ForbiddenGlobal as error:
            raise VerificationBinError(
                f"{path} refers to {error}, which a verification .bin never holds (only encoded images and bools): "
                "not loaded, since unpickling it could run code"
            ) from None
        except Exception as error:  # unpickling garbage raises almost any exception type
            raise VerificationBinError(f"{path} is not a readable pickle: {error!r}") from error
    if not isinstance(content, (tuple, list)) or len(content) != 2:
        raise VerificationBinError(f"{path}: expected a pickled (bins, issame_list) pair")
    bins, issame = content
    if len(bins) % 2:
        raise VerificationBinError(f"{path} holds an odd number of images ({len(bins)}); pairs need 2P")
    if len(issame) != len(bins) // 2:
        raise VerificationBinError(
            f"{path} holds {len(bins)} images, i.e. {len(bins) // 2} pairs, but {len(issame)} issame labels"
        )
    images = []
    for i, entry in enumerate(bins):
        if isinstance(entry, np.ndarray) and entry.dtype == np.uint8:
            entry = entry.tobytes()
        if not isinstance(entry, bytes):
            raise VerificationBinError(
                f"{path}: image {i} is a {type(entry).__name__}; expected encoded bytes or a uint8 array"
            )
        images.append(decode_image(entry, name=f"image {i} of {path}"))
    return images, np.array([bool(same) for same in issame], dtype=bool)


def write_verification_bin(
    path: str | PathLike[str], pairs: Sequence[tuple[np.ndarray, np.ndarray]], issame: Sequence[bool]
) -> None:
    """Write (H, W, 3) uint8 RGB image pairs and their labels as a ``.bin`` (JPEG, pickle protocol 4)."""
    if len(pairs) != len(issame):
        raise ValueError(f"got {len(pairs)} pairs but {len(issame)} issame labels")
    bins = [encode_jpeg(image) for pair in pairs for image in pair]
    with open(path, "wb") as file:
        pickle.dump((bins, [bool(same) for same in issame]), file, protocol=4)
