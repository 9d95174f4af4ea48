"""A mini ADBench feature file: ``<out>/CV_by_ResNet18/MVTec-AD_<category>.npz`` with ``X``
[N, D] and ``y`` [N] (1: anomalous), the layout of ADBench's pre-extracted MVTec AD features.

The mini MVTec images give no usable features here: without network access there are no
ImageNet weights, and a randomly initialised ResNet's features of them barely separate the
defects (a logistic regression trained on all labels reaches 0.5-0.8 AUROC depending on the
split). These vectors stand in for a pretrained CNN's: normal samples lie on a random
low-dimensional manifold (``relu(z·A)`` plus noise, z ~ N(0, I)), and each of ``defect_types``
kinds of anomaly moves z along its own direction, as defects of one kind move a pretrained
feature; so the labelled anomalies of one split tell a detector about those of the other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_adbench(out: str | Path, category: str = "weave", seed: int = 0, normals: int = 700, anomalies: int = 210,
                  dim: int = 64, latent: int = 16, defect_types: int = 3, shift: float = 6.0) -> Path:
    """Write the feature file under ``out`` and return its path; the same arguments give the same file."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(latent, dim)) / np.sqrt(latent)
    directions = rng.normal(size=(defect_types, latent))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    z = rng.normal(size=(normals + anomalies, latent))
    kinds = rng.integers(defect_types, size=anomalies)
    z[normals:] += shift * directions[kinds] * rng.uniform(0.7, 1.3, size=(anomalies, 1))
    features = np.maximum(z @ mixing, 0.0) + 0.05 * rng.normal(size=(normals + anomalies, dim))
    labels = np.r_[np.zeros(normals, np.int64), np.ones(anomalies, np.int64)]
    order = rng.permutation(len(labels))
    path = Path(out) / "CV_by_ResNet18" / f"MVTec-AD_{category}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, X=features[order].astype(np.float32), y=labels[order])
    return path
