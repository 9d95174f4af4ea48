"""HCPN: Hierarchical Co-attention Propagation Network for zero-shot video object segmentation
(Pei, Shen, Yao, Tang et al., IEEE TIP; NUST-Machine-Intelligence-Laboratory/HCPN @898321d2ec;
method card 4). Plain torch parts in :mod:`lightning_modules.nn.co_attention`, the pair
training and evaluation in :mod:`lightning_modules.vos.frame_pairs`.

1. Three ImageNet ResNet-101s, not sharing weights, read I_t, I_t+1 and the flow image O_t.
2. At res3, res4 and res5 a parallel co-attention (PCAM: five stacks of soft attention and
   tanh co-attention) relates each frame to the flow; each frame branch adds the flow features
   attended at its positions, h ← ReLU(b̂ + h).
3. A cross co-attention (CCAM) fuses the flow's two soft-attended versions, GAF(GAC(b₁),
   GAC(b₂)), into the flow branch, h ← ReLU(· + h); every branch goes on to its next stage.
4. Each frame's four levels are GAC([frame ‖ flow]); a contour map per level (fused by a 3×3
   convolution and a sigmoid: the predicted contour) is appended to its level, and the global
   convolution + refinement decoder gives the frame's mask.
5. Loss: the hard-negative-weighted BCE of both masks and both contours,
   L = ½(L_mask,t + L_mask,t+1) + ½·½(L_ctr,t + L_ctr,t+1).
6. Training (``train.py``, ``args.py``): SGD momentum 0.9, weight decay 5e-4, decoder 1e-3,
   encoder 1e-4, no schedule; 512² pairs, flip, scale 0.75-1.25, rotation ±10°; 25 epochs on
   YouTube-VOS, then 25 on DAVIS 2016 train. Inference: overlapping pairs, flip averaged, then
   the dense CRF (``crf``; off for the CRF-free evaluation).

Deviations from the authors' code:

- The contour targets are the masks' 3×3 morphological gradients, computed here, where the
  authors read precomputed ``Annotations_ctr`` (not published); and each frame gets its own
  (the released loader reads frame t's contour for both frames, card 4).
- Without HED edge maps (``data.edge_root``) the hard negatives come from Sobel edges.
- See :mod:`lightning_modules.nn.co_attention` for the modules the code creates but never uses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_modules.nn.co_attention import HCPNNetwork, hard_negative_bce, mask_contour
from lightning_modules.recipe import OptimizerRecipe
from lightning_modules.vos.frame_pairs import FramePairSegmenter


class HCPN(FramePairSegmenter):
    """HCPN (module docstring); the frame-pair arguments of :class:`FramePairSegmenter`, the
    contour loss weight 0.5 and the decoder at 1e-3 (the authors' ``args.py``)."""

    method_name = "hcpn"
    network_class = HCPNNetwork

    def __init__(
        self,
        contour_weight: float = 0.5,
        optim: OptimizerRecipe = OptimizerRecipe(optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=5e-4,
                                                 schedule="constant"),
        **kwargs: Any,
    ) -> None:
        super().__init__(optim=optim, **kwargs)

    def forward(self, frame1: Tensor, frame2: Tensor, flow: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.network(frame1, frame2, flow)

    def pair_masks(self, frame1: Tensor, frame2: Tensor, flow: Tensor) -> tuple[Tensor, Tensor]:
        mask1, _, mask2, _ = self(frame1, frame2, flow)
        return mask1, mask2

    def pair_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        mask1, contour1, mask2, contour2 = self(batch["image"], batch["image2"], batch["flow"])
        mask_loss = contour_loss = 0.0
        for mask, contour, target, hard in ((mask1, contour1, batch["mask"], batch["hard_negatives"]),
                                            (mask2, contour2, batch["mask2"], batch["hard_negatives2"])):
            contour_target = torch.where(target == 255, 255, mask_contour(target))
            mask_loss = mask_loss + 0.5 * hard_negative_bce(mask, target, hard)
            contour_loss = contour_loss + 0.5 * hard_negative_bce(contour, contour_target, hard)
        return {"loss": mask_loss + self.hparams.contour_weight * contour_loss, "mask_loss": mask_loss,
                "contour_loss": contour_loss}
