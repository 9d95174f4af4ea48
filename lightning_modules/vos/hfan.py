"""HFAN: Hierarchical Feature Alignment Network for unsupervised (zero-shot) video object
segmentation (Pei, Sun, Yao, Shen, Tang, ECCV 2022; NUST-Machine-Intelligence-Laboratory/HFAN;
method card 5). Plain torch parts in :mod:`lightning_modules.nn.hfan`.

1. A frame and the colour-coded optical flow to the next frame pass one shared MiT encoder (a
   batch of 2B, split after it): stage features at strides 4, 8, 16, 32.
2. At each stage, FAM aligns both to the primary object: 2-class logits of the frame feature give
   two region descriptors (spatial softmax), and an object-context attention with those regions
   re-describes the frame feature and the flow feature.
3. FAT adapts the two modalities: w = σ(channel + global attention of their sum), out =
   2·frame·w + 2·flow·(1 − w).
4. SegFormer's all-MLP head fuses the four stages into 2-class logits at 1/4, upsampled to the
   label size; cross-entropy (void ignored). FAM's logits have no loss of their own (as the code).
5. Training (``local_configs/hfan``): AdamW 6e-5, weight decay 0.01 (none on normalisation
   layers), the head (with the HFAN blocks) at ×10, linear warm-up over the first 1.9 % of
   steps from 1e-6, then poly decay with power 1; 512 crops of frames rescaled ×0.5-2, flip,
   photometric distortion on frame and flow alike (the DataModule).
6. Inference: the frame and its flow resized to fit (2048, 512) keeping the ratio, logits by
   sliding 512 windows with stride 271 averaged, upsampled to the frame, argmax: the binary
   mask of every frame, scored as DAVIS 2016's single object (unsupervised task).

Deviations from the authors' code:

- The encoder is timm's PVTv2 (``pvt_v2_b1`` for MiT-b1, ``pvt_v2_b2`` for MiT-b2; timm has no
  MiT): the same stages, widths, depths, overlapping patch embeddings, spatial-reduction
  attention and depth-wise-convolution MLP; its ImageNet weights are timm's, not SegFormer's.
- Weight decay is left off biases too, where the code exempts only normalisation layers and
  positional blocks.
- BatchNorm where the code's head uses SyncBN: convert with Lightning's ``sync_batchnorm``.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.vos_clips import frame_tensor
from lightning_modules.nn.hfan import HFANNetwork
from lightning_modules.recipe import OptimizerRecipe
from lightning_modules.sequence_evaluation import SequenceEvaluatedModule

VOID = 255


def sliding_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's ``slide_inference`` windows (y1, y2, x1, x2) of ``crop`` every ``stride``, the
    last ones moved back inside the image; one window when the image is smaller than ``crop``."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            windows.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return windows


class HFAN(SequenceEvaluatedModule):
    """HFAN (module docstring). Defaults are the authors' HFAN-Small: MiT-b1 (PVTv2-b1) from
    ImageNet weights, head width 768, FAM and FAT on (``alignment``, ``adaptation`` off for the
    ablations), inference at short side 512 with 512 windows every 271 pixels."""

    method_name = "hfan"

    def __init__(
        self,
        backbone: str = "pvt_v2_b1",
        pretrained: bool = True,
        weights: Optional[str] = None,
        embed_dim: int = 768,
        alignment: bool = True,
        adaptation: bool = True,
        head_lr_scale: float = 10.0,
        test_scale: tuple[int, int] = (2048, 512),
        window: int = 512,
        window_stride: int = 271,
        optim: OptimizerRecipe = OptimizerRecipe(optimizer="adamw", lr=6e-5, weight_decay=0.01, decay_norm_and_bias=False,
                                                 schedule="polynomial", power=1.0, warmup_fraction=3000 / 160000,
                                                 warmup_start_factor=1e-6),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.network = HFANNetwork(backbone, pretrained, weights, embed_dim, alignment, adaptation)

    def forward(self, frames: Tensor, flows: Tensor) -> Tensor:
        return self.network(frames, flows)

    def optimizer_parameter_groups(self) -> list[dict[str, Any]]:
        """The encoder at the run's rate, the HFAN blocks and the head at ``head_lr_scale`` × it."""
        encoder = self.recipe.parameter_groups(self.network.encoder)
        head = self.recipe.parameter_groups(torch.nn.ModuleList([self.network.blocks, self.network.head]))
        return encoder + [group | {"lr_scale": self.hparams.head_lr_scale} for group in head]

    # ------------------------------------------------------------------------------- training

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["image"], batch["flow"])
        logits = F.interpolate(logits, size=batch["mask"].shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, batch["mask"], ignore_index=VOID)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    # ------------------------------------------------------------------------------ inference

    @torch.no_grad()
    def segment(self, frame: np.ndarray, flow: np.ndarray) -> np.ndarray:
        """The binary mask [H, W] uint8 of a frame and its flow image (module docstring, 6)."""
        height, width = frame.shape[:2]
        long_side, short_side = self.hparams.test_scale
        scale = min(long_side / max(height, width), short_side / min(height, width))
        size = (int(height * scale + 0.5), int(width * scale + 0.5))
        inputs = [F.interpolate(frame_tensor(x)[None].to(self.device), size=size, mode="bilinear", align_corners=False)
                  for x in (frame, flow)]
        total = inputs[0].new_zeros(1, 2, *size)
        count = inputs[0].new_zeros(1, 1, *size)
        for y1, y2, x1, x2 in sliding_windows(*size, self.hparams.window, self.hparams.window_stride):
            logits = self(inputs[0][..., y1:y2, x1:x2], inputs[1][..., y1:y2, x1:x2])
            total[..., y1:y2, x1:x2] += F.interpolate(logits, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
            count[..., y1:y2, x1:x2] += 1
        logits = F.interpolate(total / count, size=(height, width), mode="bilinear", align_corners=False)
        return logits.softmax(dim=1).argmax(dim=1)[0].to(torch.uint8).cpu().numpy()

    def init_sequence(self, item: Any) -> Any:
        if item.flows is None:
            raise ValueError("HFAN segments a frame with its optical flow: give data.flow_root (ZeroShotDAVISDataModule)")
        return item

    def step_sequence(self, state: Any, t: int, frame: np.ndarray) -> np.ndarray:
        return self.segment(frame, state.flows[t])
