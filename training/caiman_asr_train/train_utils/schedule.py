"""Learning-rate and gradient-noise schedules: pure functions of the optimizer step.

Because they depend on the step alone, resuming needs no scheduler state.
"""

import math
from typing import Optional


def learning_rate(
    step: int,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    hold_steps: int,
    half_life_steps: Optional[float],
) -> float:
    """Learning rate for the optimizer update that makes ``step`` steps done (``step >= 1``).

    Warmup: linear from ``lr / warmup_steps`` at step 1 to ``lr`` at step
    ``warmup_steps``; hold: ``lr`` for ``hold_steps`` more steps; then
    exponential decay ``lr * 0.5 ** ((step - warmup_steps - hold_steps) / half_life_steps)``
    floored at ``min_lr`` (no decay when ``half_life_steps`` is None or 0).
    """
    if step <= warmup_steps:
        return lr * step / warmup_steps
    decay_steps = step - warmup_steps - hold_steps
    if decay_steps <= 0 or not half_life_steps:
        return lr
    return max(min_lr, lr * 0.5 ** (decay_steps / half_life_steps))


def grad_noise_std(step: int, noise_level: float, decay_const: float, start_step: int) -> float:
    """Std of the Gaussian noise added to gradients at ``step`` (the ``grad_noise_scheduler`` section).

    0 before ``start_step`` or when ``noise_level`` is 0; then
    ``noise_level / (1 + step - start_step) ** decay_const``.
    """
    if noise_level <= 0 or step < start_step:
        return 0.0
    return noise_level / math.pow(1 + step - start_step, decay_const)
