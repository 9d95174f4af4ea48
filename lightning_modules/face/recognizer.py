"""Face recognition as million-way classification with a margin softmax (ArcFace, CosFace,
combined margin, CurricularFace, NPCFace, Search-Softmax's loss), the class centres sharded
over all ranks (the model-parallel softmax of insightface's ``arcface_torch``).

1. A backbone (iResNet-50/100 of ArcFace, or any timm model) maps an aligned 112x112 face to
   a 512-d embedding.
2. A margin head turns the cosines between normalised embeddings and normalised class
   centres into logits: the margin acts on the target class only.
3. The centres live in :class:`~lightning_modules.distributed.model_parallel_softmax.ModelParallelSoftmax`:
   each rank owns a contiguous slice, embeddings are all-gathered, and the loss equals the
   single-device softmax. Logits are computed ``softmax_options.chunk_classes`` classes at a
   time, so that a rank's temporaries are (global batch × chunk_classes), whatever its share of
   the classes, and the element-wise work of each chunk can be fused by ``torch.compile``
   (``softmax_options.compile_chunks``, opt-in until its CUDA test has run on a GPU); Partial FC
   (``softmax_options.sample_rate``) and KNN softmax (``softmax_options.knn_neighbours``) select
   the training classes (:class:`~lightning_modules.distributed.model_parallel_softmax.SoftmaxOptions`).
   The centres are kept out of DDP's gradient all-reduce; a checkpoint keeps them, and their
   momentum, in one file per rank beside it, so that no rank ever holds the whole head and the
   checkpoint resumes on any number of ranks (:mod:`~lightning_modules.distributed.sharded_state`).
4. Validation follows insightface ``eval/verification.py`` (:mod:`lightning_modules.face.base`):
   embeddings of the image and of its horizontal flip are summed, then the 10-fold accuracy
   of each ``.bin`` pair set.

Recipe defaults, the current arcface_torch (``configs/base.py``, ``train_v2.py``; method card
§0): SGD, momentum 0.9, weight decay 5e-4 on every parameter, lr 0.1, no warm-up, a linear
(polynomial of power 1) decay, the backbone's gradient norm clipped at 5 (``optim``,
:class:`~lightning_modules.recipe.OptimizerRecipe`). The polynomial decay is UNVERIFIED for the
papers; ``optim.schedule: step`` with ``optim.milestones`` gives the older step schedules
(CurricularFace: x0.1 at 10, 18, 22, no decay on BatchNorm, biases and PReLU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_modules.distributed.model_parallel_softmax import SoftmaxOptions
from lightning_modules.face.base import FaceRecognitionModule
from lightning_modules.margin_softmax import MarginSoftmaxTraining
from lightning_modules.nn.backbones import create_embedding_backbone
from lightning_modules.nn.margins import CombinedMarginHead, MarginHead
from lightning_modules.recipe import OptimizerRecipe


class MarginSoftmaxRecognizer(MarginSoftmaxTraining, FaceRecognitionModule):
    """Backbone + margin head over model-parallel class centres (see the module docstring)."""

    def __init__(
        self,
        num_classes: int,
        head: MarginHead | None = None,
        backbone: str = "iresnet50",
        embedding_size: int = 512,
        dropout: float = 0.0,
        pretrained: bool = False,
        weights: str | None = None,
        softmax_options: SoftmaxOptions = SoftmaxOptions(),
        optim: OptimizerRecipe = OptimizerRecipe(
            lr=0.1, weight_decay=5e-4, schedule="polynomial", power=1.0, backbone_grad_clip_norm=5.0
        ),
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["head"])
        # A dict where the hyperparameters come back from a config or a checkpoint.
        self.softmax_options = softmax_options if isinstance(softmax_options, SoftmaxOptions) else SoftmaxOptions(**softmax_options)
        self.head = head if head is not None else CombinedMarginHead()
        self.backbone = create_embedding_backbone(backbone, embedding_size, pretrained, weights, dropout)

    @property
    def method_name(self) -> str:
        """The head's name, ``knn_softmax`` with KNN class selection, ``<head>_partial_fc`` with
        Partial FC: runs of different class selections never share a run directory."""
        if self.softmax_options.knn_neighbours:
            return "knn_softmax"
        return f"{self.head.name}_partial_fc" if self.softmax_options.sample_rate < 1.0 else self.head.name

    def forward(self, images: Tensor) -> Tensor:
        """Unnormalised embeddings [B, D]."""
        if images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images)
