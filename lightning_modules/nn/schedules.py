"""Learning-rate schedules as factors of the peak LR per optimizer step (for ``LambdaLR``)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: float, total_steps: int, start_factor: float, end_factor: float = 0.0) -> float:
    """Linear from ``start_factor`` to 1 over ``warmup_steps``, then a half cosine from 1 down to
    ``end_factor`` at ``total_steps`` (and ``end_factor`` after): GradualWarmupScheduler followed
    by CosineAnnealingLR, per step, as the video methods' codes schedule their epochs."""
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1.0, total_steps - warmup_steps))
    return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
