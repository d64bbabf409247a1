"""Time rnnt_loss forward+backward against autograd through the same lattice recursion.

Usage (from the repository root):

    .venv/bin/python benchmarks/rnnt_loss_speed.py            # demo-sized batch on CPU
    .venv/bin/python benchmarks/rnnt_loss_speed.py --device cuda --vocab 8704

The baseline is the textbook plain-PyTorch transducer loss: a full
``log_softmax``, then the anti-diagonal alpha recursion in float32 with
autograd recording every step. ``rnnt_loss`` replaces the recorded graph with
an analytic gradient. Both are timed in the same run on the same inputs.
"""

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import Tensor

from caiman_asr_train.rnnt.loss import rnnt_loss

# A finite "log 0": autograd through logaddexp(-inf, -inf) gives NaN gradients.
_LOG_ZERO = -1e30


def autograd_rnnt_loss(
    logits: Tensor, logit_lens: Tensor, targets: Tensor, target_lens: Tensor, blank_idx: int
) -> Tensor:
    """Mean RNN-T loss with the gradient left to autograd (the baseline)."""
    batch, max_t, max_u1, _ = logits.shape
    device = logits.device
    log_probs = logits.float().log_softmax(dim=-1)
    label_idx = torch.cat([targets.clamp(min=0), targets.new_zeros(batch, 1)], dim=1)
    blank = log_probs[..., blank_idx]
    label = log_probs.gather(3, label_idx[:, None, :, None].expand(-1, max_t, -1, -1)).squeeze(3)
    u = torch.arange(max_u1, device=device)
    label = label.masked_fill(u >= target_lens[:, None, None], _LOG_ZERO)

    items = torch.arange(batch, device=device)
    alpha = torch.full((batch, max_u1), _LOG_ZERO, device=device)
    alpha[:, 0] = 0.0
    diagonals = [alpha]
    for n in range(1, max_t + max_u1 - 1):
        t_prev = n - 1 - u
        inside = (t_prev >= 0) & (t_prev < max_t)
        t_prev = t_prev.clamp(0, max_t - 1)
        top = torch.where(inside, alpha + blank[:, t_prev, u], _LOG_ZERO)
        left = torch.where(inside, alpha + label[:, t_prev, u], _LOG_ZERO)
        left = torch.cat([torch.full((batch, 1), _LOG_ZERO, device=device), left[:, :-1]], dim=1)
        alpha = torch.logaddexp(top, left)
        diagonals.append(alpha)
    alphas = torch.stack(diagonals)  # [T + U, B, U+1]
    last_t = logit_lens - 1
    loglik = alphas[last_t + target_lens, items, target_lens] + blank[items, last_t, target_lens]
    return -loglik.mean()


def time_fwd_bwd(loss_fn: Callable[..., Tensor], logits: Tensor, *args, repeats: int) -> tuple[float, Tensor]:
    """Median seconds of forward+backward over ``repeats`` runs, and the loss value."""
    times = []
    for _ in range(repeats + 1):  # the first run warms up allocators
        x = logits.detach().requires_grad_()
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = loss_fn(x, *args)
        loss.backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), loss.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="utterances per batch (B)")
    parser.add_argument("--frames", type=int, default=200, help="encoder frames of the longest utterance (T)")
    parser.add_argument("--labels", type=int, default=40, help="labels of the longest transcript (U)")
    parser.add_argument("--vocab", type=int, default=256, help="output classes including blank (V)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per implementation (median reported)"
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--no-baseline", action="store_true", help="time rnnt_loss only (baseline is slow at scale)"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    blank_idx = args.vocab - 1
    logits = torch.randn(args.batch, args.frames, args.labels + 1, args.vocab, generator=gen)
    # Mixed lengths, as in a real padded batch; the first item is the longest.
    logit_lens = torch.randint(args.frames // 2, args.frames + 1, (args.batch,), generator=gen)
    target_lens = torch.randint(args.labels // 2, args.labels + 1, (args.batch,), generator=gen)
    logit_lens[0], target_lens[0] = args.frames, args.labels
    targets = torch.randint(0, args.vocab - 1, (args.batch, args.labels), generator=gen)
    inputs = tuple(x.to(args.device) for x in (logit_lens, targets, target_lens)) + (blank_idx,)

    print(
        f"B={args.batch} T={args.frames} U={args.labels} V={args.vocab} "
        f"device={args.device} threads={args.threads}"
    )
    fast, fast_loss = time_fwd_bwd(rnnt_loss, logits.to(args.device), *inputs, repeats=args.repeats)
    print(f"rnnt_loss (analytic gradient):   {fast * 1000:8.1f} ms forward+backward")
    if args.no_baseline:
        return
    slow, slow_loss = time_fwd_bwd(autograd_rnnt_loss, logits.to(args.device), *inputs, repeats=args.repeats)
    print(f"autograd through the recursion:  {slow * 1000:8.1f} ms forward+backward")
    print(f"speed-up: {slow / fast:.1f}x   |loss difference|: {abs(fast_loss - slow_loss).item():.2e}")


if __name__ == "__main__":
    main()
