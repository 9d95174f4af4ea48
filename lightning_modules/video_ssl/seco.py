"""SeCo: Sequence Contrastive Learning (Yao, Zhang, Qiu, Pan, Mei, "SeCo: Exploring Sequence
Supervision for Unsupervised Representation Learning", AAAI 2021, arXiv 2008.00975; authors'
code YihengZhang-CV/SeCo-Sequence-Contrastive-Learning, ``train_inter_intra_order.py``,
``seco/Contrast.py``, ``seco/resnet_mlp.py``; method card §7).

A 2-D network learns from single frames with three proxy tasks. Each sample
(:class:`datamodules.pretext.seco.SeCoFrames`) is a query frame x_q from one half of a video,
x1 (the same frame, another augmentation) and x2 ≤ x3 (two frames of the other half):

1. A query encoder (``backbone``, a 2-D timm model, ResNet-50 in the paper, pooled feature
   2048-d) with three projection heads ``fc_inter``, ``fc_intra``, ``fc_order``
   (Linear 2048→2048, ReLU, Linear 2048→128, L2-normalised: the authors' ``--model_mlp``)
   encodes x_q.
2. A key encoder, a momentum copy of backbone and heads (θ_k ← 0.999·θ_k + 0.001·θ_q after
   every optimizer step, BatchNorm in train mode, MoCo's shuffle-BN across ranks with a
   permutation drawn by a generator shared by all ranks), encodes x1, x2, x3 separately.
3. Inter-frame loss (the instance is the video): InfoNCE of q against each key of
   {x1, x2, x3} separately (3B rows, logits (3B, 1 + K)) and a queue of K = 131072 keys;
   frames of the same video are positives. All 3B keys (of every rank) are then enqueued.
4. Intra-frame loss (the instance is the frame): for x2 and x3, a 2-way softmax
   [q·k1, q·kj]/τ on the ``fc_intra`` features (logits (2B, 2)); the other frames of the same
   video are negatives here, which is why the two tasks have separate heads.
5. Order loss: ``order_classifier`` = Linear(3·128 → 2) on [q_order, k2_order, k3_order]
   (key features from the key encoder, detached), cross-entropy against the order label
   (0: the query comes before x2, x3; 1: after).
6. L = w_inter·L_inter + w_intra·L_intra + w_order·L_order, weights 1, 1, 1; τ = 0.1 for both
   contrastive losses.

Optimisation (authors' ``parse_option`` and ``get_scheduler``): SGD momentum 0.9, weight decay
1e-4 on every parameter, lr = 0.1 × global batch / 256 (batch 128 per GPU × 4 GPUs ⇒ 0.2),
per-step linear warm-up over 5 epochs from lr/100, then cosine to 1e-6; 400 epochs.

Initialisation: the authors start from MoCo-v2's 200-epoch ImageNet ResNet-50
(``moco_v2_200ep_pretrain.pth.tar``), its encoder into the backbone and its MLP head into all
three heads (``seco/util.py: load_pretrained``). ``weights`` accepts that checkpoint as it is
(a ``state_dict`` with ``module.encoder_q.*`` keys) and does the same; it also accepts a plain
timm/torchvision state dict of the backbone. timm serves no MoCo weights, so
``pretrained: true`` alone gives timm's default (supervised) ImageNet weights of the backbone,
which is *not* the paper's start. ``configs/ucf101/seco.yaml`` starts from random weights unless
given the MoCo checkpoint; every fit says which start it uses (:meth:`SeCo.on_fit_start`).

Data here: the paper pretrains on Kinetics-400 frame folders (~30 frames per video, short side
256); this suite pretrains on the UCF101 split-1 train list (``configs/ucf101/seco.yaml``),
drawing from all decoded frames of each video, so absolute numbers are not the paper's.

Evaluation: the linear-probe, fine-tune and retrieval protocols see ``backbone`` (a
:class:`~lightning_modules.nn.video_encoder.VideoEncoder`) as a clip encoder that averages its
per-frame features over time (TSN's average consensus); ``forward(clip)`` does exactly that.
The heads and the key encoder are pretraining-only.

UNVERIFIED against the paper's text: the loss weights 1/1/1, τ and the optimiser come from the
authors' code (card [CODE]); the paper's absolute numbers (UCF101 ≈ 88.3 fine-tuned) are recalled.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_modules.base import VisionZooModule
from lightning_modules.distributed.comm import all_gather
from lightning_modules.framework import keep_out_of_ddp
from lightning_modules.distributed.shuffle_bn import shuffled_batchnorm_forward
from lightning_modules.nn.contrastive import (
    FeatureQueue, ProjectionHead, info_nce_logits, info_nce_loss, positive_top1, two_way_logits,
)
from lightning_modules.nn.momentum import momentum_encoder_mode, momentum_update_
from lightning_modules.nn.video_encoder import VideoEncoder
from lightning_modules.recipe import OptimizerRecipe
from lightning_modules.video_ssl.evaluation import ClipFeaturePredictions

HEADS = ("fc_inter", "fc_intra", "fc_order")
MOCO_ENCODER_PREFIX = "module.encoder_q."


def read_moco_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor]] | None:
    """(backbone state, MLP head state) of a MoCo checkpoint (``state_dict`` with
    ``module.encoder_q.*`` keys, as facebookresearch/moco saves it); None for any other file."""
    path = Path(path).expanduser()
    if not path.is_file() or path.suffix == ".safetensors":
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file, or not loadable with weights only: not MoCo's
        return None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not any(k.startswith(MOCO_ENCODER_PREFIX) for k in state):
        return None
    encoder = {k[len(MOCO_ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(MOCO_ENCODER_PREFIX)}
    head = {k[len("fc."):]: v for k, v in encoder.items() if k.startswith("fc.")}
    backbone = {k: v for k, v in encoder.items() if not k.startswith("fc.")}
    return backbone, head


class SeCo(ClipFeaturePredictions, VisionZooModule):
    """SeCo pretraining (see the module docstring).

    ``backbone``: a timm 2-D model name; ``pretrained``/``weights`` as in DESIGN.md (``weights``
    may also be a MoCo checkpoint). ``projection_dim``/``mlp``: the three heads. ``queue_size``
    K, ``temperature`` τ (inter), ``intra_temperature`` τ_intra, ``key_momentum`` the EMA α,
    ``inter_weight``/``intra_weight``/``order_weight`` the loss weights. ``optim``
    (:class:`~lightning_modules.recipe.OptimizerRecipe`): lr 0.1 per 256 samples of global batch
    (per-device batch × devices × accumulation), ``warmup_epochs`` of linear warm-up from
    ``warmup_start_factor`` × lr, then cosine to ``min_lr``, which scales with the batch like the
    lr: 5e-7 per 256 is the code's absolute 1e-6 at its global batch of 512. ``seed`` seeds the queue's start and the shuffle-BN permutations (the same on
    every rank).
    """

    method_name = "seco"

    def __init__(
        self,
        backbone: str = "resnet50",
        pretrained: bool = False,
        weights: str | None = None,
        projection_dim: int = 128,
        mlp: bool = True,
        queue_size: int = 131072,
        temperature: float = 0.1,
        intra_temperature: float = 0.1,
        key_momentum: float = 0.999,
        inter_weight: float = 1.0,
        intra_weight: float = 1.0,
        order_weight: float = 1.0,
        optim: OptimizerRecipe = OptimizerRecipe(
            lr=0.1, lr_batch_size=256, weight_decay=1e-4, warmup_epochs=5.0, warmup_start_factor=0.01, min_lr=5e-7
        ),
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        moco = read_moco_checkpoint(weights) if weights is not None else None
        self.backbone = VideoEncoder(backbone, pretrained=pretrained and moco is None, weights=None if moco else weights)
        if not self.backbone.is_2d:
            raise ValueError(f"SeCo learns from single frames: backbone must be a 2-D timm model, got the video model '{backbone}'")
        width = self.backbone.num_features
        self.fc_inter = ProjectionHead(width, projection_dim, mlp)
        self.fc_intra = ProjectionHead(width, projection_dim, mlp)
        self.fc_order = ProjectionHead(width, projection_dim, mlp)
        self.order_classifier = nn.Linear(3 * projection_dim, 2)
        if moco is not None:
            self._load_moco(*moco, weights)
        self.start = (f"the MoCo checkpoint {weights}" if moco is not None else f"the weights of {weights}" if weights
                      else "timm's supervised ImageNet weights (not the paper's MoCo-v2 start)" if pretrained
                      else "random weights (not the paper's MoCo-v2 start)")
        self.key_encoder = nn.ModuleDict({name: copy.deepcopy(getattr(self, name)) for name in ("backbone", *HEADS)})
        self.key_encoder.requires_grad_(False)
        self.queue = FeatureQueue(queue_size, projection_dim, torch.Generator().manual_seed(seed))
        # Same draws on every rank: the shuffle-BN permutations.
        self._shared_generator = torch.Generator().manual_seed(seed + 1)

    def _load_moco(self, backbone_state: dict[str, Tensor], head_state: dict[str, Tensor], path: str) -> None:
        """MoCo's encoder into the backbone (strict), its projection into every head (authors'
        ``load_pretrained``: fc.0/fc.2 copied into fc_inter, fc_intra and fc_order)."""
        missing, unexpected = self.backbone.network.load_state_dict(backbone_state, strict=False)
        if missing or unexpected:
            raise ValueError(f"--model.weights {path}: MoCo encoder does not fit '{self.hparams.backbone}': "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name in HEADS:
            head = getattr(self, name).fc
            if {k: tuple(v.shape) for k, v in head_state.items()} != {k: tuple(v.shape) for k, v in head.state_dict().items()}:
                rank_zero_info(f"SeCo: the MoCo projection of {path} does not fit the heads; they start at random")
                return
            head.load_state_dict(head_state)
        rank_zero_info(f"SeCo: backbone and heads initialised from the MoCo checkpoint {path}")

    def on_fit_start(self) -> None:
        """Says which start this run uses; the paper's is MoCo-v2's ImageNet ResNet-50."""
        message = f"SeCo starts from {self.start}"
        if "MoCo checkpoint" not in self.start and self.trainer.ckpt_path is None:
            message += ("; for the paper's start give --model.init_args.weights moco_v2_200ep_pretrain.pth.tar "
                        "(facebookresearch/moco)")
        rank_zero_info(message)

    # ----------------------------------------------------------------------------- encoders

    def forward(self, clip: Tensor) -> Tensor:
        """Clip features [B, D] of clips [B, 3, T, H, W]: the backbone's frame features averaged over time."""
        return self.backbone(clip)

    @staticmethod
    def _frames(images: Tensor) -> Tensor:
        return images.contiguous(memory_format=torch.channels_last) if images.is_cuda else images

    def query_features(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(inter, intra, order) features [B, 128] each, L2-normalised, of the query encoder."""
        features = self.backbone.forward_frames(self._frames(images))
        return self.fc_inter(features), self.fc_intra(features), self.fc_order(features)

    def _key_projections(self, images: Tensor) -> Tensor:
        key = self.key_encoder
        features = key["backbone"].forward_frames(self._frames(images))
        return torch.cat([key[name](features).float() for name in HEADS], dim=1)

    @torch.no_grad()
    def key_features(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(inter, intra, order) features of the key encoder, in train-mode BatchNorm with the
        batch shuffled across ranks (shuffle-BN)."""
        momentum_encoder_mode(self.key_encoder)
        projections = shuffled_batchnorm_forward(self._key_projections, images, self._shared_generator)
        return tuple(projections.split(self.hparams.projection_dim, dim=1))  # type: ignore[return-value]

    @torch.no_grad()
    def update_key_encoder(self, momentum: float | None = None) -> None:
        """θ_k ← α·θ_k + (1 − α)·θ_q for the backbone and the three heads (α = ``key_momentum``)."""
        alpha = self.hparams.key_momentum if momentum is None else momentum
        for name in ("backbone", *HEADS):
            momentum_update_(self.key_encoder[name], getattr(self, name), alpha)

    # ----------------------------------------------------------------------------- losses

    def inter_logits(self, query: Tensor, keys: tuple[Tensor, ...], negatives: Tensor) -> Tensor:
        """(3B, 1 + K): q against each of k1, k2, k3 (rows in that order), with the queue."""
        return info_nce_logits(query.repeat(len(keys), 1), torch.cat(keys), negatives, self.hparams.temperature)

    def intra_logits(self, query: Tensor, same_frame: Tensor, other_frames: tuple[Tensor, ...]) -> Tensor:
        """(2B, 2): [q·k1, q·k2] rows then [q·k1, q·k3] rows."""
        return two_way_logits(query, same_frame, other_frames, self.hparams.intra_temperature)

    def order_logits(self, query_order: Tensor, early_order: Tensor, late_order: Tensor) -> Tensor:
        """(B, 2) from [q_order, k2_order, k3_order], key features detached."""
        return self.order_classifier(torch.cat([query_order, early_order.detach().to(query_order.dtype),
                                                late_order.detach().to(query_order.dtype)], dim=1))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        hp = self.hparams
        order_label = batch["order_label"]
        batch_size = order_label.shape[0]
        q_inter, q_intra, q_order = self.query_features(batch["query"])
        k1, k2, k3 = (self.key_features(batch[name]) for name in ("positive", "other_early", "other_late"))

        inter = self.inter_logits(q_inter, (k1[0], k2[0], k3[0]), self.queue.negatives())
        intra = self.intra_logits(q_intra, k1[1], (k2[1], k3[1]))
        order = self.order_logits(q_order, k2[2], k3[2])
        loss_inter, loss_intra = info_nce_loss(inter), info_nce_loss(intra)
        loss_order = F.cross_entropy(order.float(), order_label)
        loss = hp.inter_weight * loss_inter + hp.intra_weight * loss_intra + hp.order_weight * loss_order

        # Keys of every rank, x1 then x2 then x3 (each in rank order), as the authors' k_all.
        self.queue.enqueue(torch.cat([all_gather(k[0].contiguous()) for k in (k1, k2, k3)]))
        self.log_dict({
            "train/loss_inter": loss_inter, "train/loss_intra": loss_intra, "train/loss_order": loss_order,
            "train/inter_top1": positive_top1(inter), "train/intra_top1": positive_top1(intra),
            "train/order_acc": (order.argmax(dim=1) == order_label).float().mean(),
        }, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def after_optimizer_step(self) -> None:
        """The key encoder follows the query encoder after each optimizer step."""
        self.update_key_encoder()

    # ----------------------------------------------------------------------------- distributed, checkpoints

    def configure_model(self) -> None:
        """The queue is written from gathered keys and is the same on every rank: keep it out
        of DDP's per-step buffer broadcast."""
        keep_out_of_ddp(self, ["queue.queue", "queue.pointer"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["seco_shared_generator"] = self._shared_generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "seco_shared_generator" in checkpoint:
            self._shared_generator.set_state(checkpoint["seco_shared_generator"])
