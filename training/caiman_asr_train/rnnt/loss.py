"""RNN-Transducer loss (Graves 2012) in plain PyTorch.

``rnnt_loss`` is the exact negative log-likelihood of the target sequence
summed over every monotonic alignment through the ``[T, U+1]`` lattice. It is
the CPU and fallback path; on CUDA with apex installed, the training model may
use apex's fused transducer loss instead, which computes the same quantity.

How it works, and why:

* Only two log-probabilities per lattice node are needed: blank and the next
  target label. They are gathered once from the logits (``logsumexp`` over the
  vocabulary, no full ``log_softmax`` copy), so the dynamic programme runs on
  two ``[B, T, U+1]`` tensors and the ``[B, T, U+1, V]`` logits are touched
  only twice: once in the forward pass and once to build the gradient.
* The forward (alpha) and backward (beta) variables are computed along
  anti-diagonals ``n = t + u`` (a wavefront): every node on a diagonal depends
  only on the previous diagonal, so each step is one vectorised operation over
  the whole batch and all ``u``. That is ``T + U + 1`` steps rather than
  ``T * (U + 1)`` scalar-sized ones, and each is an exact pairwise
  ``logaddexp``, so nothing underflows for long, peaky inputs.
* The gradient w.r.t. the logits is analytic (as in warp-transducer):
  ``softmax * occupancy - posterior(blank) at blank - posterior(label) at the
  label``, where the edge posteriors are ``exp(alpha + logp + beta_next -
  loglik)``. This avoids storing an autograd graph of ``T + U`` steps.
* The full-size work (``logsumexp``, the gradient) runs in float32 (float64
  for float64 logits); the small lattice tensors are float64, because sums of
  thousands of log-probabilities lose the precision the gradient needs in
  float32 (1e-2 error against 2e-6 for T=500, U=100, peaky logits).
* Items in a batch may have different lengths. Each item's lattice is masked
  to ``t < T_b``, ``u <= U_b`` and its loss ends with a blank out of node
  ``(T_b - 1, U_b)``; nodes outside the item's lattice receive zero gradient.
"""

from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]

_NEG_INF = float("-inf")


