"""FairMOT: one network detecting objects as centres and embedding them for re-identification
(Zhang, Wang, Wang, Zeng, Liu, "FairMOT: On the Fairness of Detection and Re-Identification in
Multiple Object Tracking", IJCV 2021; ifzhang/FairMOT; method card 6a). Plain torch parts in
:mod:`lightning_modules.nn.centernet`, the association in :mod:`lightning_modules.mot.tracker`.

1. A DLA-34 with CenterNet's deformable upsampling merges its features to stride 4.
2. Four heads (3×3 conv to 256, ReLU, 1×1): the centre heatmap (bias −2.19), the box as
   distances to its left, top, right and bottom edges, the centre's sub-cell offset, and a
   128-d re-ID embedding.
3. Detection loss: L_det = L_focal(heatmap) + 0.1·L1(l/t/r/b) + 1·L1(offset), the L1s at the
   object centres, averaged over objects and channels.
4. Identity loss: at each centre, e = √2·ln(nID − 1)·normalize(embedding), a linear classifier
   over every training identity (nID), cross-entropy.
5. Uncertainty weighting: L = ½(e^{−s_det} L_det + e^{−s_id} L_id + s_det + s_id), s_det and
   s_id learned from −1.85 and −1.05.
6. Training: Adam 1e-4, 30 epochs, ×0.1 at epoch 20 (the MIX recipe; batch 12).
7. Tracking, per frame of a sequence: letterbox to the input size, the top 500 peaks of the
   3×3-max-pooled heatmap with a score above ``detection_threshold`` (0.4), boxes from the
   distances and offsets mapped back to the frame, L2-normalised embeddings, then the JDE
   association (``tracker``). ``association: none`` gives every detection a new id instead (the
   no-association reference of the tests and the README).

Deviations from the authors' code:

- The identity classifier's size comes from the DataModule's training identities (MOT17's half
  split, not JDE's MIX); it is rebuilt from a checkpoint's shape when one is loaded, so that a
  model tests on data with other identities.
- ``deformable: false`` replaces the neck's deformable convolutions by plain ones (the mini
  preset: torchvision's CPU deformable convolution is about 10× the rest of the step).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.mot17 import letterbox
from datamodules.vos_clips import frame_tensor
from lightning_modules.mot.tracker import JDETracker, TrackerOptions
from lightning_modules.nn.centernet import HEATMAP_BIAS, DLASeg, center_targets, decode_centers, focal_loss, gather, head
from lightning_modules.recipe import OptimizerRecipe
from lightning_modules.sequence_evaluation import SequenceEvaluatedModule

STRIDE = 4


class FairMOT(SequenceEvaluatedModule):
    """FairMOT (module docstring). Defaults are the authors' (card 6a): DLA-34 from ImageNet
    weights, heads of 256 channels, 128-d embeddings, loss weights 1 / 0.1 / 1, the uncertainty
    weights' starts, top 500 peaks, detection threshold 0.4, the tracker's thresholds."""

    method_name = "fairmot"

    def __init__(
        self,
        backbone: str = "dla34",
        pretrained: bool = True,
        weights: Optional[str] = None,
        deformable: bool = True,
        head_channels: int = 256,
        embedding_dim: int = 128,
        num_ids: Optional[int] = None,
        heatmap_weight: float = 1.0,
        box_weight: float = 0.1,
        offset_weight: float = 1.0,
        detection_uncertainty: float = -1.85,
        identity_uncertainty: float = -1.05,
        top_k: int = 500,
        detection_threshold: float = 0.4,
        association: Literal["jde", "none"] = "jde",
        tracker: TrackerOptions = TrackerOptions(),
        optim: OptimizerRecipe = OptimizerRecipe(optimizer="adam", lr=1e-4, schedule="step", milestones=(20,), gamma=0.1,
                                                 interval="epoch"),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.network = DLASeg(backbone, pretrained, weights, deformable)
        channels = self.network.out_channels
        self.heads = nn.ModuleDict({
            "heatmap": head(channels, 1, head_channels, bias=HEATMAP_BIAS),
            "ltrb": head(channels, 4, head_channels),
            "offset": head(channels, 2, head_channels),
            "embedding": head(channels, embedding_dim, head_channels),
        })
        for name in ("ltrb", "offset", "embedding"):  # FairMOT's fill_fc_weights
            for conv in self.heads[name]:
                if isinstance(conv, nn.Conv2d):
                    nn.init.normal_(conv.weight, std=0.001)
                    nn.init.zeros_(conv.bias)
        self.detection_uncertainty = nn.Parameter(torch.tensor(float(detection_uncertainty)))
        self.identity_uncertainty = nn.Parameter(torch.tensor(float(identity_uncertainty)))
        self.classifier: Optional[nn.Linear] = None
        if num_ids is not None:
            self._build_classifier(num_ids)

    # ------------------------------------------------------------------------------ the network

    def _build_classifier(self, num_ids: int) -> None:
        if num_ids < 2:
            raise ValueError(f"FairMOT's identity loss needs at least 2 training identities; got {num_ids}")
        self.classifier = nn.Linear(self.hparams.embedding_dim, num_ids)
        self.embedding_scale = math.sqrt(2) * math.log(num_ids - 1)

    def configure_model(self) -> None:
        """The identity classifier over the DataModule's training identities (unless ``num_ids``)."""
        if self.classifier is None and self.trainer is not None and hasattr(self.trainer.datamodule, "num_ids"):
            self._build_classifier(self.trainer.datamodule.num_ids)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the classifier in the checkpoint's shape (called before its weights load)."""
        weight = checkpoint["state_dict"].get("classifier.weight")
        if weight is not None and (self.classifier is None or self.classifier.weight.shape != weight.shape):
            self._build_classifier(weight.shape[0])

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """The heads' maps at stride 4 of images [B, 3, H, W]."""
        features = self.network(images)
        return {name: layer(features) for name, layer in self.heads.items()}

    # ------------------------------------------------------------------------------- training

    def losses(self, outputs: dict[str, Tensor], boxes: list[Tensor], track_ids: list[Tensor]) -> dict[str, Tensor]:
        """The heatmap, box, offset, identity and total losses (module docstring, 3-5)."""
        h = self.hparams
        size = tuple(outputs["heatmap"].shape[-2:])
        heatmaps, predicted, targets, embeddings, ids = [], {"ltrb": [], "offset": []}, {"ltrb": [], "offset": []}, [], []
        for b, (image_boxes, image_ids) in enumerate(zip(boxes, track_ids)):
            target = center_targets(image_boxes.cpu(), STRIDE, size)
            heatmaps.append(target["heatmap"])
            index = target["index"][target["valid"]].to(self.device)
            for name in ("ltrb", "offset"):
                predicted[name].append(gather(outputs[name][b], index))
                targets[name].append(target[name][target["valid"]].to(self.device))
            embeddings.append(gather(outputs["embedding"][b], index))
            ids.append(image_ids.to(self.device)[target["valid"].to(self.device)])
        heatmap_loss = focal_loss(outputs["heatmap"], torch.stack(heatmaps).to(self.device))
        regression = {name: F.l1_loss(torch.cat(predicted[name]), torch.cat(targets[name]), reduction="sum")
                      / (torch.cat(targets[name]).numel() + 1e-4) for name in ("ltrb", "offset")}
        detection = h.heatmap_weight * heatmap_loss + h.box_weight * regression["ltrb"] + h.offset_weight * regression["offset"]
        identities = torch.cat(ids)
        if len(identities):
            logits = self.classifier(self.embedding_scale * F.normalize(torch.cat(embeddings), dim=1))
            identity = F.cross_entropy(logits, identities)
        else:  # no object in the batch: no identity term, every parameter still in the graph (DDP)
            identity = self.classifier.weight.sum() * 0.0
        total = 0.5 * (torch.exp(-self.detection_uncertainty) * detection + torch.exp(-self.identity_uncertainty) * identity
                       + self.detection_uncertainty + self.identity_uncertainty)
        return {"loss": total, "heatmap": heatmap_loss, "box": regression["ltrb"], "offset": regression["offset"],
                "identity": identity}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.losses(self(batch["image"]), batch["boxes"], batch["track_ids"])
        size = len(batch["image"])
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=size)
        self.log_dict({f"train/{name}_loss": value for name, value in losses.items() if name != "loss"}, batch_size=size)
        return losses["loss"]

    # ------------------------------------------------------------------------------ tracking

    @property
    def tracker_options(self) -> TrackerOptions:
        """The ``tracker`` hyperparameter (a dict where it came from a config or a checkpoint)."""
        options = self.hparams.tracker
        return options if isinstance(options, TrackerOptions) else TrackerOptions(**options)

    @torch.no_grad()
    def detect(self, frame: np.ndarray, input_size: tuple[int, int],
               state: Optional[dict[str, Any]] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes [N, 4] x1, y1, x2, y2 in frame pixels, scores [N], embeddings [N, D] unit) of the
        detections above ``detection_threshold`` in an RGB frame (``state``: the sequence's, for
        methods that carry features across frames)."""
        boxed, scale, offset = letterbox(frame, input_size)
        outputs = {k: v[0] for k, v in self(frame_tensor(boxed)[None].to(self.device)).items()}
        return self.decode(outputs, scale, offset)

    def decode(self, outputs: dict[str, Tensor], scale: float,
               offset: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One image's head maps to detections in the frame's pixels (undoing the letterbox)."""
        scores, boxes, index = decode_centers(outputs["heatmap"], outputs["ltrb"], outputs["offset"], self.hparams.top_k)
        keep = scores > self.hparams.detection_threshold
        embeddings = F.normalize(gather(outputs["embedding"], index[keep]), dim=1)
        left, top = offset
        boxes = (boxes[keep] * STRIDE - torch.tensor([left, top, left, top], device=boxes.device)) / scale
        return boxes.cpu().numpy().astype(np.float64), scores[keep].cpu().numpy(), embeddings.cpu().numpy()

    def init_sequence(self, item: Any) -> dict[str, Any]:
        return {"tracker": JDETracker(self.tracker_options, item.frame_rate), "next_id": 1, "input_size": item.input_size}

    def step_sequence(self, state: dict[str, Any], t: int, frame: np.ndarray) -> np.ndarray:
        """Output tracks [N, 6] (id, x, y, w, h, score) of frame ``t``."""
        boxes, scores, embeddings = self.detect(frame, state["input_size"], state)
        if self.hparams.association == "jde":
            return state["tracker"].update(boxes, scores, embeddings)
        options = self.tracker_options  # the no-association reference: a new id for every detection
        wh = boxes[:, 2:] - boxes[:, :2]
        kept = (wh[:, 0] * wh[:, 1] > options.min_box_area) & (wh[:, 0] <= options.max_aspect_ratio * wh[:, 1])
        ids = state["next_id"] + np.arange(int(kept.sum()))
        state["next_id"] += int(kept.sum())
        return np.concatenate([ids[:, None], boxes[kept, :2], wh[kept], scores[kept, None]], axis=1)

    def predict_sequence(self, item: Any) -> np.ndarray:
        """MOTChallenge rows [N, 7] (frame from 1, id, x, y, w, h, score) of every frame."""
        state = self.init_sequence(item)
        rows = [np.concatenate([np.full((len(out), 1), t + 1), out], axis=1)
                for t in range(len(item.frames)) for out in [self.step_sequence(state, t, item.frame(t))]]
        return np.concatenate(rows).reshape(-1, 7) if rows else np.zeros((0, 7))
