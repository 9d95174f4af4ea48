"""The dense CRF that HCPN and HGPU apply to their masks before scoring (the authors'
``apply_densecrf_davis.py``, identical in both repositories), on Krähenbühl and Koltun's fully
connected CRF (``pydensecrf``, from the ``pydensecrf2`` package).

1. The probability map is rescaled so that its maximum is 1 and quantised to 8 bits, as the
   authors' script reads their saved PNGs.
2. Energies with temperature τ = 1.05: E_fg = −log(1 − p + ε) / (τ·σ(1 − p)) and
   E_bg = −log(p + ε) / (τ·σ(p)), ε = 1e-8; the unary of each label is −log(clip(E, 1e-5, 1)),
   as the script hands the energies to ``unary_from_softmax``.
3. A Gaussian kernel (sxy 1, compat 3) and a bilateral kernel (sxy 30, srgb 5, compat 3), both
   diagonal with symmetric normalisation; up to 5 mean-field steps, stopping once the KL
   divergence changes by less than 500; the mask is the arg max.
"""

from __future__ import annotations

import numpy as np

TAU, EPSILON = 1.05, 1e-8


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def dense_crf(frame: np.ndarray, probability: np.ndarray, steps: int = 5) -> np.ndarray:
    """The binary mask [H, W] uint8 of an RGB uint8 ``frame`` [H, W, 3] and its foreground
    ``probability`` [H, W] (module docstring)."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import create_pairwise_bilateral, create_pairwise_gaussian, unary_from_softmax
    except ImportError as error:
        raise ImportError("model.crf needs pydensecrf: pip install pydensecrf2 (make install does it), or set "
                          "--model.init_args.crf false for the CRF-free evaluation") from error
    height, width = probability.shape
    peak = float(probability.max())
    p = np.uint8(probability / peak * 255.0) / 255.0 if peak > 0 else np.zeros_like(probability, dtype=np.float64)
    energies = np.stack([-np.log(p + EPSILON) / (TAU * _sigmoid(p)), -np.log(1.0 - p + EPSILON) / (TAU * _sigmoid(1.0 - p))])
    crf = dcrf.DenseCRF(height * width, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(energies, scale=1)))
    crf.addPairwiseEnergy(create_pairwise_gaussian(sdims=(1, 1), shape=(height, width)), compat=3,
                          kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
    crf.addPairwiseEnergy(create_pairwise_bilateral(sdims=(30, 30), schan=(5, 5, 5), img=np.ascontiguousarray(frame), chdim=2),
                          compat=3, kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
    q, scratch1, scratch2 = crf.startInference()
    for _ in range(steps):
        before = crf.klDivergence(q)
        crf.stepInference(q, scratch1, scratch2)
        if abs(crf.klDivergence(q) - before) < 500:
            break
    return np.argmax(np.array(q), axis=0).reshape(height, width).astype(np.uint8)
