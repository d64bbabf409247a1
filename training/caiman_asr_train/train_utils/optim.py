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
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)
        return loss

    def _step_group(self, group: dict, params: list[Tensor]) -> None:
        """One update of ``params`` (those of ``group`` with a gradient), all tensors at once.

        The arithmetic is the per-tensor formula above, in the same order, done
        with ``torch._foreach_*`` ops: on CUDA without apex, one kernel launch
        per op for the whole group rather than a dozen small launches per
        tensor. On CPU torch loops over the tensors itself, so it costs what a
        Python loop would (12.7 ms a step for the 1.5M-weight demo model).
        """
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        steps = [float(self.state[p]["step"]) for p in params]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_div(exp_avg_sqs, [1 - beta2**t for t in steps])
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(exp_avgs, [1 - beta1**t for t in steps])
        torch._foreach_div_(updates, denom)
        scales = [group["lr"]] * len(params)
        if group["weight_decay"] != 0:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
            w_norms = torch.stack(torch._foreach_norm(params))
            u_norms = torch.stack(torch._foreach_norm(updates))
            ratios = torch.where((w_norms > 0) & (u_norms > 0), w_norms / u_norms, torch.ones_like(w_norms))
            scales = (group["lr"] * ratios).tolist()
        torch._foreach_mul_(updates, scales)
        torch._foreach_sub_(params, updates)


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
