"""CMD: Context and Motion Decoupling (Huang, Liu, Wang, Pan, Xu, Jin, "Self-supervised Video
Representation Learning by Context and Motion Decoupling", CVPR 2021, arXiv 2104.00862; method
card §8).

A video is split into a context part, the I-frames of its compressed stream, and a motion part,
its motion vectors (MVs); the clip encoder learns both from an RGB clip
(:class:`~datamodules.pretext.cmd.ContextMotionClips` gives the clip, an I-frame near it, the MVs
of its near future and of three other times of the same video):

1. **Clip tokens.** The backbone (R(2+1)D-26) maps the clip to CMD's token map F [B, 2048, T', H',
   W'] (:func:`~lightning_modules.nn.video_resnet.cmd_tokens`: layer3 split into even/odd time
   steps plus the upsampled layer4; 2×7×7 = 98 tokens for a 16×112 clip).
2. **Context matching.** GAP(F) → MLP → L2 is matched to the I-frame, encoded by a ResNet-10-2D →
   MLP → L2: L_ctx is the InfoNCE over the clip↔I-frame similarities of the global batch, the
   positive being the same video.
3. **Motion prediction.** A transformer predicts, from the tokens, one embedding per position of
   the future MV clip's feature map; the MV clip goes through a 3-D ResNet-10 (2 input channels)
   → per-position MLP → L2 (1×7×7 = 49 positions for 8 frames at 112). L_mot is the point-wise
   InfoNCE: each predicted position against every position of every MV clip of the global batch
   (the true future clips and the three same-video negatives of every video), the positive being
   the same position of its own future clip.
4. L = ``context_weight``·L_ctx + ``motion_weight``·L_mot, τ = 0.1 for both. Logged: ``train/loss``,
   ``train/loss_context``, ``train/loss_motion``, the top-1 accuracies of both InfoNCEs
   (``train/acc_context``, ``train/acc_motion``) and ``train/lr``.

Only ``backbone`` (a :class:`VideoEncoder`) is kept for the evaluation protocols. Token and
target grids are read from the tensors, never assumed: the mini preset's 8×64 clips give 1×4×4
tokens and 1×4×4 targets, and the learned positions are resized to them
(:class:`~lightning_modules.nn.cmd.GridEmbedding`).

Recipe ([CODE*], from a public copy of the authors' code, TonyAlbertWan/CPaR ``pretrain.py`` and
``cfg/ucf_config.py``; not checked against the paper): SGD with Nesterov momentum 0.9, weight
decay 1e-3 on every parameter, lr = 5e-4 per sample × global batch (``optim.lr`` for
``optim.lr_batch_size`` 1; GPUs × per-GPU batch, here also × gradient accumulation), 5 warm-up epochs rising linearly per step from 1 % of
it, then a cosine to 0 (the code's cosine steps once per epoch; here per step), 200 epochs,
gradient-norm clipping at 15 and SyncBN (trainer options in the config). All backbones start
with their residual branches' last BN at zero, as the code's ResNets (``zero_init_residual=True``).

Deviations from the authors' code:

- The keys gathered from the other ranks pass the exact gradient of the loss back to the rank
  that computed them; the code's gather divides it once more by the world size, which
  ``key_gradient: authors`` reproduces (:func:`~lightning_modules.nn.cmd.gathered_info_nce`).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import timm
import torch
from torch import Tensor

from lightning_modules.base import VisionZooModule
from lightning_modules.nn.backbones import create_backbone
from lightning_modules.nn.cmd import EmbeddingHead, IFrameEncoder, MotionPredictor, gathered_info_nce, motion_keys
from lightning_modules.nn.video_encoder import VideoEncoder
from lightning_modules.nn.video_resnet import cmd_tokens
from lightning_modules.recipe import OptimizerRecipe
from lightning_modules.video_ssl.evaluation import ClipFeaturePredictions


class CMD(ClipFeaturePredictions, VisionZooModule):
    """Context and motion decoupling pretraining (module docstring). Architecture defaults are
    the code's [CODE*]: R(2+1)D-26 clips, 3-D ResNet-10 MVs, transformer of 512 dims with 8 heads,
    2 encoder and 4 decoder layers, FFN 512, dropout 0.1, heads 2048 → 512, τ 0.1.
    ``source_grid``/``target_grid`` are the token grids the learned positions are made for (the
    paper geometry); other grids use resized positions. ``pretrained``/``weights`` are
    :class:`VideoEncoder`'s (the video ResNets have no weights to fetch, only a local file). Both
    encoders start every residual block as its shortcut (``zero_init_residual``), as the code's."""

    method_name = "cmd"

    def __init__(
        self,
        backbone: str = "r2plus1d_26",
        pretrained: bool = False,
        weights: Optional[str] = None,
        motion_backbone: str = "r3d_10",
        hidden_dim: int = 512,
        num_heads: int = 8,
        encoder_layers: int = 2,
        decoder_layers: int = 4,
        feedforward_dim: int = 512,
        dropout: float = 0.1,
        head_hidden_dim: int = 2048,
        embedding_dim: int = 512,
        source_grid: tuple[int, int, int] = (2, 7, 7),
        target_grid: tuple[int, int, int] = (1, 7, 7),
        temperature: float = 0.1,
        context_weight: float = 1.0,
        motion_weight: float = 1.0,
        key_gradient: Literal["exact", "authors"] = "exact",
        optim: OptimizerRecipe = OptimizerRecipe(
            lr=5e-4, lr_batch_size=1, nesterov=True, weight_decay=1e-3, warmup_epochs=5.0, warmup_start_factor=0.01
        ),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        video_resnets = timm.list_models(module="video_resnet")
        for name in (backbone, motion_backbone):
            if name not in video_resnets:
                raise ValueError(f"CMD's clip and motion encoders are video ResNets ({', '.join(video_resnets)}), "
                                 f"not '{name}'")
        self.backbone = VideoEncoder(backbone, pretrained, weights, zero_init_residual=True)
        self.motion_encoder = create_backbone(motion_backbone, False, in_chans=2, zero_init_residual=True)
        self.iframe_encoder = IFrameEncoder()
        features = self.backbone.num_features
        self.clip_context_head = EmbeddingHead(features, head_hidden_dim, embedding_dim)
        self.iframe_context_head = EmbeddingHead(self.iframe_encoder.num_features, head_hidden_dim, embedding_dim)
        self.motion_predictor = MotionPredictor(
            features, hidden_dim, num_heads, encoder_layers, decoder_layers, feedforward_dim, dropout,
            tuple(source_grid), tuple(target_grid), head_hidden_dim, embedding_dim,
        )
        self.motion_target_head = EmbeddingHead(self.motion_encoder.num_features, head_hidden_dim, embedding_dim)

    def forward(self, clip: Tensor) -> Tensor:
        """Pooled backbone features [B, D] of clips [B, 3, T, H, W], for evaluation."""
        return self.backbone(clip)

    def embed(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The four L2-normalised embeddings of a training batch: ``clip_context`` [B, D],
        ``iframe_context`` [B, D], ``predicted_motion`` [B, P, D], ``motion_keys`` [(1 + N)·B·P, D]
        (:func:`~lightning_modules.nn.cmd.motion_keys`)."""
        video, positive, negative = batch["video"], batch["motion"], batch["negative_motion"]
        batch_size, num_negatives = negative.shape[:2]
        tokens = cmd_tokens(self.backbone.network, video)
        # All MV clips in one pass (BatchNorm statistics over all of them, as the code).
        motion_clips = torch.cat([positive[:, None], negative], dim=1).flatten(0, 1)
        target_map = self.motion_encoder.forward_features(motion_clips)
        grid = tuple(target_map.shape[2:])
        targets = self.motion_target_head(target_map.flatten(2).transpose(1, 2).flatten(0, 1))
        targets = targets.view(batch_size, 1 + num_negatives, math.prod(grid), -1)
        return {
            "clip_context": self.clip_context_head(tokens.mean(dim=(2, 3, 4))),
            "iframe_context": self.iframe_context_head(self.iframe_encoder(batch["iframe"])),
            "predicted_motion": self.motion_predictor(tokens, grid),
            "motion_keys": motion_keys(targets[:, 0], targets[:, 1:]),
        }

    def losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Steps 2-4 on a training batch: ``loss`` and its two InfoNCE terms with their top-1
        accuracies (``loss_context``, ``loss_motion``, ``acc_context``, ``acc_motion``)."""
        hp = self.hparams
        embeddings = self.embed(batch)
        loss_context, acc_context, _, _ = gathered_info_nce(
            embeddings["clip_context"], embeddings["iframe_context"], hp.temperature, hp.key_gradient
        )
        loss_motion, acc_motion, _, _ = gathered_info_nce(
            embeddings["predicted_motion"].flatten(0, 1), embeddings["motion_keys"], hp.temperature, hp.key_gradient
        )
        return {"loss": hp.context_weight * loss_context + hp.motion_weight * loss_motion,
                "loss_context": loss_context, "loss_motion": loss_motion, "acc_context": acc_context, "acc_motion": acc_motion}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        values = self.losses(batch)
        loss = values.pop("loss")
        batch_size = len(batch["video"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{name}": value for name, value in values.items()}, batch_size=batch_size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)
        return loss
