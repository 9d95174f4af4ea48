"""AdvBCT: adversarial backward-compatible training with an elastic boundary (Pan et al., CVPR
2023, arXiv 2305.02610; Ashespt/AdvBCT; method card 8 of ``face_and_retrieval.md``). Plain torch
parts in :mod:`lightning_modules.nn.compatibility`.

1. Offline (``extract_feat.py``): the frozen old model (``old_checkpoint``) embeds the *old*
   training set (the old run's training list, rebuilt from the old checkpoint's DataModule
   settings over this run's root); per old class, the raw mean μ_c of the L2-normalised features
   and the largest radius r_c after the 1.5·IQR filter. Cached in the run directory
   (``advbct_class_statistics.pt``).
2. Classification: the new model's margin softmax, L_cls.
3. Adversarial alignment: a discriminator (Linear → BN → ReLU → Linear(2)) tells old embeddings
   (class 1) from new ones (class 0), both the BatchNorm outputs before normalisation; the new
   ones pass a gradient-reversal layer with α = 2/(1 + e^(−10p)) − 1, p the training progress.
   L_adv = NLL(D(GRL(φ_n)), 0) + NLL(D(φ_o), 1), weighted w_e = (E − e + 1)/E at epoch e of E.
4. Elastic boundary (``elastic_boundary``): a learnable scalar per new class moves the radius
   from r_c toward T = ``threshold`` by the fraction σ(w_c). L_comp averages
   max(‖normalize(φ_n(x)) − μ_y‖ − r̃_y, 0) over the violating samples of the classes the old
   model knows (with more than one radius kept).
5. L = L_cls + L_comp + w_e·L_adv.

Recipe (``configs/gldv2/advbct_r18.yaml``, ``new_AdvBct.yml``): ResNet-18, 256-d embedding,
SGD 0.1, momentum 0.9, weight decay 5e-4, ×0.1 at epochs 5, 10, 20, 30 epochs, batch 256, T = 1.

Deviations from the authors' code: the offline pass uses the test-time transform (the authors'
reuses their training loader); the embedding is :class:`LandmarkRetrieval`'s (GeM, whitening FC
with bias, BatchNorm) where the authors' has global average pooling and a bias-free FC; the
classifier is the margin head (the code's ``arcface`` option) where the config uses a plain
softmax.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.distributed.comm import all_gather_objects
from lightning_modules.nn.compatibility import (ElasticBoundary, GradientReversal, ModelDiscriminator, boundary_loss,
                                                class_statistics, reversal_coefficient)
from lightning_modules.retrieval.model import DATAMODULE_STATE, LandmarkRetrieval, old_landmark_ids, rank_share

log = logging.getLogger(__name__)

STATISTICS = "advbct_class_statistics.pt"


class AdversarialBackwardCompatibleTraining(LandmarkRetrieval):
    """AdvBCT (module docstring). Takes :class:`LandmarkRetrieval`'s arguments; ``old_checkpoint``
    is required; ``threshold`` T, ``elastic_boundary``, ``discriminator_width`` (100)."""

    method_name = "advbct"

    def __init__(self, *args: Any, threshold: float = 1.0, elastic_boundary: bool = True, discriminator_width: int = 100,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.old_model is None:
            raise ValueError("AdvBCT needs model.init_args.old_checkpoint: the last.ckpt of the old model's run")
        self.elastic_boundary = elastic_boundary
        self.discriminator = ModelDiscriminator(self.hparams.embedding_size, discriminator_width)
        self.reversal = GradientReversal()
        self.boundary = ElasticBoundary(self.hparams.num_classes or 0, threshold)
        self.centres: Tensor | None = None  # per new class, set at fit start
        self.radii: Tensor | None = None
        self.constrained: Tensor | None = None

    # ------------------------------------------------------------------- class statistics

    def on_fit_start(self) -> None:
        centres, radii, constrained = self.class_statistics()
        self.centres, self.radii, self.constrained = (x.to(self.device) for x in (centres, radii, constrained))

    def old_training_samples(self) -> list[tuple[Path, int]]:
        """The old run's training images and their old classes: its training list rebuilt from
        the old checkpoint's DataModule settings over this run's data root."""
        datamodule = self.trainer.datamodule
        settings = dict(self.old_checkpoint.get("datamodule_hyper_parameters") or {})
        if "class_fraction" not in settings:
            raise ValueError("the old checkpoint does not record its GLDv2DataModule settings; AdvBCT needs them to rebuild "
                             "the old training set")
        accepted = inspect.signature(type(datamodule).__init__).parameters
        settings = {k: v for k, v in settings.items() if k in accepted}
        settings.update(root=str(datamodule.root), skip_missing=True, num_workers=datamodule.num_workers)
        old_data = type(datamodule)(**settings)
        if old_data.landmark_ids != old_landmark_ids(self.old_checkpoint):
            raise ValueError(f"the old training list rebuilt under {datamodule.root} has other landmarks than the old "
                             f"checkpoint's {DATAMODULE_STATE} state: is it the same data root?")
        return old_data._training_images().samples

    @torch.no_grad()
    def class_statistics(self) -> tuple[Tensor, Tensor, Tensor]:
        """(μ [C_new, D], r [C_new], constrained [C_new] bool) laid over the new classes by
        landmark id (module docstring, 1); each rank embeds a share, the statistics from all."""
        cache = Path(self.trainer.default_root_dir) / STATISTICS
        if cache.is_file():
            cached = torch.load(cache, weights_only=True)
            return cached["centres"], cached["radii"], cached["constrained"]
        samples = self.old_training_samples()
        datamodule = self.trainer.datamodule
        mine, loader = rank_share(datamodule, samples, range(len(samples)))
        features = torch.cat([self.old_model.embed(batch["image"].to(self.device)).float().cpu() for batch in loader])
        parts = all_gather_objects((mine, features))
        order = torch.tensor([i for indices, _ in parts for i in indices])
        gathered = torch.cat([f for _, f in parts])[order.argsort()]
        old_ids = old_landmark_ids(self.old_checkpoint)
        centres, radii, counts = class_statistics(gathered, torch.tensor([label for _, label in samples]), len(old_ids))
        old_class = {landmark: c for c, landmark in enumerate(old_ids)}
        new_ids = datamodule.landmark_ids
        mapped = torch.tensor([old_class.get(landmark, -1) for landmark in new_ids])
        known = mapped >= 0
        new_centres = torch.zeros(len(new_ids), centres.shape[1])
        new_radii = torch.zeros(len(new_ids))
        new_centres[known], new_radii[known] = centres[mapped[known]], radii[mapped[known]]
        constrained = known.clone()
        constrained[known] = counts[mapped[known]] > 1
        if self.trainer.is_global_zero:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"centres": new_centres, "radii": new_radii, "constrained": constrained}, cache)
        log.info("AdvBCT: statistics of %d old classes from %d old training images; %d of the %d new classes constrained",
                 len(old_ids), len(samples), int(constrained.sum()), len(new_ids))
        return new_centres, new_radii, constrained

    # ------------------------------------------------------------------------------ training

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, labels = batch["image"], batch["label"]
        raw = self.embedding.features(images)
        new = F.normalize(raw, dim=1)
        with torch.no_grad():
            old_raw = self.old_model.embedding.features(images).float()
        loss_cls = self.softmax(new, labels)
        progress = self.trainer.global_step / max(self.trainer.estimated_stepping_batches, 1)
        zeros = torch.zeros(len(images), dtype=torch.long, device=images.device)
        loss_adv = (F.nll_loss(self.discriminator(self.reversal(raw, reversal_coefficient(progress))), zeros)
                    + F.nll_loss(self.discriminator(old_raw), zeros + 1))
        epochs = max(self.trainer.max_epochs or 1, 1)
        adversarial_weight = (epochs - self.current_epoch + 1) / epochs
        constrained = self.constrained[labels]
        radii = self.boundary(self.radii, labels) if self.elastic_boundary else self.radii[labels]
        loss_comp = boundary_loss(new[constrained], self.centres[labels[constrained]], radii[constrained])
        loss = loss_cls + loss_comp + adversarial_weight * loss_adv
        size = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({"train/loss_cls": loss_cls, "train/loss_boundary": loss_comp, "train/loss_adversarial": loss_adv,
                       "train/adversarial_weight": adversarial_weight}, batch_size=size)
        return loss
