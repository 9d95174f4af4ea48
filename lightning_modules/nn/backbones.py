"""Backbones from timm, with the two ways out when pretrained weights cannot be had."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from lightning_modules.nn.iresnet import iresnet


def create_backbone(name: str, pretrained: bool, weights: str | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=...)``; ``weights`` loads a local file instead of the hub.

    Raises a clear error for an unknown model name, a missing weights file, and pretrained
    weights that cannot be fetched (no network), naming ``--model.weights PATH`` and
    ``--model.pretrained false`` as the ways out.
    """
    architecture = name.split(".")[0]
    if not timm.is_model(architecture):
        close = timm.list_models(f"*{architecture.split('_')[0]}*")[:10]
        raise ValueError(f"unknown timm backbone '{name}'; similar names: {', '.join(close) or 'none'}")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"--model.weights {path}: no such file; expected a state dict of '{name}' "
                "(.pth/.pt/.bin as saved by torch or timm, or .safetensors)"
            )
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as error:  # hub unreachable, file not cached (huggingface_hub errors are OSErrors)
        raise RuntimeError(
            f"could not fetch the pretrained weights of '{name}' ({type(error).__name__}: {error}). "
            f"Either give a local copy with `--model.weights PATH` or train without them with "
            f"`--model.pretrained false`."
        ) from error


def create_embedding_backbone(
    name: str, embedding_size: int, pretrained: bool = False, weights: str | None = None, dropout: float = 0.0
) -> nn.Module:
    """A backbone mapping images to ``embedding_size``-d embeddings: an iResNet of
    :mod:`lightning_modules.nn.iresnet` (``iresnet50`` ...), or any timm model whose classifier
    is sized to the embedding, followed by BatchNorm1d as the iResNet embedding ends."""
    if name.startswith("iresnet"):
        if pretrained or weights:
            raise ValueError(f"'{name}' is trained from scratch here; set pretrained false and weights null")
        return iresnet(name, embedding_size, dropout)
    model = create_backbone(name, pretrained, weights, num_classes=embedding_size, drop_rate=dropout)
    return nn.Sequential(model, nn.BatchNorm1d(embedding_size))


class FrozenFeatures(nn.Module):
    """A timm feature extractor whose parameters are frozen and which always stays in eval
    mode (BatchNorm statistics are never updated, dropout is off)."""

    def __init__(self, name: str, pretrained: bool, weights: str | None, out_indices: Sequence[int]) -> None:
        super().__init__()
        self.model = create_backbone(name, pretrained, weights, features_only=True, out_indices=tuple(out_indices))
        self.model.requires_grad_(False)
        self.model.eval()
        self.channels: list[int] = self.model.feature_info.channels()

    def train(self, mode: bool = True) -> FrozenFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model(x)
