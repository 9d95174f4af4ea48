"""CSTP: Contrastive Spatio-Temporal Pretext learning (Zhang, Po, Xu, Liu, Wang, Ou, Zhao, Yu,
"Contrastive Spatio-Temporal Pretext Learning for Self-supervised Video Representation",
AAAI 2022, arXiv 2112.08913), as the released code trains it (Katou2/CSTP @e28b08db21,
``main_byol.py``, ``models/pace/r21d_byol.py``; method card §9).

Contrastive learning only asks whether two clips come from one video; CSTP adds a graded
question, the spatio-temporal overlap rate (STOR) of the two clips, next to BYOL and the
playback-pace and rotation pretexts. A sample (:class:`datamodules.pretext.cstp.STORClips`) is
two clips x1, x2 of one video with a shared pace, their spatial- and temporal-overlap labels and
one rotation label each.

1. The online backbone (R(2+1)D-10, 512-d, ``self.backbone``) embeds both clips: f1, f2.
2. BYOL: the online projector and predictor (512 → 4096 (BN, ReLU) → 512 each) give p1, p2; the
   target network, a backbone and projector built separately with their own random
   initialisation (the code's ``R21DBYOL.__init__``; ``target_init: copy`` starts it as a copy
   of the online network, as the BYOL paper), moved towards the online one by an EMA (m = 0.996,
   after every training step; BatchNorm on batch statistics), gives z1, z2 without gradient;
   L_BYOL = mean over the batch of (2 − 2·cos(p1, z2)) + (2 − 2·cos(p2, z1)).
3. The heads (:class:`lightning_modules.nn.stor_heads.STORHeads`) read f1, f2: spatial and
   temporal overlap from concat(f1, f2), pace and rotation from each clip.
4. L = w0·L_BYOL + w1·CE_spa + w2·CE_tem + w3·(CE_pace1 + CE_pace2) + w4·(CE_rot1 + CE_rot2),
   ``loss_weights`` = (0.1, 1, 1, 1, 1) (the README's ``--loss_weight 0.1 1 1 1 1``).

Recipe (README, UCF101): SGD lr 0.03 for 6 GPUs × 60 clips, weight decay 5e-4 on every parameter,
300 epochs, gradient-norm clip 18 and SyncBN (trainer options in the config). The code's
schedule is ``CosineAnnealingWarmupRestarts(first_cycle_steps=n_epochs, warmup_steps=0.5·n_epochs,
max_lr=lr, min_lr=1e-5)`` stepped once an epoch; with one cycle as long as training it never
restarts (``cycle_mult`` and ``gamma`` never act), so at epoch e (from 0) the lr is
min_lr + (lr − min_lr)·e/W for e < W = 0.5·n_epochs, then
min_lr + (lr − min_lr)·(1 + cos(π·(e − W)/(n_epochs − W)))/2. :func:`~lightning_modules.nn.schedules.lr_factor` is the same
curve evaluated at every optimizer step (the fraction of training done instead of the whole epoch
count), through a ``LambdaLR``. SGD's momentum 0.9 is UNVERIFIED (the code's ``--momentum``
default was not read).

Deviations from the authors' code:

- Initialisation: the backbone keeps :mod:`lightning_modules.nn.video_resnet`'s and the MLPs
  PyTorch's defaults; ``weight_init: glorot`` applies the code's Glorot-uniform to every Linear,
  Conv3d and BatchNorm weight (:func:`~lightning_modules.nn.init.glorot_uniform_`).

There is no validation step: the representation is judged by the shared UCF101 protocols
(linear probe, fine-tuning, retrieval), which load ``backbone.*`` from the checkpoint.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.base import VisionZooModule
from lightning_modules.nn.byol import MLP, symmetric_byol_loss
from lightning_modules.nn.init import glorot_uniform_
from lightning_modules.nn.momentum import momentum_encoder_mode, momentum_update_
from lightning_modules.nn.stor_heads import STORHeads
from lightning_modules.nn.video_encoder import VideoEncoder
from lightning_modules.recipe import OptimizerRecipe
from lightning_modules.video_ssl.evaluation import ClipFeaturePredictions


class CSTP(ClipFeaturePredictions, VisionZooModule):
    """BYOL plus the STOR, pace and rotation heads (see the module docstring).

    ``backbone``/``pretrained``/``weights``: the :class:`VideoEncoder` (CSTP trains R(2+1)D-10
    from scratch). ``projection_dim``/``hidden_dim``: BYOL's MLPs. ``target_momentum``: the EMA
    rate m. ``loss_weights``: (BYOL, spatial, temporal, pace, rotation). ``overlap_classes``: the
    number of overlap rates of the sampler; ``clip_classes``: outputs of the pace and rotation heads
    (5 as in the code, one more than their 4 classes; see :mod:`lightning_modules.nn.stor_heads`).
    ``target_init``: ``independent`` (the code) or ``copy`` (the BYOL paper); ``weight_init``:
    ``default`` or ``glorot`` (the code's); see the module docstring.
    ``optim`` (:class:`~lightning_modules.recipe.OptimizerRecipe`): SGD and its one-cycle schedule,
    warming up from ``min_lr`` (``warmup_start_factor`` = min_lr / lr) over half the run.
    """

    method_name = "cstp"

    def __init__(
        self,
        backbone: str = "r2plus1d_10",
        pretrained: bool = False,
        weights: str | None = None,
        projection_dim: int = 512,
        hidden_dim: int = 4096,
        target_momentum: float = 0.996,
        loss_weights: tuple[float, float, float, float, float] = (0.1, 1.0, 1.0, 1.0, 1.0),
        overlap_classes: int = 5,
        clip_classes: int = 5,
        target_init: Literal["independent", "copy"] = "independent",
        weight_init: Literal["default", "glorot"] = "default",
        optim: OptimizerRecipe = OptimizerRecipe(
            lr=0.03, weight_decay=5e-4, warmup_fraction=0.5, warmup_start_factor=1e-5 / 0.03, min_lr=1e-5
        ),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if len(loss_weights) != 5:
            raise ValueError(f"loss_weights are (byol, spatial, temporal, pace, rotation), got {loss_weights}")
        if target_init not in ("independent", "copy") or weight_init not in ("default", "glorot"):
            raise ValueError(f"model.target_init must be 'independent' or 'copy' and model.weight_init 'default' or "
                             f"'glorot', got {target_init!r} and {weight_init!r}")
        if weight_init == "glorot" and (pretrained or weights):
            raise ValueError("model.weight_init: glorot draws every weight: it cannot start from pretrained weights "
                             "(model.pretrained / model.weights)")
        initialise = glorot_uniform_ if weight_init == "glorot" else (lambda module: module)
        self.backbone = initialise(VideoEncoder(backbone, pretrained, weights))
        features = self.backbone.num_features
        self.projector = initialise(MLP(features, hidden_dim, projection_dim))
        self.predictor = initialise(MLP(projection_dim, hidden_dim, projection_dim))
        self.heads = initialise(STORHeads(features, overlap_classes, clip_classes))
        if target_init == "copy":
            self.target_encoder = copy.deepcopy(self.backbone)
            self.target_projector = copy.deepcopy(self.projector)
        else:  # built again: its own random draw (or the same pretrained weights)
            self.target_encoder = initialise(VideoEncoder(backbone, pretrained, weights))
            self.target_projector = initialise(MLP(features, hidden_dim, projection_dim))
        self.target_encoder.requires_grad_(False)
        self.target_projector.requires_grad_(False)

    def forward(self, clip: Tensor) -> Tensor:
        """Backbone features [B, D] of clips [B, 3, T, H, W]."""
        return self.backbone(clip)

    @torch.no_grad()
    def target_projection(self, clip: Tensor) -> Tensor:
        """The target network's projection [B, projection_dim] (BatchNorm on batch statistics)."""
        momentum_encoder_mode(self.target_encoder)
        momentum_encoder_mode(self.target_projector)
        return self.target_projector(self.target_encoder(clip))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x1, x2 = batch["clip1"], batch["clip2"]
        f1, f2 = self(x1), self(x2)
        p1, p2 = self.predictor(self.projector(f1)), self.predictor(self.projector(f2))
        z1, z2 = self.target_projection(x1), self.target_projection(x2)
        logits = self.heads(f1, f2)
        targets = {
            "spatial": batch["spatial_label"], "temporal": batch["temporal_label"],
            "pace1": batch["pace_label"], "pace2": batch["pace_label"],
            "rotation1": batch["rotation_label1"], "rotation2": batch["rotation_label2"],
        }
        ce = {name: F.cross_entropy(logits[name], target) for name, target in targets.items()}
        hit = {name: (logits[name].argmax(dim=1) == target).float().mean() for name, target in targets.items()}
        terms = {
            "byol": symmetric_byol_loss(p1, p2, z1, z2).mean(),
            "spatial": ce["spatial"],
            "temporal": ce["temporal"],
            "pace": ce["pace1"] + ce["pace2"],
            "rotation": ce["rotation1"] + ce["rotation2"],
        }
        loss = sum(weight * term for weight, term in zip(self.hparams.loss_weights, terms.values(), strict=True))
        batch_size = len(x1)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/loss_{name}": term.detach() for name, term in terms.items()}, batch_size=batch_size)
        self.log_dict({
            "train/acc_spatial": hit["spatial"], "train/acc_temporal": hit["temporal"],
            "train/acc_pace": (hit["pace1"] + hit["pace2"]) / 2, "train/acc_rotation": (hit["rotation1"] + hit["rotation2"]) / 2,
        }, batch_size=batch_size)
        return loss

    def after_optimizer_step(self) -> None:
        """θ_target ← m·θ_target + (1 − m)·θ_online after every optimizer step, for the backbone and
        the projector; the code updates at the start of every forward, which gives the same targets."""
        momentum_update_(self.target_encoder, self.backbone, self.hparams.target_momentum)
        momentum_update_(self.target_projector, self.projector, self.hparams.target_momentum)
