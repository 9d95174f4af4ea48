"""MVTec AD as ADBench poses it for semi-supervised detectors (Han et al., "ADBench", NeurIPS 2022;
the protocol of AnoOnly's ``data_generator.py``): one feature vector per image, image labels only.

1. **Features.** Every image of a category (``train/good`` and all of ``test/``) is embedded by a
   frozen ImageNet CNN (ADBench's ``CV_by_ResNet18``: ResNet-18, the 512-d global average pool),
   once: the features are cached in ``cache_dir`` (default ``<root>/.visionzoo_cache``) and
   read back while the images and the backbone are unchanged. UNVERIFIED: ADBench's image
   preprocessing; here a 224-pixel resize (PIL bilinear) and ImageNet normalisation. ADBench's
   own ``MVTec-AD_<category>.npz`` (keys ``X``, ``y``) is read instead with ``npz`` (a path,
   relative ones from ``root``).
2. **Sizes.** A category with fewer than ``min_samples`` (1000) images is resampled with
   replacement to that many, one with more than ``max_samples`` (10000) subsampled, both before
   the split (so copies of one image can land in both splits, as in ADBench).
3. **Split.** Stratified, ``test_fraction`` (0.3) to test, by ``split_seed`` (42); MinMax scaling
   fitted on the training part.
4. **Labels.** ⌈``labelled_fraction`` (0.1) × training anomalies⌉ anomalies keep their label
   (``at_least_one_labeled``); the other training anomalies join the unlabelled pool with the
   normal images (label 0).
5. **Batches.** Each training batch holds ``anomalies_per_batch`` labelled anomalies and
   ``unlabelled_per_batch`` unlabelled samples, both drawn without repeats until their pool is
   used up (the authors' ``BalancedBatchSampler``), ``batches_per_epoch`` (20) a epoch; so no
   batch lacks an anomaly. Under DDP each rank draws its own such batches. Test batches are the
   test split in order.

Training items are ``{"features", "label"}``; test items add the image's true label (1 for a
defect) as ``label`` and its ``path``. The model's ``in_features`` is linked from
:attr:`MVTecADBenchDataModule.in_features`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import MinMaxScaler
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, IterableDataset

from datamodules.base import EvalSet, VisionZooDataModule
from datamodules.formats.images import read_image
from datamodules.mvtec import scan_category
from datamodules.resumable import eval_loader


class FeatureRows(Dataset):
    """Rows of a feature matrix with their labels (and, for test rows, their image paths)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, paths: list[str] | None = None) -> None:
        self.features = torch.from_numpy(features.astype(np.float32))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.paths = paths

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"features": self.features[index], "label": self.labels[index]}
        return item if self.paths is None else {**item, "path": self.paths[index]}

    def item_name(self, index: int) -> str:
        return self.paths[index] if self.paths is not None else f"row {index}"


