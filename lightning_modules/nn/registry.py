"""The suite's own models (iResNets, video ResNets) in timm's model registry, so that one factory,
``timm.create_model`` through :func:`lightning_modules.nn.backbones.create_backbone`, builds every
backbone, and ``timm.list_models(module="iresnet")`` lists them as timm's own.

They have no published weights here: ``pretrained=True`` is an error, and a local ``weights``
file (``pretrained_cfg_overlay={"file": PATH}``, what ``create_backbone`` passes) is loaded
strictly with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from timm.models import register_model
from torch import nn


def register_scratch_model(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``build(**kwargs)`` in timm's registry under its own name (decorator)."""

    @functools.wraps(build)
    def entrypoint(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: dict | None = None,
                   cache_dir: Any = None, **kwargs: Any) -> nn.Module:
        weights = (pretrained_cfg_overlay or {}).get("file")
        if pretrained and weights is None:
            raise ValueError(f"'{build.__name__}' has no pretrained weights to fetch: set pretrained false, or give "
                             "a state dict of this model with --model.init_args.weights PATH")
        model = build(**kwargs)
        if weights is not None:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model

    return register_model(entrypoint)
