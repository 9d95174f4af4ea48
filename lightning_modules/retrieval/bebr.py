"""BEBR: binary embedding-based retrieval with recurrent binarization (Gan, Ge, Zhou et al.,
"Binary Embedding-based Retrieval at Tencent", KDD 2023, arXiv 2302.08714; method card 12 of
``face_and_retrieval.md``). No public code: the card's structure, every constant UNVERIFIED.

1. A frozen float model (``float_checkpoint``: a :class:`~lightning_modules.retrieval.model.LandmarkRetrieval`
   run, e.g. ``baseline_r50``) embeds the training images; only its L2-normalised embeddings f
   are used: embedding to embedding, no labels, the backbone never trained.
2. The recurrent binarizer (:class:`~lightning_modules.nn.binarization.RecurrentBinarizer`):
   1 + u rounds (``extra_rounds`` u) of m bits (``code_bits``), sign with the straight-through
   gradient, each round coding the residual the previous ones left; reconstruction f̃ = Σ_t x̂_t.
3. Self-discrimination: NCE of f̃_i against f_i, the negatives a queue (``queue_size``) of the
   float embeddings of earlier batches of every rank, only the ``hard_negatives`` most similar
   with that option; τ = ``temperature``. Plus ``reconstruction_weight`` · ‖f̃_i − f_i‖² (a
   reconstruction, not in the card): residual coding needs x̂_t to follow the embedding's scale,
   which the NCE of the normalised f̃ leaves free (without it, on the mini set, the second
   round only repeated the first and u = 1 fell below u = 0).
4. Backward-compatible binary training (``old_checkpoint``: an earlier BEBR run, its binarizer
   on the old float model): L = L_self + λ·NCE(f̃_i, õ_i), õ_i the old system's reconstruction of
   the same image (old float model, old binarizer), the negatives a queue of old
   reconstructions; λ = ``comp_weight``.
5. Test (:class:`~benchmarks.metrics.retrieval.BinaryRetrievalMetric`): the codes of the query
   and gallery sets searched by Hamming distance (faiss ``IndexBinaryFlat`` and
   ``IndexBinaryHNSW``) and re-ranked in the reconstructed space, beside the frozen float
   embeddings, with bits, index bytes and search time; the unprefixed metrics are the exhaustive
   search of the reconstructions. With an old BEBR run, the compatibility table of the
   reconstructions: new queries against the old system's gallery, decoded by the old decoder.

Defaults (UNVERIFIED): m = the embedding size, u = 1, one residual block of width 1024 in each
MLP, τ = 0.07 (MoCo's), a queue of 4096, all of it as negatives, λ = 1, reconstruction weight 1,
Adam 1e-3 with a cosine schedule.

Deviations from the paper: the float embeddings are computed from the training images at every
step (with the training augmentation) rather than extracted once, which costs the frozen
model's forward pass; BEBR's symmetric distance calculation (lookup tables over the code bytes)
is replaced by the inner product of the decoded reconstructions, the same ranking without its
speed.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.metrics.base import BenchmarkMetric
from benchmarks.metrics.retrieval import BinaryRetrievalMetric, BinarySearchOptions
from lightning_modules.base import Stage
from lightning_modules.distributed.comm import all_gather
from lightning_modules.distributed.sharded_state import read_checkpoint
from lightning_modules.nn.backbones import freeze_
from lightning_modules.nn.binarization import RecurrentBinarizer, queue_nce_loss
from lightning_modules.nn.contrastive import FeatureQueue
from lightning_modules.recipe import OptimizerRecipe
from lightning_modules.retrieval.model import LandmarkRetrieval, as_options, frozen_embedding


class BinaryEmbeddingRetrieval(LandmarkRetrieval):
    """BEBR (module docstring). Takes :class:`LandmarkRetrieval`'s arguments for the float
    model's shape (its weights come from ``float_checkpoint``, required); ``old_checkpoint`` is
    an earlier BEBR run (the compatible variant)."""

    method_name = "bebr"

    def __init__(self, *args: Any, float_checkpoint: Optional[str] = None, old_checkpoint: Optional[str] = None,
                 code_bits: Optional[int] = None, extra_rounds: int = 1, hidden_size: int = 1024, blocks: int = 1,
                 temperature: float = 0.07, queue_size: int = 4096, hard_negatives: Optional[int] = None,
                 comp_weight: float = 1.0, reconstruction_weight: float = 1.0, binary_search: BinarySearchOptions = BinarySearchOptions(),
                 optim: OptimizerRecipe = OptimizerRecipe(optimizer="adam", lr=1e-3, schedule="cosine"),
                 **kwargs: Any) -> None:
        super().__init__(*args, optim=optim, **kwargs)
        if float_checkpoint is None:
            raise ValueError("BEBR binarizes a frozen float model: set model.init_args.float_checkpoint to its last.ckpt")
        size = self.hparams.embedding_size
        self.embedding = frozen_embedding(float_checkpoint, "float_checkpoint", size)
        self.binarizer = RecurrentBinarizer(size, code_bits or size, extra_rounds, hidden_size, blocks)
        self.temperature, self.hard_negatives, self.comp_weight = temperature, hard_negatives, comp_weight
        self.reconstruction_weight = reconstruction_weight
        self.binary_search = as_options(binary_search, BinarySearchOptions)
        self.float_queue = FeatureQueue(queue_size, size)
        self.old_queue: Optional[FeatureQueue] = None
        if old_checkpoint is not None:
            self.old_model = load_binary_model(old_checkpoint)
            if self.old_model.hparams.embedding_size != size:
                raise ValueError(f"model.old_checkpoint {old_checkpoint} reconstructs {self.old_model.hparams.embedding_size}-d "
                                 f"embeddings, this model {size}-d")
            self.old_queue = FeatureQueue(queue_size, size)

    def configure_model(self) -> None:
        """No classifier: only the binarizer is trained."""

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images = batch["image"]
        with torch.no_grad():
            features = self(images).float()
            old = self.old_model.embed(images).float() if self.old_model is not None else None
        _, reconstruction = self.binarizer(features)
        loss_self = queue_nce_loss(reconstruction, features, self.float_queue.negatives(), self.temperature, self.hard_negatives)
        losses = {"train/loss_self": loss_self}
        loss = loss_self
        if self.reconstruction_weight:
            losses["train/loss_reconstruction"] = (reconstruction - features).pow(2).sum(dim=1).mean()
            loss = loss + self.reconstruction_weight * losses["train/loss_reconstruction"]
        if old is not None:
            loss_comp = queue_nce_loss(reconstruction, old, self.old_queue.negatives(), self.temperature, self.hard_negatives)
            losses["train/loss_compatible"] = loss_comp
            loss = loss + self.comp_weight * loss_comp
            self.old_queue.enqueue(all_gather(old))
        self.float_queue.enqueue(all_gather(features))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        self.log_dict(losses, batch_size=len(images))
        return loss

    # --------------------------------------------------------------------------- evaluation

    def embedding_outputs(self, images: Tensor) -> dict[str, Tensor]:
        """The reconstruction (``embedding``), the frozen float embedding and the code bits."""
        features = super().embed(images).float()
        codes, reconstruction = self.binarizer(features)
        return {"embedding": F.normalize(reconstruction, dim=1), "float_embedding": features,
                "code": (codes > 0).to(torch.uint8)}

    def embed(self, images: Tensor) -> Tensor:
        """The reconstructed embedding (what a newer BEBR run compares with, as its old system)."""
        return self.embedding_outputs(images)["embedding"]

    def evaluation_metrics(self, stage: Stage) -> list[BenchmarkMetric]:
        """The binary and float searches, then the reconstructions' retrieval or compatibility
        metrics (last: their rankings are the Kaggle CSV's)."""
        metrics = super().evaluation_metrics(stage)
        return [BinaryRetrievalMetric(self.retrieval_protocol, self.binary_search), *metrics]


def load_binary_model(path: str) -> BinaryEmbeddingRetrieval:
    """The BEBR run of a checkpoint, frozen (its float model is read from the run's
    ``float_checkpoint``, which must still exist)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model.old_checkpoint {file}: no such file; expected the last.ckpt of the old BEBR run")
    checkpoint = read_checkpoint(file, weights_only=True)
    hparams = checkpoint.get("hyper_parameters", {})
    if "extra_rounds" not in hparams or not hparams.get("float_checkpoint"):
        raise ValueError(f"model.old_checkpoint {file} is not a BEBR checkpoint (no extra_rounds or float_checkpoint "
                         "among its hyperparameters)")
    names = {name for cls in (BinaryEmbeddingRetrieval, LandmarkRetrieval)
             for name in inspect.signature(cls.__init__).parameters} - {"self", "args", "kwargs"}
    settings = {**hparams, "num_classes": None, "old_checkpoint": None, "pretrained": False, "weights": None}
    model = BinaryEmbeddingRetrieval(**{k: v for k, v in settings.items() if k in names})
    model.load_state_dict({k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("old_")})
    return freeze_(model)


torch.serialization.add_safe_globals([BinarySearchOptions])
