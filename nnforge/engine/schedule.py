"""Learning-rate schedules as plain functions of the step: nothing to save but the step itself."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int, kind: str = "onecycle") -> float:
    """Linear warmup from 0 to peak_lr, then onecycle (linear to 0), cosine (to 0) or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "onecycle":
        return peak_lr * (1.0 - progress)
    if kind == "cosine":
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule '{kind}'; expected onecycle, cosine or constant")
