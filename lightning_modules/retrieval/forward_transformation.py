"""The forward transformation of a stored old gallery (BiCT, arXiv 2204.13919, card 10; DMU's
forward adaptation, card 11). Neither's code is public: a reconstruction, UNVERIFIED.

When the gallery's images may not be read again (privacy), a new model cannot re-embed it; its
stored old features are moved into the new model's space instead:

1. Stage 1 trains the new model backward-compatibly (BCT, ``configs/gldv2/bct_r50.yaml`` with the
   paper's influence weight λ, or DMU, ``configs/gldv2/dmu_r50.yaml``).
2. Stage 2 (this module) freezes the new model (``new_checkpoint``) and the old one
   (``old_checkpoint``) and trains ψ (:class:`~lightning_modules.nn.compatibility.ResidualTransformation`,
   the identity at initialisation) on the *training* images only: ψ(φ_old(x)) regresses to
   φ_new(x), L = ‖ψ(φ_old(x)) − φ_new(x)‖², both L2-normalised.
3. Test: ψ is applied to the old gallery's features (features, never images): new queries
   against ψ(old gallery), ``new_upgraded/<metric>``, beside new→old and the rest of the
   compatibility table.
4. Sequential upgrades (v1 → v2 → v3): ``stored_gallery`` names the previous upgrade's
   checkpoint (ψ₁₂ and its old model v1); the stored gallery is then ψ₁₂(φ_v1(g)), the old
   system is v2's queries against it, and this run's ψ₂₃ (trained on v2 → v3 training pairs)
   moves it on: new→ψ₂₃(ψ₁₂(φ_v1(g))).

Defaults (UNVERIFIED): two residual blocks of width 1024, Adam 1e-3 with a cosine schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_modules.nn.backbones import freeze_
from lightning_modules.nn.compatibility import ResidualTransformation
from lightning_modules.recipe import OptimizerRecipe
from lightning_modules.retrieval.model import LandmarkRetrieval, frozen_embedding, load_old_model


class ForwardTransformation(LandmarkRetrieval):
    """ψ of a stored old gallery (module docstring). Takes :class:`LandmarkRetrieval`'s
    arguments (the embedding is replaced by the frozen new model's); ``old_checkpoint`` and
    ``new_checkpoint`` are required."""

    method_name = "forward_transformation"
    upgrades_old_gallery = True

    def __init__(self, *args: Any, new_checkpoint: Optional[str] = None, stored_gallery: Optional[str] = None,
                 hidden_size: int = 1024, blocks: int = 2,
                 optim: OptimizerRecipe = OptimizerRecipe(optimizer="adam", lr=1e-3, schedule="cosine"),
                 **kwargs: Any) -> None:
        super().__init__(*args, optim=optim, **kwargs)
        if self.old_model is None or new_checkpoint is None:
            raise ValueError("the forward transformation needs model.init_args.old_checkpoint (the old model) and "
                             "model.init_args.new_checkpoint (the new model of the backward-compatible stage)")
        self.embedding = frozen_embedding(new_checkpoint, "new_checkpoint", self.hparams.embedding_size)
        self.transformation = ResidualTransformation(self.hparams.embedding_size, hidden_size, blocks)
        self.previous_old_model: Optional[LandmarkRetrieval] = None
        self.previous_transformation: Optional[ResidualTransformation] = None
        if stored_gallery is not None:
            self.previous_old_model, self.previous_transformation = load_transformation(stored_gallery)
            self.has_stored_gallery = True

    def stored_features(self, images: Tensor) -> Tensor:
        """The gallery as the previous upgrade left it: ψ_previous(φ_previous_old(images))."""
        return self.previous_transformation(self.previous_old_model.embed(images).float())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The previous upgrade stays in its own checkpoint (``stored_gallery``), as the old model."""
        for key in [k for k in checkpoint["state_dict"] if k.startswith("previous_")]:
            del checkpoint["state_dict"][key]
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        for name in ("previous_old_model", "previous_transformation"):
            module = getattr(self, name)
            if module is not None:
                checkpoint["state_dict"].update({f"{name}.{k}": v for k, v in module.state_dict().items()})

    def configure_model(self) -> None:
        """No classifier: only ψ is trained."""

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images = batch["image"]
        with torch.no_grad():
            old, new = self.old_model(images).float(), self(images).float()
        loss = (self.transformation(old) - new).pow(2).sum(dim=1).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def evaluation_outputs(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        outputs = super().evaluation_outputs(batch)
        if self.previous_transformation is not None:
            outputs["stored_embedding"] = self.stored_features(batch["image"])
        outputs["upgraded_embedding"] = self.transformation(outputs.get("stored_embedding", outputs["old_embedding"]))
        return outputs


def load_transformation(path: str) -> tuple[LandmarkRetrieval, ResidualTransformation]:
    """The old model and ψ of a :class:`ForwardTransformation` checkpoint, frozen."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model.stored_gallery {file}: no such file; expected the last.ckpt of the previous "
                                "upgrade's forward-transformation run")
    checkpoint = torch.load(file, map_location="cpu", weights_only=False)
    hparams = checkpoint.get("hyper_parameters", {})
    weights = {k[len("transformation."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("transformation.")}
    if not weights or not hparams.get("old_checkpoint"):
        raise ValueError(f"model.stored_gallery {file} is not a forward-transformation checkpoint (no transformation.* "
                         "weights or old_checkpoint)")
    old_model, _ = load_old_model(hparams["old_checkpoint"])
    transformation = ResidualTransformation(hparams["embedding_size"], hparams["hidden_size"], hparams["blocks"])
    transformation.load_state_dict(weights)
    return old_model, freeze_(transformation)