def rnnt_loss(
    logits: Tensor,
    logit_lens: Tensor,
    targets: Tensor,
    target_lens: Tensor,
    blank_idx: int,
    reduction: Reduction = "mean",
) -> Tensor:
    """Return the RNN-T negative log-likelihood (in nats) of ``targets``.

    Args:
        logits: ``[B, T, U+1, V]`` unnormalised joint-network outputs; float32,
            float64, float16 or bfloat16 (half types are computed in float32).
            Entries beyond an item's lengths are ignored but must be finite.
        logit_lens: ``[B]`` integer number of valid encoder frames per item,
            ``1 <= logit_lens[b] <= T``.
        targets: ``[B, U]`` integer label ids; only the first
            ``target_lens[b]`` of row ``b`` are read, each in ``[0, V)`` and not
            ``blank_idx``.
        target_lens: ``[B]`` integer number of labels per item,
            ``0 <= target_lens[b] <= U``.
        blank_idx: vocabulary index of the blank symbol.
        reduction: ``"mean"``: mean over the batch of per-utterance losses
            (as upstream, which divides apex's summed loss by the batch size;
            not normalised by target length); ``"sum"``: their sum; ``"none"``:
            the ``[B]`` per-utterance losses.

    Returns:
        A float32 scalar (``"mean"``, ``"sum"``) or ``[B]`` tensor (``"none"``);
        float64 if ``logits`` is float64. Differentiable w.r.t. ``logits``.

    Raises:
        ValueError: on inconsistent shapes, lengths, label ids, ``blank_idx``
            or ``reduction``.
    """
    logit_lens, targets, target_lens = _validate(
        logits, logit_lens, targets, target_lens, blank_idx, reduction
    )
    losses = _RNNTLoss.apply(logits, logit_lens, targets, target_lens, blank_idx)
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def _validate(
    logits: Tensor,
    logit_lens: Tensor,
    targets: Tensor,
    target_lens: Tensor,
    blank_idx: int,
    reduction: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Check shapes and values; return lengths and targets as int64 on the logits' device."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"rnnt_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if logits.dim() != 4 or not logits.is_floating_point():
        raise ValueError(
            f"rnnt_loss: logits must be a floating-point [B, T, U+1, V] tensor, "
            f"got {logits.dtype} of shape {tuple(logits.shape)}"
        )
    batch, max_t, max_u1, vocab = logits.shape
    if targets.dim() != 2 or targets.shape[0] != batch or targets.shape[1] + 1 != max_u1:
        raise ValueError(
            f"rnnt_loss: targets must be [B, U] = [{batch}, {max_u1 - 1}] to match logits "
            f"{tuple(logits.shape)} (dimension 2 is U+1), got {tuple(targets.shape)}"
        )
    integer_inputs = {"logit_lens": logit_lens, "targets": targets, "target_lens": target_lens}
    for name, tensor in integer_inputs.items():
        if name != "targets" and tensor.shape != (batch,):
            raise ValueError(f"rnnt_loss: {name} must have shape [{batch}], got {tuple(tensor.shape)}")
        if tensor.is_floating_point() or tensor.is_complex():
            raise ValueError(f"rnnt_loss: {name} must be an integer tensor, got {tensor.dtype}")
    if not 0 <= blank_idx < vocab:
        raise ValueError(f"rnnt_loss: blank_idx {blank_idx} is outside the vocabulary [0, {vocab})")
    if batch == 0 or max_t == 0:
        raise ValueError(f"rnnt_loss: logits {tuple(logits.shape)} has no items or no frames")

    device = logits.device
    logit_lens = logit_lens.to(device=device, dtype=torch.long)
    target_lens = target_lens.to(device=device, dtype=torch.long)
    targets = targets.to(device=device, dtype=torch.long)
    # One host sync for all value checks: these indicate a caller bug, and an
    # out-of-range index would otherwise fail deep inside a gather.
    in_label = torch.arange(max_u1 - 1, device=device) < target_lens[:, None]
    bad_label = in_label & ((targets < 0) | (targets >= vocab) | (targets == blank_idx))
    checks = torch.stack(
        [
            (logit_lens < 1).any() | (logit_lens > max_t).any(),
            (target_lens < 0).any() | (target_lens > max_u1 - 1).any(),
            bad_label.any(),
        ]
    ).tolist()
    if checks[0]:
        raise ValueError(f"rnnt_loss: logit_lens must lie in [1, {max_t}], got {logit_lens.tolist()}")
    if checks[1]:
        raise ValueError(f"rnnt_loss: target_lens must lie in [0, {max_u1 - 1}], got {target_lens.tolist()}")
    if checks[2]:
        raise ValueError(
            f"rnnt_loss: targets within target_lens must be label ids in [0, {vocab}) "
            f"other than blank_idx {blank_idx}"
        )
    return logit_lens, targets, target_lens


def _skew(x: Tensor) -> Tensor:
    """Lay ``x[B, R, U1]`` out by anti-diagonal: ``out[n, b, u] = x[b, n - u, u]``.

    Returns ``[R + U1 - 1, B, U1]``; positions with ``n - u`` outside ``[0, R)``
    are ``-inf`` (an impossible lattice node).
    """
    batch, rows, u1 = x.shape
    n = torch.arange(rows + u1 - 1, device=x.device)[:, None]
    t = n - torch.arange(u1, device=x.device)[None, :]
    inside = (t >= 0) & (t < rows)
    index = t.clamp(0, rows - 1)[None].expand(batch, -1, -1)
    out = x.gather(1, index).masked_fill_(~inside, _NEG_INF)
    return out.permute(1, 0, 2).contiguous()


def _unskew(x: Tensor, rows: int) -> Tensor:
    """Inverse of ``_skew`` for the first ``rows`` rows: ``[D, B, U1] -> [B, rows, U1]``."""
    _, batch, u1 = x.shape
    index = torch.arange(rows, device=x.device)[:, None] + torch.arange(u1, device=x.device)
    return x.gather(0, index[:, None, :].expand(-1, batch, -1)).permute(1, 0, 2)


class _RNNTLoss(torch.autograd.Function):
    """Per-utterance RNN-T loss ``[B]`` with an analytic gradient w.r.t. the logits."""

    @staticmethod
    def forward(
        ctx,
        logits: Tensor,
        logit_lens: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        blank_idx: int,
    ) -> Tensor:
        batch, max_t, max_u1, _ = logits.shape
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        x = logits.to(compute_dtype)
        log_norm = torch.logsumexp(x, dim=-1)  # [B, T, U+1]

        # The label emitted from node (t, u) is targets[u]; padded and final
        # columns point at blank so the gather stays in range (masked below).
        u_range = torch.arange(max_u1, device=logits.device)
        in_label = u_range[None, :] < target_lens[:, None]  # [B, U+1]
        label_idx = torch.full((batch, max_u1), blank_idx, device=logits.device, dtype=torch.long)
        label_idx[:, :-1] = targets
        label_idx = label_idx.masked_fill_(~in_label, blank_idx)

        # The lattice sums run over T + U steps of values that reach -1e4 for
        # long, confident utterances; float32 rounding there costs ~1% in the
        # edge posteriors. The lattice tensors are V times smaller than the
        # logits, so float64 for them is nearly free and keeps gradients exact.
        lattice_norm = log_norm.double()
        blank_lp = x[..., blank_idx].double() - lattice_norm
        label_index = label_idx[:, None, :, None].expand(-1, max_t, -1, -1)
        label_lp = x.gather(3, label_index).squeeze(3).double() - lattice_norm

        # Restrict each item to its own lattice: blank from any node with
        # t < T_b and u <= U_b, a label only while u < U_b. A blank out of
        # row T_b - 1 enters a virtual row T_b, whose node (T_b, U_b) is the
        # end of every complete alignment.
        t_range = torch.arange(max_t, device=logits.device)
        in_time = t_range[None, :, None] < logit_lens[:, None, None]
        in_lattice = u_range[None, None, :] <= target_lens[:, None, None]
        blank_lp = blank_lp.masked_fill_(~(in_time & in_lattice), _NEG_INF)
        label_lp = label_lp.masked_fill_(~(in_time & in_label[:, None, :]), _NEG_INF)
        virtual_row = blank_lp.new_full((batch, 1, max_u1), _NEG_INF)
        blank_skew = _skew(torch.cat([blank_lp, virtual_row], dim=1))  # [D, B, U+1]
        label_skew = _skew(torch.cat([label_lp, virtual_row], dim=1))

        alpha = torch.full_like(blank_skew, _NEG_INF)
        alpha[0, :, 0] = 0.0
        from_left = alpha.new_empty((batch, max_u1 - 1))
        for n in range(1, alpha.shape[0]):
            prev = alpha[n - 1]
            cur = alpha[n]
            torch.add(prev, blank_skew[n - 1], out=cur)
            torch.add(prev[:, :-1], label_skew[n - 1, :, :-1], out=from_left)
            torch.logaddexp(cur[:, 1:], from_left, out=cur[:, 1:])

        items = torch.arange(batch, device=logits.device)
        loglik = alpha[logit_lens + target_lens, items, target_lens]

        ctx.blank_idx = blank_idx
        ctx.save_for_backward(
            logits,
            log_norm,
            label_idx,
            blank_skew,
            label_skew,
            alpha,
            loglik,
            logit_lens,
            target_lens,
        )
        return (-loglik).to(compute_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        logits, log_norm, label_idx, blank_skew, label_skew, alpha, loglik = ctx.saved_tensors[:7]
        logit_lens, target_lens = ctx.saved_tensors[7:]
        num_diags, batch, max_u1 = alpha.shape
        max_t = logits.shape[1]
        items = torch.arange(batch, device=logits.device)

        # beta[n] holds diagonal n; one extra all -inf diagonal beyond the last
        # lets step n read beta[n + 1] unconditionally. Each item's end node
        # (T_b, U_b) starts at log 1 = 0.
        beta = alpha.new_full((num_diags + 1, batch, max_u1), _NEG_INF)
        end_diag = logit_lens + target_lens
        beta[end_diag, items, target_lens] = 0.0
        end_diags = set(end_diag.tolist())
        step = alpha.new_empty((batch, max_u1))
        from_right = alpha.new_empty((batch, max_u1 - 1))
        for n in range(num_diags - 1, -1, -1):
            nxt = beta[n + 1]
            # A diagonal holding an end node must keep that 0: end nodes have
            # no outgoing edges, so their recursion term is -inf.
            cur = step if n in end_diags else beta[n]
            torch.add(blank_skew[n], nxt, out=cur)
            torch.add(label_skew[n, :, :-1], nxt[:, 1:], out=from_right)
            torch.logaddexp(cur[:, :-1], from_right, out=cur[:, :-1])
            if n in end_diags:
                torch.logaddexp(beta[n], step, out=beta[n])

        # Edge posteriors, scaled by the incoming gradient of each item's loss.
        shift = -loglik[None, :, None]
        blank_post = (alpha + blank_skew + beta[1:] + shift).exp_()
        beta_right = beta.new_full((num_diags, batch, max_u1), _NEG_INF)
        beta_right[:, :, :-1] = beta[1:, :, 1:]
        label_post = (alpha + label_skew + beta_right + shift).exp_()
        scale = grad_losses.to(alpha.dtype)[:, None, None]
        blank_post = _unskew(blank_post, max_t) * scale  # [B, T, U+1]
        label_post = _unskew(label_post, max_t) * scale

        # d(-loglik)/dz_k = softmax_k * (sum of edge posteriors) - posterior of
        # the edge that emits k; built in place in one [B, T, U+1, V] buffer.
        grad = logits.to(log_norm.dtype) - log_norm[..., None]
        blank_post, label_post = blank_post.to(grad.dtype), label_post.to(grad.dtype)
        grad.exp_().mul_((blank_post + label_post)[..., None])
        grad[..., ctx.blank_idx] -= blank_post
        grad.scatter_add_(3, label_idx[:, None, :, None].expand(-1, max_t, -1, -1), -label_post[..., None])
        return grad.to(logits.dtype), None, None, None, None
