"""AnoOnly: semi-supervised anomaly detection with the loss on the labelled anomalies only (Zhou,
Xu, Song, Shen, Shen, "AnoOnly: Semi-Supervised Anomaly Detection with the Only Loss on
Anomalies", arXiv 2305.18798; the authors' code cool-xuan/AnoOnly; method card §11).

With a few labelled anomalies and many unlabelled, mostly normal samples, a strict loss on the
dominant normal data biases a detector. AnoOnly, a plug-in for existing detectors:

1. A batch holds labelled anomalies and unlabelled samples together
   (:class:`datamodules.mvtec_adbench.BalancedBatches`: no batch lacks an anomaly).
2. The whole batch goes through the detector in one forward, so that its BatchNorm statistics
   come from normal and anomalous samples together: the only, weak, supervision the normal data
   get (BatchNorm is added to DevNet and PReNet for it).
3. The loss is the detector's loss on the labelled anomalies only
   (:mod:`lightning_modules.nn.semi_supervised_ad`; ``anomaly_only: false`` gives the detector's
   original loss, the paper's baseline).
4. At test time BatchNorm uses its running statistics (normal-dominated) and the detector's
   score ranks the test images: image AUROC per category (``image_auroc``); the leaderboard
   averages the categories.

Detectors (``detector``) and their recipes, the authors' ``baselines/`` (each config names its own):
DeepSAD, Adam lr 1e-3 weight decay 1e-6, 50 epochs, balanced batches of 128; DevNet, RMSprop lr
2e-4 (Keras' ρ 0.9), 50 epochs of 20 batches of 64 half anomalies; PReNet, RMSprop lr 1e-3 weight
decay 1e-2 with a cosine to 1e-5 by epoch, 50 epochs of 20 batches of 512 pairs; FEAWAD, Adam lr
1e-4, its autoencoder first for 100 epochs on the unlabelled samples, then 30 epochs end to end,
20 batches of 512 a epoch, half anomalies.

Deviations from the authors' code:

- FEAWAD's autoencoder trains on the unlabelled half of each balanced batch (the code draws
  batches of unlabelled samples only), and one Adam carries its state from the autoencoder's
  epochs into the end-to-end ones (the code compiles a fresh one).
- DevNet's layers keep PyTorch's initialisation (Keras: Glorot uniform, zero biases).
- DeepSAD's centre c is the mean code of the whole training split, not of the batches its
  sampler draws first; DevNet and FEAWAD keep their last weights, where the Keras code restores
  those of the epoch with the lowest training loss; RMSprop's ε is torch's 1e-8 (Keras: 1e-7).
- PReNet draws its test-time reference pairs from a generator seeded by ``seed``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from benchmarks.metrics.base import BenchmarkMetric
from benchmarks.metrics.mvtec import ImageAUROC
from lightning_modules.base import EvaluatedModule, Stage
from lightning_modules.nn.semi_supervised_ad import FEAWAD, DeepSAD, DevNet, PReNet
from lightning_modules.recipe import OptimizerRecipe

Detector = Literal["deepsad", "devnet", "prenet", "feawad"]


class AnoOnly(EvaluatedModule):
    """A semi-supervised detector trained with AnoOnly's loss, or its own (module docstring).

    ``in_features``: the feature dimension (linked from the data). ``detector``: ``deepsad``,
    ``devnet``, ``prenet`` or ``feawad``. ``anomaly_only``: AnoOnly's loss (default) or the
    detector's. ``reference_draws``: PReNet's test-time pairs per side (the authors' 30).
    ``autoencoder_epochs``: FEAWAD's autoencoder pretraining, the first epochs of the run.
    """

    def __init__(
        self,
        in_features: int,
        detector: Detector = "deepsad",
        anomaly_only: bool = True,
        reference_draws: int = 30,
        autoencoder_epochs: int = 100,
        optim: OptimizerRecipe = OptimizerRecipe(lr=1e-3, optimizer="adam", weight_decay=1e-6, schedule="constant"),
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        networks = {"deepsad": DeepSAD, "devnet": DevNet, "prenet": PReNet, "feawad": FEAWAD}
        if detector not in networks:
            raise ValueError(f"model.detector must be one of {sorted(networks)}, got {detector!r}")
        self.detector = networks[detector](in_features)
        self._references: tuple[Tensor, Tensor] | None = None  # PReNet's training anomalies and unlabelled rows
        self._generator = torch.Generator().manual_seed(seed)  # PReNet's test-time reference draws

    @property
    def method_name(self) -> str:
        return f"anoonly_{self.hparams.detector}" if self.hparams.anomaly_only else self.hparams.detector

    def on_fit_start(self) -> None:
        """DeepSAD's centre c: the mean code of the training split before training."""
        if isinstance(self.detector, DeepSAD) and self.trainer.ckpt_path is None:
            rows = self.trainer.datamodule.training_set()
            self.detector.set_center(rows.features.to(self.device))

    def pretraining_autoencoder(self) -> bool:
        """Whether this epoch belongs to FEAWAD's autoencoder pretraining."""
        return isinstance(self.detector, FEAWAD) and self.current_epoch < self.hparams.autoencoder_epochs

    def on_train_epoch_start(self) -> None:
        if isinstance(self.detector, FEAWAD) and self.current_epoch == self.hparams.autoencoder_epochs > 0:
            rank_zero_info(f"FEAWAD: autoencoder pretrained for {self.current_epoch} epochs; end-to-end training starts")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.pretraining_autoencoder():
            loss = self.detector.reconstruction_loss(batch["features"][batch["label"] == 0])
            self.log("train/reconstruction_loss", loss, prog_bar=True, batch_size=len(batch["label"]))
            return loss
        loss = self.detector.loss(batch["features"], batch["label"], self.hparams.anomaly_only)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    # ----------------------------------------------------------------------------- evaluation

    def evaluation_metrics(self, stage: Stage) -> list[BenchmarkMetric]:
        return [ImageAUROC()] if stage == "test" else []

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        if isinstance(self.detector, PReNet):
            rows = self.trainer.datamodule.training_set()
            self._references = (rows.features[rows.labels == 1].to(self.device), rows.features[rows.labels == 0].to(self.device))
            self._generator = torch.Generator().manual_seed(self.hparams.seed)

    def anomaly_scores(self, features: Tensor) -> Tensor:
        if isinstance(self.detector, PReNet):
            anomalies, unlabelled = self._references
            return self.detector.score(features, anomalies, unlabelled, self.hparams.reference_draws, self._generator)
        return self.detector.score(features)

    def evaluation_outputs(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return {"image_score": self.anomaly_scores(batch["features"])}
