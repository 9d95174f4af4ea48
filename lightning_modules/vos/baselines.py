"""Reference baselines of video object segmentation, evaluated by the sequence loop, with nothing
to train: semi-supervised, every frame predicted as the first frame's given masks
(:class:`FirstFrameCopy`, the "zero-motion" reference against which a method's J&F shows what
it tracks); zero-shot, every pixel foreground (:class:`AllForeground`) or a centred ellipse
(:class:`CentrePrior`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_modules.sequence_evaluation import SequenceEvaluatedModule


class FirstFrameCopy(SequenceEvaluatedModule):
    """Copies the first frame's masks to every frame (module docstring)."""

    method_name = "first_frame_copy"

    def init_sequence(self, item: Any) -> dict[str, np.ndarray]:
        if item.first_masks is None:
            raise ValueError("first_frame_copy needs the first frame's masks: the semi-supervised task")
        return {"masks": item.first_masks}

    def step_sequence(self, state: dict[str, np.ndarray], t: int, frame: np.ndarray) -> np.ndarray:
        return state["masks"]


class AllForeground(SequenceEvaluatedModule):
    """The zero-shot reference that marks every pixel as the object (issue: zero-shot DAVIS)."""

    method_name = "all_foreground"

    def init_sequence(self, item: Any) -> None:
        return None

    def step_sequence(self, state: None, t: int, frame: np.ndarray) -> np.ndarray:
        return np.ones(frame.shape[:2], np.uint8)


class CentrePrior(SequenceEvaluatedModule):
    """The zero-shot reference that marks a centred ellipse as the object, its semi-axes
    ``fraction`` of half the frame's width and height (objects of interest sit near the centre)."""

    method_name = "centre_prior"

    def __init__(self, fraction: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()

    def init_sequence(self, item: Any) -> None:
        return None

    def step_sequence(self, state: None, t: int, frame: np.ndarray) -> np.ndarray:
        height, width = frame.shape[:2]
        rows, cols = np.mgrid[0:height, 0:width]
        a, b = self.hparams.fraction * width / 2, self.hparams.fraction * height / 2
        inside = ((cols + 0.5 - width / 2) / a) ** 2 + ((rows + 0.5 - height / 2) / b) ** 2 <= 1
        return inside.astype(np.uint8)
