"""The reference baseline of semi-supervised video object segmentation: every frame predicted as
the first frame's given masks (no motion; the "zero-motion" reference against which a method's
J&F shows what it tracks). Evaluated by the sequence loop; it has nothing to train."""

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
