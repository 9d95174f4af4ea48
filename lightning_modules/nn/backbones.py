"""Every backbone from one factory, timm's (the suite's iResNets and video ResNets are in its
registry, :mod:`lightning_modules.nn.registry`), with the two ways out when pretrained weights
cannot be had; and the one way to freeze a module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from torch import nn

from lightning_modules.nn import iresnet, video_resnet  # noqa: F401  registers the suite's models with timm
from lightning_modules.nn.iresnet import IResNet


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
    """A backbone mapping images to ``embedding_size``-d embeddings: an iResNet (``iresnet50`` ...,
    whose embedding ends in BatchNorm1d), or any timm model whose classifier is sized to the
    embedding, followed by BatchNorm1d as the iResNet embedding ends."""
    model = create_backbone(name, pretrained, weights, num_classes=embedding_size, drop_rate=dropout)
    return model if isinstance(model, IResNet) else nn.Sequential(model, nn.BatchNorm1d(embedding_size))


def freeze_(module: nn.Module) -> nn.Module:
    """Freeze ``module`` in place and return it: no parameter is trained, and it is in eval mode
    (BatchNorm statistics never move, dropout is off) now and after every ``train()`` of a
    :class:`~lightning_modules.base.VisionZooModule` holding it, which keeps modules marked
    ``frozen`` in eval mode. The module is not wrapped, so its checkpoint keys stay as they are."""
    module.requires_grad_(False).eval()
    module.frozen = True
    return module
