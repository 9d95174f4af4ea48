"""Landmark retrieval trained with the Anti-Collapse loss (arXiv 2407.03106, 2024; method card 13
of ``face_and_retrieval.md``): the coding rate of the class proxies is kept high so the embedding
space does not collapse, beside a Proxy-Anchor alignment. Plain torch parts in
:mod:`lightning_modules.nn.anti_collapse`.

1. The embedding is :class:`~lightning_modules.retrieval.model.LandmarkRetrieval`'s (GeM,
   whitening FC, BatchNorm, L2 normalisation), its backbone's BatchNorm layers frozen
   (``freeze_batchnorm``, the paper's "frozen" BN); no margin-softmax head.
2. C learnable proxies (randn/8); L = w_align·L_PA + w_ac·exp(−γ2·R), R the coding rate of the
   batch's classes' normalised proxies (``variant: batch_proxy``; ``all_proxy``, ``pair``).
3. Recipe (``antico_runs.sh``): Adam, lr 1e-5, weight decay 4e-4, the proxies at 2000× the lr;
   w_align 0.0035, ε 0.5, γ1 = γ2 = 1, α 64, δ 0.1.

The paper's setting is CUB-200 / Cars196 / SOP (BN-Inception or ResNet-50, "double" pooling of
average and max, batches of 90 with 2 images a class, 100/300/400 epochs); the suite applies the
loss to GLDv2 with its own sampler and pooling (deviations: GeM instead of average + max pooling,
random batches instead of 2 images a class).
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from lightning_modules.nn.anti_collapse import AntiCollapseLoss
from lightning_modules.nn.backbones import freeze_
from lightning_modules.recipe import OptimizerRecipe
from lightning_modules.retrieval.model import LandmarkRetrieval


class AntiCollapseRetrieval(LandmarkRetrieval):
    """Retrieval with the Anti-Collapse loss (module docstring). Takes :class:`LandmarkRetrieval`'s
    arguments (its ``head`` is not used) and the loss's: ``variant``, ``align_weight``,
    ``anti_collapse_weight``, ``epsilon``, ``gamma1``, ``gamma2``, ``proxy_lr_scale`` (2000)."""

    method_name = "anticollapse"

    def __init__(self, *args: Any, variant: Literal["batch_proxy", "all_proxy", "pair"] = "batch_proxy",
                 align_weight: float = 0.0035, anti_collapse_weight: float = 1.0, epsilon: float = 0.5, gamma1: float = 1.0,
                 gamma2: float = 1.0, proxy_lr_scale: float = 2000.0, freeze_batchnorm: bool = True,
                 optim: OptimizerRecipe = OptimizerRecipe(optimizer="adam", lr=1e-5, weight_decay=4e-4, schedule="constant"),
                 **kwargs: Any) -> None:
        super().__init__(*args, optim=optim, **kwargs)
        self.proxy_lr_scale = proxy_lr_scale
        self.criterion = (AntiCollapseLoss(self.hparams.num_classes, self.hparams.embedding_size, variant, align_weight,
                                           anti_collapse_weight, epsilon, gamma1, gamma2)
                          if self.hparams.num_classes is not None else None)
        if freeze_batchnorm:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    freeze_(module)

    def configure_model(self) -> None:
        """No margin-softmax head: the proxies are the loss's."""

    def optimizer_parameter_groups(self) -> list[dict[str, Any]]:
        proxies = [self.criterion.proxies]
        groups = self.recipe.parameter_groups(self, exclude=proxies)
        return groups + [{"params": proxies, "weight_decay": self.recipe.weight_decay, "lr_scale": self.proxy_lr_scale}]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, alignment, rate = self.criterion(self(batch["image"]), batch["label"])
        size = len(batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({"train/proxy_anchor": alignment, "train/coding_rate": rate}, batch_size=size)
        return loss
