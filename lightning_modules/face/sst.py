"""Semi-Siamese Training (Du et al., "Semi-Siamese Training for Shallow Face Learning", ECCV 2020,
arXiv 2007.08398), for data with about two images per identity.

There is no classifier. Each identity of the batch comes as two images x1, x2
(``MS1MDataModule(sampling="identity_pairs")``):

1. A *probe* network φ_p (trained by SGD) embeds both: p1, p2, L2-normalised.
2. A *gallery* network φ_g, a momentum copy of the probe (θ_g ← α·θ_g + (1−α)·θ_p after every
   optimizer step, α = 0.999), embeds them without gradient: g1, g2. It runs with its
   BatchNorm layers in train mode and everything else in eval mode, with MoCo's shuffle-BN
   across ranks (a permutation inside one process leaves BatchNorm's statistics unchanged, so
   with one process the batch is not shuffled).
3. A queue of K gallery prototypes (K = 16384, random unit vectors at the start) acts as the
   class centres; an identity's label is the queue slot its prototype is written to. p1 is
   classified against the queue with g2 in the batch's slots, p2 against it with g1, through
   a margin head (official code: plain softmax, s = 30); the loss is the sum of the two
   cross-entropies (official ``main.py``; ``loss_terms: mean`` halves it, as FaceX-Zoo does).
4. Then g1 or g2 (a coin flip per step) is written into the slots, and the write pointer
   moves on by the global batch size.

Defaults from the official ``main.py`` (dituu/Semi-Siamese-Training; method card, §2): softmax
head s = 30, K = 16384, α = 0.999, the summed loss at SGD lr 0.05, momentum 0.9, weight decay
5e-4, steps x0.1 at epochs 48, 72, 90 of 100, a global batch of 128 identities (one
DataParallel batch there; ``configs/ms1m/sst_r50.yaml`` divides it over the ranks with
``data.batch_size_scope: global``). FaceX-Zoo's recipe halves the loss and runs lr 0.1: keep the
loss and the rate of one reference, since a halved loss at the official rate takes half the step
of both.

An identity of the batch can also sit in older queue slots (a false negative). The official
code draws each epoch's first K identities from those not in the previous epoch's last K;
here every queue slot remembers its identity and slots of the sample's own identity other
than its target are left out of its softmax, which removes false negatives at any K and
epoch order (an implementation choice, not the paper's).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.distributed.comm import all_gather, world_info
from lightning_modules.distributed.shuffle_bn import shuffled_batchnorm_forward
from lightning_modules.face.base import FaceRecognitionModule
from lightning_modules.framework import keep_out_of_ddp
from lightning_modules.nn.backbones import create_embedding_backbone
from lightning_modules.nn.margins import MarginHead, SoftmaxHead
from lightning_modules.nn.momentum import momentum_encoder_mode, momentum_update_
from lightning_modules.recipe import OptimizerRecipe


class SemiSiameseTraining(FaceRecognitionModule):
    """Probe and momentum gallery networks with a prototype queue (see the module docstring).

    ``num_classes`` is the number of identities of the training data (linked from the data by
    ``visionzoo``); SST has no classifier, so it only bounds the queue: K should exceed the
    global batch, and K much larger than the number of identities fills the queue with
    repeats (left out of each softmax, see above).
    """

    method_name = "sst"

    def __init__(
        self,
        num_classes: int,
        head: MarginHead | None = None,
        backbone: str = "iresnet50",
        embedding_size: int = 512,
        dropout: float = 0.0,
        pretrained: bool = False,
        weights: str | None = None,
        queue_size: int = 16384,
        gallery_momentum: float = 0.999,
        loss_terms: Literal["sum", "mean"] = "sum",
        optim: OptimizerRecipe = OptimizerRecipe(
            lr=0.05, weight_decay=5e-4, schedule="step", milestones=(48, 72, 90)
        ),
        seed: int = 0,
    ) -> None:
        super().__init__()
        if loss_terms not in ("sum", "mean"):
            raise ValueError(f"model.loss_terms must be 'sum' (official main.py) or 'mean' (FaceX-Zoo), got {loss_terms!r}")
        self.save_hyperparameters(ignore=["head"])
        self.head = head if head is not None else SoftmaxHead(s=30.0)
        self.backbone = create_embedding_backbone(backbone, embedding_size, pretrained, weights, dropout)
        self.gallery = copy.deepcopy(self.backbone).requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("queue", F.normalize(torch.rand(queue_size, embedding_size, generator=generator) * 2 - 1, dim=1))
        self.register_buffer("queue_identity", torch.full((queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        # Same draws on every rank (shuffle-BN permutation, which prototype to enqueue).
        self._shared_generator = torch.Generator().manual_seed(seed + 1)

    def forward(self, images: Tensor) -> Tensor:
        """Probe embeddings [B, D] (unnormalised), for evaluation."""
        return self.backbone(images)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x1, x2, identity = batch["image"], batch["image2"], batch["label"]
        probe1, probe2 = F.normalize(self(x1), dim=1), F.normalize(self(x2), dim=1)
        momentum_encoder_mode(self.gallery)
        with torch.no_grad():
            gallery1 = F.normalize(shuffled_batchnorm_forward(self.gallery, x1, self._shared_generator), dim=1)
            gallery2 = F.normalize(shuffled_batchnorm_forward(self.gallery, x2, self._shared_generator), dim=1)
            gallery1, gallery2, batch_identity = all_gather(gallery1), all_gather(gallery2), all_gather(identity)
        slots = self._batch_slots(len(batch_identity))
        rank, _ = world_info()
        targets = slots[rank * len(identity) : (rank + 1) * len(identity)]
        loss = (1.0 if self.hparams.loss_terms == "sum" else 0.5) * (
            self._queue_loss(probe1, gallery2, slots, targets, identity, batch_identity)
            + self._queue_loss(probe2, gallery1, slots, targets, identity, batch_identity)
        )
        self._enqueue(gallery1 if torch.rand((), generator=self._shared_generator) < 0.5 else gallery2, slots, batch_identity)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(identity))
        return loss

    def _batch_slots(self, global_batch: int) -> Tensor:
        queue_size = self.queue.shape[0]
        if queue_size % global_batch:
            raise ValueError(f"SST's queue_size ({queue_size}) must be a multiple of the global batch ({global_batch})")
        return self.queue_pointer + torch.arange(global_batch, device=self.queue.device)

    def _queue_loss(
        self, probe: Tensor, gallery: Tensor, slots: Tensor, targets: Tensor, identity: Tensor, batch_identity: Tensor
    ) -> Tensor:
        """Cross-entropy of ``probe`` [B, D] over the queue with ``gallery`` (global batch) in
        the batch's ``slots``; the target of sample i is slot ``targets[i]``."""
        prototypes = self.queue.index_copy(0, slots, gallery)
        prototype_identity = self.queue_identity.index_copy(0, slots, batch_identity)
        logits = self.head(probe @ prototypes.T, targets)
        false_negative = prototype_identity[None, :] == identity[:, None]
        false_negative[torch.arange(len(targets)), targets] = False
        log_p = logits.masked_fill(false_negative, float("-inf")).log_softmax(dim=1)
        return self.head.loss(log_p.gather(1, targets[:, None]).squeeze(1)).mean()

    @torch.no_grad()
    def _enqueue(self, prototypes: Tensor, slots: Tensor, batch_identity: Tensor) -> None:
        self.queue[slots] = prototypes
        self.queue_identity[slots] = batch_identity
        self.queue_pointer.copy_((self.queue_pointer + len(slots)) % self.queue.shape[0])

    def after_optimizer_step(self) -> None:
        """θ_g ← α·θ_g + (1 − α)·θ_p after each optimizer step."""
        momentum_update_(self.gallery, self.backbone, self.hparams.gallery_momentum)

    def configure_model(self) -> None:
        """The queue is the same on every rank (it is written from gathered prototypes): keep
        it out of DDP's per-step buffer broadcast."""
        keep_out_of_ddp(self, ["queue", "queue_identity", "queue_pointer"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sst_shared_generator"] = self._shared_generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "sst_shared_generator" in checkpoint:
            self._shared_generator.set_state(checkpoint["sst_shared_generator"])
