"""Learning-rate schedules as factors of the peak LR per scheduler step (for ``LambdaLR``).

One function serves every recipe of the suite (``lightning_modules.recipe``): a linear warm-up
from ``start_factor`` (GradualWarmupScheduler / LinearLR / arcface_torch's PolynomialLRWarmup),
then a half cosine (CosineAnnealingLR), a polynomial decay (PolynomialLRWarmup) or constant down
to ``end_factor``; or, for ``step``, the warm-up multiplied by ``gamma`` at each milestone
(LinearLR chained with MultiStepLR).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

ScheduleName = Literal["cosine", "polynomial", "step", "constant"]


def lr_factor(
    step: float,
    *,
    schedule: ScheduleName,
    warmup_steps: float,
    total_steps: float,
    start_factor: float = 0.0,
    end_factor: float = 0.0,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
    power: float = 2.0,
) -> float:
    """The factor at ``step``: linear from ``start_factor`` at 0 to 1 at ``warmup_steps``; then
    from 1 at ``warmup_steps`` to ``end_factor`` at ``total_steps`` (and after) along the
    ``schedule``. ``step`` multiplies the warm-up by ``gamma`` once per milestone passed
    (``milestones`` in steps) and ignores ``end_factor``."""
    warmup = 1.0 if step >= warmup_steps else start_factor + (1.0 - start_factor) * step / warmup_steps
    if schedule == "step":
        return warmup * gamma ** sum(step >= milestone for milestone in milestones)
    if step < warmup_steps:
        return warmup
    progress = min(1.0, (step - warmup_steps) / max(1.0, total_steps - warmup_steps))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "polynomial":
        decay = (1.0 - progress) ** power
    elif schedule == "constant":
        decay = 1.0
    else:
        raise ValueError(f"unknown schedule {schedule!r}: expected cosine, polynomial, step or constant")
    return end_factor + (1.0 - end_factor) * decay
