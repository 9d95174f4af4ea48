"""STM: Space-Time Memory networks (Oh, Lee, Xu, Kim, "Video Object Segmentation using
Space-Time Memory Networks", ICCV 2019; method card 1). Plain torch parts in
:mod:`lightning_modules.nn.stm`.

Inference (seoungwugoh/STM ``eval_DAVIS.py``), per sequence (:meth:`STM.step_sequence`):

1. The first frame is memorised with its given masks: for each object, the memory encoder sees
   the frame, the object's mask and the other objects' mask → keys and values.
2. Frame t is segmented from the memory {frame 0, every ``memory_every``-th frame} ∪ {frame
   t−1 with its predicted soft masks} (:func:`memory_frames`): the query encoder's keys read the
   memory values (softmax over all memory locations), the decoder refines with res3 and res2,
   and the objects' foreground probabilities are combined by soft aggregation; the label map is
   the argmax.
3. Frames are padded to a multiple of 16 (evenly on both sides) and the prediction cropped back.

Training (haochenheheda/Training-Code-of-STM, card 1 (3)-(4)): 3-frame clips; frame 0 is
memorised with its ground truth, frame 1 segmented (cross-entropy on the aggregated logits), its
soft prediction written to memory, frame 2 segmented from {0, 1}; L = CE_1 + CE_2. Adam, lr 1e-5,
BatchNorm frozen (eval mode; its affine weights train), the temporal skip growing over training
(the DataModule's), 384 crops. Void pixels (255) are left out of the loss.

Deviations from the authors' code:

- A training clip keeps at most ``max_objects`` (3) objects of its first frame (the
  DataModule's ``VOSClips``); the others are background.
- Stage 1 deforms one image into a clip by successive random perspective warps (the 3P code's
  two homographies), and does not paste objects of other COCO images into images without any.
  Stage 2 mixes the sources by clip counts per epoch (the 3P code draws DAVIS with probability
  0.08). ``init_checkpoint`` carries the network from one stage to the next.
- The temporal skip grows per epoch (``skip_every_epochs``), where the 3P code grows it every
  3000 iterations.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.nn.stm import FrameMemory, SpaceTimeMemory, pad_to_stride, soft_aggregation, unpad
from lightning_modules.recipe import OptimizerRecipe
from lightning_modules.sequence_evaluation import SequenceEvaluatedModule

VOID = 255
log = logging.getLogger(__name__)


def memory_frames(t: int, memory_every: int) -> list[int]:
    """The frames in memory when segmenting frame t ≥ 1: frame 0, the frames k < t with
    k % ``memory_every`` == 0, and frame t − 1 (sizes 1, 2, 2, 2, 2, 2, 3, ... for every 5)."""
    permanent = [k for k in range(t) if k % memory_every == 0]
    return permanent if t - 1 in permanent else permanent + [t - 1]


def load_network_weights(network: nn.Module, path: str) -> None:
    """The ``network.*`` weights of a visionzoo checkpoint of an earlier training stage (STM, LCM,
    HCPN, HGPU) into ``network``. A weight the
    checkpoint lacks or holds in another shape (LCM's modules and its wider decoder input when
    starting from STM) keeps its initialisation, listed in the log; a checkpoint weight the network
    does not have is an error (another architecture or size)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model.init_checkpoint {file}: no such file; expected a checkpoint of an earlier training "
                                "stage (runs/davis/<method>/<run>/checkpoints/last.ckpt)")
    state = torch.load(file, map_location="cpu", weights_only=False).get("state_dict", {})
    weights = {key[len("network."):]: value for key, value in state.items() if key.startswith("network.")}
    if not weights:
        raise ValueError(f"model.init_checkpoint {file}: no 'network.*' weights; expected a visionzoo checkpoint of this method")
    own = network.state_dict()
    unknown = sorted(weights.keys() - own.keys())
    if unknown:
        raise ValueError(f"model.init_checkpoint {file}: {len(unknown)} weights this network does not have "
                         f"({', '.join(unknown[:5])}); is it the same backbone and key/value sizes?")
    fitting = {key: value for key, value in weights.items() if value.shape == own[key].shape}
    network.load_state_dict(fitting, strict=False)
    fresh = sorted(own.keys() - fitting.keys())
    log.info(f"network initialised from {file}: {len(fitting)} of {len(own)} weights"
             + (f"; kept fresh: {', '.join(fresh[:10])}{' ...' if len(fresh) > 10 else ''}" if fresh else ""))


def object_masks(labels: Tensor, num_objects: int) -> tuple[Tensor, Tensor]:
    """(own, others) [O, H, W] float masks of objects 1..O of a label map [H, W] (void ignored)."""
    own = torch.stack([(labels == k).float() for k in range(1, num_objects + 1)])
    return own, own.sum(dim=0, keepdim=True) - own


