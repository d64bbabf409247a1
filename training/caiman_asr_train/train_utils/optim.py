"""Optimizers: LAMB (as upstream CAIMAN-ASR) or AdamW.

``lamb``: apex's ``FusedLAMB`` on CUDA when apex is installed, otherwise
``Lamb`` below, a plain-PyTorch implementation of the same update with the
same defaults, so a learning rate tuned on one carries over to the other.
LAMB scales each tensor's step to ``lr`` times its weight norm, which keeps
large-batch GPU training stable.

``adamw``: ``torch.optim.AdamW``. Its steps are about ``lr`` per weight
whatever the weight's size, so small weights move faster than under LAMB; on
short CPU runs (the demo) it gets past the transducer's early plateau in
fewer steps. Learning rates are not interchangeable between the two.
"""

from typing import Iterable

import torch
from torch import Tensor


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019) as apex ``FusedLAMB`` computes it (``adam_w_mode=True``).

    Per tensor p with gradient g at step t:
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * p
        p -= lr * r * u,   r = ||p|| / ||u|| (1 when either norm is 0, or when
                           the group has no weight decay, as FusedLAMB without nvlamb)

    Gradient clipping is done by the caller (the trainer clips the global norm
    before ``step``), so there is no ``max_grad_norm`` here.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"invalid LAMB hyperparameters lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}"
            )
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    # a tensor step counter, as torch's own optimizers keep it, so
                    # the state dict is tensors only
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                exp_avg: Tensor = state["exp_avg"]
                exp_avg_sq: Tensor = state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (exp_avg_sq / (1 - beta2**t)).sqrt_().add_(group["eps"])
                update = (exp_avg / (1 - beta1**t)).div_(denom)
                ratio = 1.0
                if group["weight_decay"] != 0:
                    update.add_(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.sub_(update * (group["lr"] * ratio))
        return loss


OPTIMIZERS = ("lamb", "adamw")


def build_optimizer(
    param_groups: list[dict], name: str, lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """``name`` "lamb" (apex FusedLAMB on CUDA when importable, else ``Lamb``) or "adamw"."""
    if name == "adamw":
        return torch.optim.AdamW(
            param_groups,
            lr=lr,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=weight_decay,
            fused=device.type == "cuda",
        )
    if name != "lamb":
        raise ValueError(f"unknown optimizer {name!r}; use one of {OPTIMIZERS}")
    kwargs = dict(lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=weight_decay)
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedLAMB
        except ImportError:
            pass
        else:
            # FusedLAMB clips internally too; the trainer already clipped, so
            # an infinite bound makes that a no-op.
            return FusedLAMB(param_groups, max_grad_norm=float("inf"), **kwargs)
    return Lamb(param_groups, **kwargs)
