"""The Lightning glue that HCPN and HGPU share (cards 3-4): both segment a pair of consecutive
frames I_t, I_t+1 with the colour-coded flow of I_t, train on the pairs of
:class:`~datamodules.davis_zero_shot.ZeroShotDAVISDataModule` (``training_items: pairs``) with
the hard-negative-weighted BCE, and are evaluated by the sequence loop as the authors' test
scripts do:

1. the pairs (f0, f1), (f1, f2), ... each give both frames' masks and the later write wins, so
   frame t < T−1 takes the first mask of the pair (t, t+1) and the last frame the second mask
   of (T−2, T−1);
2. a pair is resized to ``input_size`` squared, predicted, predicted again horizontally flipped
   (frames and flow image alike, ``flip_test``) and the two averaged, resized back to the frame;
3. optionally (``crf``) refined by a dense CRF (:mod:`lightning_modules.nn.dense_crf`); the
   mask is the probability > 0.5.

Optimisation as the authors' two SGD optimisers (momentum 0.9, weight decay 5e-4, no schedule):
the decoder at the recipe's rate, the encoder (the three ResNets with their attention modules)
at ``encoder_lr_scale`` times it.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.vos_clips import frame_tensor
from lightning_modules.recipe import OptimizerRecipe
from lightning_modules.sequence_evaluation import SequenceEvaluatedModule
from lightning_modules.vos.stm import load_network_weights


class FramePairSegmenter(SequenceEvaluatedModule):
    """Base of HCPN and HGPU (module docstring): their common arguments, the network
    (``network_class``, whose ``decoder`` is the part at the full rate) built from them; a
    subclass defines :meth:`pair_losses` and :meth:`pair_masks`.

    Defaults from the authors' code: ResNet-101 (torchvision's ImageNet weights,
    ``resnet101.tv_in1k``), five co-attention stacks, decoder width 256 and side-map width 64,
    the pyramid convolution as the code (``pyramid_rates_as_paper`` false), 512² inputs, flip
    test and CRF on, the encoder at 0.1× the rate. ``init_checkpoint``: the checkpoint of the
    earlier stage (YouTube-VOS) that starts this run."""

    network_class: type[torch.nn.Module]

    def __init__(
        self,
        optim: OptimizerRecipe,
        backbone: str = "resnet101.tv_in1k",
        pretrained: bool = True,
        weights: Optional[str] = None,
        stacks: int = 5,
        decoder_width: int = 256,
        side_width: int = 64,
        pyramid_rates_as_paper: bool = False,
        input_size: int = 512,
        flip_test: bool = True,
        crf: bool = True,
        encoder_lr_scale: float = 0.1,
        init_checkpoint: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.network = self.network_class(backbone, pretrained, weights, stacks, decoder_width, side_width,
                                          pyramid_rates_as_paper)
        if init_checkpoint is not None:
            load_network_weights(self.network, init_checkpoint)

    def pair_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The loss terms of a training batch; ``loss`` is the total."""
        raise NotImplementedError

    def pair_masks(self, frame1: Tensor, frame2: Tensor, flow: Tensor) -> tuple[Tensor, Tensor]:
        """Mask probabilities [B, 1, H, W] of both frames."""
        raise NotImplementedError

    def optimizer_parameter_groups(self) -> list[dict[str, Any]]:
        decoder = list(self.network.decoder.parameters())
        encoder = self.recipe.parameter_groups(self.network, exclude=decoder)
        return [group | {"lr_scale": self.hparams.encoder_lr_scale} for group in encoder] + \
            self.recipe.parameter_groups(self.network.decoder)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        losses = self.pair_losses(batch)
        self.log_dict({f"train/{name}": value for name, value in losses.items()}, prog_bar=True,
                      batch_size=len(batch["image"]))
        return losses["loss"]

    # ------------------------------------------------------------------------------ inference

    @torch.no_grad()
    def segment_pair(self, frame1: np.ndarray, frame2: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Foreground probabilities [H, W] of both frames (module docstring, 2)."""
        height, width = frame1.shape[:2]
        size = (self.hparams.input_size, self.hparams.input_size)
        inputs = [F.interpolate(frame_tensor(x)[None].to(self.device), size=size, mode="bilinear", align_corners=False)
                  for x in (frame1, frame2, flow)]
        masks = torch.cat(self.pair_masks(*inputs), dim=1)
        if self.hparams.flip_test:
            flipped = self.pair_masks(*(x.flip(-1) for x in inputs))
            masks = (masks + torch.cat(flipped, dim=1).flip(-1)) / 2
        masks = F.interpolate(masks.float(), size=(height, width), mode="bilinear", align_corners=False)[0]
        return masks[0].cpu().numpy(), masks[1].cpu().numpy()

    def init_sequence(self, item: Any) -> Any:
        if item.flows is None:
            raise ValueError(f"{self.method_name} segments frame pairs with their optical flow: give data.flow_root "
                             "(ZeroShotDAVISDataModule)")
        return item

    def step_sequence(self, item: Any, t: int, frame: np.ndarray) -> np.ndarray:
        last = len(item.frames) - 1
        first = min(t, max(last - 1, 0))
        pair = self.segment_pair(item.frames[first], item.frames[min(first + 1, last)], item.flows[first])
        probability = pair[0] if t == first else pair[1]
        if self.hparams.crf:
            from lightning_modules.nn.dense_crf import dense_crf

            return dense_crf(frame, probability)
        return (probability > 0.5).astype(np.uint8)