class STM(SequenceEvaluatedModule):
    """Space-Time Memory network (module docstring). Defaults are the authors': ResNet-50
    encoders from ImageNet weights, keys 128, values 512, decoder 256, memory every 5 frames.
    ``init_checkpoint``: a visionzoo STM or LCM checkpoint (an earlier training stage) whose
    network starts this run (:func:`load_network_weights`)."""

    method_name = "stm"

    def __init__(
        self,
        backbone: str = "resnet50",
        pretrained: bool = True,
        weights: str | None = None,
        key_dim: int = 128,
        value_dim: int = 512,
        decoder_dim: int = 256,
        memory_every: int = 5,
        freeze_batchnorm: bool = True,
        init_checkpoint: Optional[str] = None,
        optim: OptimizerRecipe = OptimizerRecipe(optimizer="adam", lr=1e-5, schedule="polynomial", power=0.9),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.network = self.build_network()
        if init_checkpoint is not None:
            load_network_weights(self.network, init_checkpoint)
        if freeze_batchnorm:  # eval mode always (VisionZooModule.train keeps frozen modules in eval)
            for module in self.network.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.frozen = True

    def build_network(self) -> SpaceTimeMemory:
        h = self.hparams
        return SpaceTimeMemory(h.backbone, h.pretrained, h.weights, h.key_dim, h.value_dim, h.decoder_dim)

    # ------------------------------------------------------------------------------- training

    def clip_loss(self, frames: Tensor, masks: Tensor, num_objects: Tensor) -> Tensor:
        """L = Σ_{t ≥ 1} CE(aggregated logits of frame t, its labels) of clips [B, F, 3, H, W] with
        label maps [B, F, H, W] (objects 1..n_b, 255 void): frame 0 memorised with its ground truth,
        each later frame with the soft prediction of the previous step."""
        pairs = [(b, k) for b in range(len(frames)) for k in range(1, int(num_objects[b]) + 1)]
        if not pairs:  # no crop of the batch kept an object: a zero loss that still reaches every parameter (DDP)
            return sum(parameter.sum() for parameter in self.parameters()) * 0.0
        sample = torch.tensor([b for b, _ in pairs], device=frames.device)
        own = torch.stack([(masks[b, 0] == k).float() for b, k in pairs])
        others = torch.stack([((masks[b, 0] > 0) & (masks[b, 0] != VOID) & (masks[b, 0] != k)).float() for b, k in pairs])
        memory = [self.network.memorize(frames[sample, 0], own, others)]
        loss = frames.new_zeros(())
        for t in range(1, frames.shape[1]):
            probabilities = self.network.segment(frames[sample, t], memory)
            soft = []
            for b in range(len(frames)):
                rows = (sample == b).nonzero().squeeze(1)
                if len(rows) == 0:
                    continue
                logits = soft_aggregation(probabilities[rows])
                loss = loss + F.cross_entropy(logits[None], masks[b, t][None], ignore_index=VOID) / len(frames)
                soft.append(logits.softmax(dim=0)[1:])
            if t + 1 < frames.shape[1]:
                own = torch.cat(soft)
                others = torch.cat([part.sum(0, keepdim=True) - part for part in soft])
                memory.append(self.network.memorize(frames[sample, t], own, others))
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.clip_loss(batch["frames"], batch["masks"], batch["num_objects"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["frames"]))
        return loss

    # ------------------------------------------------------------------------------ inference

    @torch.no_grad()
    def init_sequence(self, item: Any) -> dict[str, Any]:
        if item.first_masks is None:
            raise ValueError("STM segments the objects given in the first frame: the semi-supervised task")
        num_objects = int(item.first_masks.max())
        state: dict[str, Any] = {"item": item, "num_objects": num_objects, "memory": {}}
        if num_objects:
            own, others = object_masks(torch.as_tensor(item.first_masks, device=self.device), num_objects)
            state["memory"][0] = self._memorize(item, 0, own, others)
        return state

    def _memorize(self, item: Any, t: int, own: Tensor, others: Tensor) -> FrameMemory:
        frame, _ = pad_to_stride(item.frame_tensor(t).to(self.device)[None])
        return self.network.memorize(frame.expand(len(own), -1, -1, -1), pad_to_stride(own)[0], pad_to_stride(others)[0])

    @torch.no_grad()
    def step_sequence(self, state: dict[str, Any], t: int, frame: Any) -> Any:
        item, num_objects = state["item"], state["num_objects"]
        if num_objects == 0:
            return torch.zeros(item.frames.shape[1:3], dtype=torch.uint8).numpy()
        memory = [state["memory"][k] for k in memory_frames(t, self.hparams.memory_every)]  # frame 0 first, t − 1 last
        padded, padding = pad_to_stride(item.frame_tensor(t).to(self.device)[None])
        logits = unpad(soft_aggregation(self.network.segment(padded, memory)), padding)
        soft = logits.softmax(dim=0)[1:]
        # Frame t is memorised for the next step (kept from then on when t % memory_every == 0).
        state["memory"] = {k: v for k, v in state["memory"].items() if k % self.hparams.memory_every == 0}
        state["memory"][t] = self._memorize(item, t, soft, soft.sum(0, keepdim=True) - soft)
        return logits.argmax(dim=0).to(torch.uint8).cpu().numpy()