def process_rank() -> int:
    """This process's rank (0 without a process group)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class BalancedBatches(IterableDataset):
    """``batches`` training batches a epoch of ``anomalies`` rows of label 1 and ``unlabelled`` rows
    of label 0, each pool walked in a fresh random order and restarted when used up, so a small
    pool repeats within a batch only when it is smaller than the batch. The order is a function
    of ``seed``, the epoch (``epoch()``, the trainer's) and the rank: under DDP each rank draws its
    own batches (an iterable dataset, so that Lightning injects no distributed sampler)."""

    def __init__(self, rows: FeatureRows, anomalies: int, unlabelled: int, batches: int, seed: int,
                 epoch: Callable[[], int]) -> None:
        self.rows = rows
        self.pools = [torch.nonzero(rows.labels == 0).squeeze(1), torch.nonzero(rows.labels == 1).squeeze(1)]
        if not len(self.pools[1]) or not len(self.pools[0]):
            raise ValueError("balanced batches need labelled anomalies and unlabelled samples; the training split has "
                             f"{len(self.pools[1])} and {len(self.pools[0])}")
        self.counts = (unlabelled, anomalies)
        self.batches = batches
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    @staticmethod
    def _stream(pool: torch.Tensor, generator: torch.Generator) -> Iterator[int]:
        while True:
            yield from pool[torch.randperm(len(pool), generator=generator)].tolist()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch()) * 1009 + process_rank()) % 2**63)
        streams = [self._stream(pool, generator) for pool in self.pools]
        for _ in range(self.batches):
            index = [next(streams[0]) for _ in range(self.counts[0])] + [next(streams[1]) for _ in range(self.counts[1])]
            yield {"features": self.rows.features[index], "label": self.rows.labels[index]}


class MVTecADBenchDataModule(VisionZooDataModule):
    """One MVTec AD category under ADBench's semi-supervised protocol (module docstring)."""

    benchmark = "mvtec_adbench"

    def __init__(
        self,
        root: str,
        category: str = "bottle",
        npz: Optional[str] = None,
        backbone: str = "resnet18.tv_in1k",
        pretrained: bool = True,
        weights: Optional[str] = None,
        image_size: int = 224,
        cache_dir: Optional[str] = None,
        split_seed: int = 42,
        test_fraction: float = 0.3,
        labelled_fraction: float = 0.1,
        min_samples: int = 1000,
        max_samples: int = 10000,
        minmax: bool = True,
        anomalies_per_batch: int = 64,
        unlabelled_per_batch: int = 64,
        batches_per_epoch: int = 20,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        problems = []
        if not 0 < test_fraction < 1 or not 0 < labelled_fraction <= 1:
            problems.append(f"test_fraction must be in (0, 1) and labelled_fraction in (0, 1], got {test_fraction} "
                            f"and {labelled_fraction}")
        if anomalies_per_batch < 1 or unlabelled_per_batch < 0 or batches_per_epoch < 1:
            problems.append(f"anomalies_per_batch and batches_per_epoch must be >= 1 and unlabelled_per_batch >= 0, got "
                            f"{anomalies_per_batch}, {batches_per_epoch} and {unlabelled_per_batch}")
        if problems:
            raise ValueError("data.init_args: " + "; ".join(problems))
        self.save_hyperparameters()
        self.root = Path(root)
        self.category = category
        self.npz = None if npz is None else Path(npz) if Path(npz).is_absolute() else self.root / npz
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.root / ".visionzoo_cache"
        self.train_rows: FeatureRows | None = None
        self.test_rows: FeatureRows | None = None

    @property
    def run_name(self) -> str:
        return self.category

    @property
    def num_skipped(self) -> int:
        return 0

    def describe(self) -> dict[str, Any]:
        hp = self.hparams
        return {"root": str(self.root.resolve()), "category": self.category,
                "features": str(self.npz) if self.npz is not None else f"{hp.backbone} at {hp.image_size} px",
                "protocol": f"ADBench: stratified {1 - hp.test_fraction:g}/{hp.test_fraction:g} split by seed {hp.split_seed}, "
                            f"{hp.labelled_fraction:g} of the training anomalies labelled", "split": "test"}

    def eval_set_names(self, stage: Literal["val", "test"]) -> list[str]:
        return [] if stage == "val" else ["test"]

    @property
    def in_features(self) -> int:
        """The feature dimension, without extracting features (linked to the model's ``in_features``)."""
        if self.npz is not None:
            with np.load(self._checked_npz(), mmap_mode="r") as data:
                return int(data["X"].shape[1])
        import timm

        return int(timm.create_model(self.hparams.backbone, pretrained=False, num_classes=0).num_features)

    # ------------------------------------------------------------------------------- features

    def _checked_npz(self) -> Path:
        if not self.npz.is_file():
            raise FileNotFoundError(f"data.npz: {self.npz} does not exist (ADBench's CV_by_ResNet18/MVTec-AD_<category>.npz)")
        return self.npz

    def features(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Features X [N, D], labels y [N] (1: a defect) and image paths of the whole category."""
        if self.npz is not None:
            with np.load(self._checked_npz()) as data:
                if "X" not in data or "y" not in data:
                    raise ValueError(f"{self.npz}: an ADBench file needs the arrays X and y, found {sorted(data)}")
                x, y = np.asarray(data["X"], np.float32), np.asarray(data["y"]).astype(np.int64)
            if x.ndim != 2 or y.shape != (len(x),) or not np.isin(y, (0, 1)).all():
                raise ValueError(f"{self.npz}: X must be [N, D] and y [N] of 0/1, got {x.shape} and {y.shape}")
            return x, y, [f"{self.npz}#{i}" for i in range(len(y))]
        train, test = scan_category(self.root, self.category)
        samples = train + test
        paths = [str(s.image) for s in samples]
        labels = np.array([s.label for s in samples], np.int64)
        cache = self.cache_dir / f"{self.category}_{self.hparams.backbone}_{self.hparams.image_size}.npz"
        key = self._cache_key(paths)
        if cache.is_file():
            with np.load(cache) as cached:
                if str(cached["key"]) == key:
                    return cached["X"], labels, paths
        features = self._extract(paths)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(".partial.npz")
            np.savez(partial, X=features, key=np.array(key))
            partial.replace(cache)
        except OSError as error:
            raise OSError(f"cannot write the feature cache {cache} ({error}): give a writable data.cache_dir") from error
        return features, labels, paths

    def _cache_key(self, paths: list[str]) -> str:
        """Changes when an image, the backbone or its weights change."""
        hp = self.hparams
        state = [hp.backbone, hp.pretrained, hp.weights, hp.image_size,
                 *[(p, Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in paths]]
        if hp.weights:
            state.append(Path(hp.weights).stat().st_mtime_ns)
        return hashlib.sha256(json.dumps(state, default=str).encode()).hexdigest()

    @torch.no_grad()
    def _extract(self, paths: list[str]) -> np.ndarray:
        from lightning_modules.nn.backbones import create_backbone

        hp = self.hparams
        backbone = create_backbone(hp.backbone, hp.pretrained, hp.weights, num_classes=0).eval()
        mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None], torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
        rows = []
        for start in range(0, len(paths), 32):
            images = [Image.fromarray(read_image(p)).resize((hp.image_size, hp.image_size), Image.Resampling.BILINEAR)
                      for p in paths[start : start + 32]]
            batch = torch.stack([torch.from_numpy(np.asarray(i)).permute(2, 0, 1).float() / 255 for i in images])
            rows.append(backbone((batch - mean) / std).float().numpy())
        return np.concatenate(rows)

    # ------------------------------------------------------------------------------ protocol

    def setup(self, stage: Optional[str] = None) -> None:
        hp = self.hparams
        x, y, paths = self.features()
        if y.sum() < 2 or (y == 0).sum() < 2:
            raise ValueError(f"MVTec category {self.category!r}: ADBench's split needs at least two normal and two "
                             f"anomalous images, found {int((y == 0).sum())} and {int(y.sum())}")
        # One legacy stream seeded once, drawn in ADBench's order (resample, split, labelled
        # anomalies): the draws of its global np.random after set_seed(seed), for the same X.
        stream = np.random.RandomState(hp.split_seed)
        index = np.arange(len(y))
        if len(y) < hp.min_samples:
            index = stream.choice(index, hp.min_samples, replace=True)
        elif len(y) > hp.max_samples:
            index = stream.choice(index, hp.max_samples, replace=False)
        train, test = train_test_split(index, test_size=hp.test_fraction, shuffle=True, stratify=y[index],
                                       random_state=stream)
        x_train, x_test = x[train], x[test]
        if hp.minmax:
            scaler = MinMaxScaler().fit(x_train)
            x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
        anomalies = np.nonzero(y[train] == 1)[0]
        labelled = stream.choice(anomalies, math.ceil(hp.labelled_fraction * len(anomalies)), replace=False)
        semi_labels = np.zeros(len(train), np.int64)
        semi_labels[labelled] = 1
        self.train_rows = FeatureRows(x_train, semi_labels)
        self.test_rows = FeatureRows(x_test, y[test], [paths[i] for i in test])

    def training_set(self) -> FeatureRows:
        """The training rows (semi-supervised labels); PReNet scores test samples against them."""
        if self.train_rows is None:
            self.setup("fit")
        return self.train_rows

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        batches = BalancedBatches(self.training_set(), hp.anomalies_per_batch, hp.unlabelled_per_batch,
                                  hp.batches_per_epoch, torch.initial_seed(), self._epoch)
        return DataLoader(batches, batch_size=None)

    def val_dataloader(self) -> list:
        return []

    def test_dataloader(self) -> DataLoader:
        return eval_loader(EvalSet("test", self.test_rows), batch_size=self.hparams.batch_size, num_workers=0)
