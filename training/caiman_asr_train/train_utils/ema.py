"""Exponential moving average of model weights (docs/formats.md section 8)."""

import torch
from torch import nn


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` over every state entry.

    Floating-point entries (parameters and buffers) are averaged; any other
    entry (an integer counter) is copied, as averaging it means nothing.
    ``model`` may be wrapped in DistributedDataParallel.
    """
    model = getattr(model, "module", model)
    ema_state = ema_model.state_dict()
    targets, values = [], []
    for name, value in model.state_dict().items():
        target = ema_state[name]
        if target.is_floating_point():
            targets.append(target)
            values.append(value.detach().to(target.dtype))
        else:
            target.copy_(value)
    # ema + (1 - decay) * (model - ema): one pass over each tensor instead of two
    if targets:
        torch._foreach_lerp_(targets, values, 1.0 - decay)
