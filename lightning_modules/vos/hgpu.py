"""HGPU: Hierarchical Graph Pattern Understanding for zero-shot video object segmentation (Pei,
Shen, Yao et al., IEEE TIP; NUST-Machine-Intelligence-Laboratory/HGPU @8ddefcf466; method card
3). Plain torch parts in :mod:`lightning_modules.nn.co_attention`, the pair training and
evaluation in :mod:`lightning_modules.vos.frame_pairs`.

1. Three ImageNet ResNet-101s, not sharing weights, read the graph's nodes I_t, I_t+1 and the
   flow image O_t.
2. At res2 each edge (I_t, O), (I_t+1, O), (I_t, I_t+1) is read out, FR(MACU(a), MACU(b)), and
   the three readouts are the inputs of the next stage: from res3 on the third branch carries
   the frame-frame node, not the flow.
3. At res3, res4 and res5, per edge: messages by soft attention and tanh co-attention
   (``stacks``: 1 in the authors' ``'pre'`` stage, 5 in ``'main'``), each end updated by a
   1×1 ConvGRU (message as input, node as hidden state), the pair read out by MACU and FR into
   the next stage.
4. Decoder (MAUD): a refinement map per level of node 3, fused into the gate c; each frame's
   mask comes from the global convolution + refinement decoder on its node's levels with the
   maps appended, times c.
5. Loss: the hard-negative-weighted BCE of both masks, L = ½(L_t + L_t+1); no contour loss.
6. Training (``train_HGPU.py``): SGD momentum 0.9, weight decay 5e-4, decoder 1e-2, encoder
   1e-3, no schedule, 512² pairs, flip, scale 0.75-1.25, rotation ±10°; stage ``'pre'`` on
   YouTube-VOS, then ``'main'`` on DAVIS 2016 train (30 epochs each). Inference: overlapping
   pairs, flip averaged, then the dense CRF (``crf``; off for the CRF-free evaluation).

Deviations from the authors' code:

- ``test_HGPU.py`` evaluates 11 DAVIS 2016 val videos with one message stack and 9 with five, a
  per-video choice made on the test set; here one ``stacks`` serves every video.
- Without HED edge maps (``data.edge_root``) the hard negatives come from Sobel edges.
- See :mod:`lightning_modules.nn.co_attention` for the modules the code creates but never uses.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_modules.nn.co_attention import HGPUNetwork, hard_negative_bce
from lightning_modules.recipe import OptimizerRecipe
from lightning_modules.vos.frame_pairs import FramePairSegmenter


class HGPU(FramePairSegmenter):
    """HGPU (module docstring); the frame-pair arguments of :class:`FramePairSegmenter`
    (``stacks`` 5: the authors' ``'main'``, 1: ``'pre'``) and the decoder at 1e-2 (the authors'
    ``train_HGPU.py``)."""

    method_name = "hgpu"
    network_class = HGPUNetwork

    def __init__(
        self,
        optim: OptimizerRecipe = OptimizerRecipe(optimizer="sgd", lr=1e-2, momentum=0.9, weight_decay=5e-4,
                                                 schedule="constant"),
        **kwargs: Any,
    ) -> None:
        super().__init__(optim=optim, **kwargs)

    def forward(self, frame1: Tensor, frame2: Tensor, flow: Tensor) -> tuple[Tensor, Tensor]:
        return self.network(frame1, frame2, flow)

    def pair_masks(self, frame1: Tensor, frame2: Tensor, flow: Tensor) -> tuple[Tensor, Tensor]:
        return self(frame1, frame2, flow)

    def pair_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        mask1, mask2 = self(batch["image"], batch["image2"], batch["flow"])
        loss = 0.5 * (hard_negative_bce(mask1, batch["mask"], batch["hard_negatives"])
                      + hard_negative_bce(mask2, batch["mask2"], batch["hard_negatives2"]))
        return {"loss": loss}
