"""LCM: Learning position and target Consistency for Memory-based video object segmentation (Hu,
Huang, Chen, Tai, Yao, Zhang, CVPR 2021, arXiv 2104.04329; method card 2). Plain torch parts in
:mod:`lightning_modules.nn.lcm`.

No authors' code is public: the global retrieval is STM's code (card 1); the two modules' inner
layouts are the card's reconstruction [UNVERIFIED], each switchable for ablation.

Inference, per sequence (STM's loop, :class:`~lightning_modules.vos.stm.STM`):

1. Frame 0 is memorised with its ground-truth masks (keys, values, position keys, masks at res4).
2. Frame t: the global retrieval module (GRM) reads the memory {frame 0, every
   ``memory_every``-th frame, frame t−1} as STM does.
3. The position guidance module (PGM) matches position-encoded local keys of frame t against
   those of frame t−1 only and reads t−1's predicted mask into a location map.
4. The object relation module (ORM) relates the object vector pooled from frame 0's memory under
   its ground-truth mask to every position of frame t.
5. The decoder refines [GRM read ‖ query value ‖ PGM map ‖ ORM maps] with res3 and res2; soft
   aggregation of the objects; argmax.

Training: STM's (3-frame clips, cross-entropy on the aggregated logits of frames 1 and 2, Adam
1e-5, frozen BatchNorm, the growing skip; static-image stage 1 then video). In a clip, PGM reads
frame 0's ground truth for frame 1 and frame 1's soft prediction for frame 2; ORM always frame 0's
ground truth. No auxiliary loss (card 2 (3), UNVERIFIED).

Deviations from the paper (no code to deviate from): every internal layout above is a
reconstruction: local keys of 64 channels, a DETR-style sine encoding with temperature 100 times
a learnable scale (initially 3, so that the position term decides between identical blobs about
ten cells apart), the location map read from t−1's mask rather than its values, and ORM as a
relation map plus a gated object-value projection of 64 channels.
"""

from __future__ import annotations

from typing import Any

from lightning_modules.nn.lcm import LCMNetwork
from lightning_modules.vos.stm import STM


class LCM(STM):
    """LCM (module docstring): STM's defaults (card 1) plus ``position_guidance`` and
    ``object_relation`` (both on; off for the ablations) and their sizes."""

    method_name = "lcm"

    def __init__(
        self,
        position_guidance: bool = True,
        object_relation: bool = True,
        position_key_dim: int = 64,
        position_temperature: float = 100.0,
        position_scale: float = 3.0,
        relation_dim: int = 64,
        **stm_arguments: Any,
    ) -> None:
        """LCM's own switches and sizes; ``stm_arguments`` are STM's (backbone, key/value sizes,
        memory interval, ``optim`` ...)."""
        super().__init__(**stm_arguments)

    def build_network(self) -> LCMNetwork:
        h = self.hparams
        return LCMNetwork(h.backbone, h.pretrained, h.weights, h.key_dim, h.value_dim, h.decoder_dim,
                          h.position_guidance, h.object_relation, h.position_key_dim, h.position_temperature,
                          h.position_scale, h.relation_dim)
