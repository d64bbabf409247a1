"""rnnt_loss against an explicit sum over every alignment, plus its edge cases."""

import itertools

import pytest
import torch

from caiman_asr_train.rnnt.loss import rnnt_loss


def brute_force_nll(
    logits: torch.Tensor,
    logit_lens: torch.Tensor,
    targets: torch.Tensor,
    target_lens: torch.Tensor,
    blank_idx: int,
) -> torch.Tensor:
    """Per-item NLL ``[B]`` summed path by path, independent of any lattice recursion.

    An alignment of ``T`` frames and ``U`` labels is a sequence of ``T`` blanks
    and ``U`` labels whose last symbol is a blank; it is fixed by choosing which
    of the first ``T + U - 1`` steps emit labels.
    """
    log_probs = logits.log_softmax(dim=-1)
    losses = []
    for b in range(logits.shape[0]):
        frames, labels = int(logit_lens[b]), int(target_lens[b])
        path_scores = []
        for label_steps in itertools.combinations(range(frames + labels - 1), labels):
            t = u = 0
            score = log_probs.new_zeros(())
            for step in range(frames + labels):
                if step in label_steps:
                    score = score + log_probs[b, t, u, targets[b, u]]
                    u += 1
                else:
                    score = score + log_probs[b, t, u, blank_idx]
                    t += 1
            assert (t, u) == (frames, labels)
            path_scores.append(score)
        losses.append(-torch.logsumexp(torch.stack(path_scores), dim=0))
    return torch.stack(losses)


def random_batch(
    logit_lens: list[int], target_lens: list[int], vocab: int, blank_idx: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random logits ``[B, T, U+1, V]`` and label ids, with padding filled by junk."""
    gen = torch.Generator().manual_seed(seed)
    max_t, max_u = max(logit_lens), max(target_lens)
    logits = torch.randn(len(logit_lens), max_t, max_u + 1, vocab, generator=gen) * 2
    labels = [i for i in range(vocab) if i != blank_idx]
    choice = torch.randint(len(labels), (len(logit_lens), max_u), generator=gen)
    targets = torch.tensor(labels)[choice]
    for b, n in enumerate(target_lens):
        targets[b, n:] = -1  # padding is never read
    return logits, torch.tensor(logit_lens), targets, torch.tensor(target_lens)


MIXED_CASES = [
    # (logit_lens, target_lens, vocab, blank_idx)
    ([5, 3, 1, 4], [3, 0, 2, 3], 6, 0),
    ([4, 6, 2], [2, 3, 1], 5, 4),
    ([1], [0], 3, 1),
    ([3, 3], [0, 0], 4, 0),
]


@pytest.mark.parametrize("logit_lens, target_lens, vocab, blank_idx", MIXED_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_brute_force_sum_over_alignments(logit_lens, target_lens, vocab, blank_idx, seed):
    logits, t_lens, targets, u_lens = random_batch(logit_lens, target_lens, vocab, blank_idx, seed)

    x = logits.clone().requires_grad_()
    loss = rnnt_loss(x, t_lens, targets, u_lens, blank_idx, reduction="none")
    weights = torch.linspace(0.5, 2.0, len(logit_lens))  # distinct per-item upstream gradients
    (loss * weights).sum().backward()

    ref_x = logits.double().requires_grad_()
    ref = brute_force_nll(ref_x, t_lens, targets, u_lens, blank_idx)
    (ref * weights.double()).sum().backward()

    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-4)


def test_gradient_is_zero_outside_each_items_lattice():
    logit_lens, target_lens = [6, 3, 4], [1, 4, 0]
    logits, t_lens, targets, u_lens = random_batch(logit_lens, target_lens, 7, 0, seed=3)
    x = logits.requires_grad_()
    rnnt_loss(x, t_lens, targets, u_lens, 0).backward()

    for b, (frames, labels) in enumerate(zip(logit_lens, target_lens)):
        assert torch.all(x.grad[b, frames:] == 0)
        assert torch.all(x.grad[b, :, labels + 1 :] == 0)
        inside = x.grad[b, :frames, : labels + 1]
        assert inside.abs().amax(dim=-1).gt(0).all(), "every node of the lattice is on some path"
        # log_softmax gradients sum to zero over the vocabulary.
        torch.testing.assert_close(inside.sum(-1), torch.zeros_like(inside[..., 0]), atol=1e-6, rtol=0)


def test_reductions():
    logits, t_lens, targets, u_lens = random_batch([4, 2, 3], [2, 1, 0], 5, 0, seed=4)
    per_item = rnnt_loss(logits, t_lens, targets, u_lens, 0, reduction="none")
    assert per_item.shape == (3,)
    torch.testing.assert_close(rnnt_loss(logits, t_lens, targets, u_lens, 0, reduction="sum"), per_item.sum())
    torch.testing.assert_close(rnnt_loss(logits, t_lens, targets, u_lens, 0), per_item.mean())

    x = logits.clone().requires_grad_()
    rnnt_loss(x, t_lens, targets, u_lens, 0, reduction="mean").backward()
    y = logits.clone().requires_grad_()
    rnnt_loss(y, t_lens, targets, u_lens, 0, reduction="sum").backward()
    torch.testing.assert_close(x.grad * 3, y.grad)


def test_batch_items_are_independent_of_padding():
    """An item's loss is the same alone or padded next to longer items."""
    logits, t_lens, targets, u_lens = random_batch([5, 2], [3, 1], 6, 0, seed=5)
    batched = rnnt_loss(logits, t_lens, targets, u_lens, 0, reduction="none")
    alone = rnnt_loss(logits[1:, :2, :2], t_lens[1:], targets[1:, :1], u_lens[1:], 0, reduction="none")
    torch.testing.assert_close(batched[1:], alone)


def test_long_peaky_inputs_are_finite_and_stable():
    gen = torch.Generator().manual_seed(6)
    batch, max_t, max_u, vocab = 2, 500, 100, 12
    logits = torch.randn(batch, max_t, max_u + 1, vocab, generator=gen) * 20
    targets = torch.randint(1, vocab, (batch, max_u), generator=gen)
    t_lens, u_lens = torch.tensor([500, 431]), torch.tensor([100, 77])

    x = logits.clone().requires_grad_()
    loss = rnnt_loss(x, t_lens, targets, u_lens, 0, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and (loss > 0).all()
    assert torch.isfinite(x.grad).all()

    # float64 logits run everything in float64; float32 logits must agree
    # (a float32 lattice recursion would be off by ~1e-2 in the gradient here).
    x64 = logits.double().requires_grad_()
    loss64 = rnnt_loss(x64, t_lens, targets, u_lens, 0, reduction="none")
    loss64.sum().backward()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_computed_in_float32(dtype):
    logits, t_lens, targets, u_lens = random_batch([5, 3], [2, 3], 6, 0, seed=7)
    x = logits.to(dtype).requires_grad_()
    loss = rnnt_loss(x, t_lens, targets, u_lens, 0, reduction="none")
    loss.sum().backward()

    x32 = x.detach().float().requires_grad_()
    loss32 = rnnt_loss(x32, t_lens, targets, u_lens, 0, reduction="none")
    loss32.sum().backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss32)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), x32.grad, rtol=0, atol=1e-2)


def test_lengths_may_be_int32_and_targets_any_integer_type():
    logits, t_lens, targets, u_lens = random_batch([3, 2], [2, 1], 5, 0, seed=8)
    expected = rnnt_loss(logits, t_lens, targets, u_lens, 0)
    got = rnnt_loss(logits, t_lens.int(), targets.clamp(min=0).int(), u_lens.to(torch.int16), 0)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "logits": a["logits"][0]}, "logits must be a floating-point"),
        (lambda a: {**a, "logits": a["logits"].long()}, "logits must be a floating-point"),
        (lambda a: {**a, "targets": a["targets"][:, :1]}, r"targets must be \[B, U\] = \[2, 2\]"),
        (lambda a: {**a, "targets": a["targets"][:1]}, r"targets must be \[B, U\]"),
        (lambda a: {**a, "logit_lens": a["logit_lens"][:1]}, r"logit_lens must have shape \[2\]"),
        (lambda a: {**a, "target_lens": a["target_lens"][None]}, r"target_lens must have shape \[2\]"),
        (lambda a: {**a, "target_lens": a["target_lens"].float()}, "must be an integer tensor"),
        (lambda a: {**a, "blank_idx": 5}, r"blank_idx 5 is outside the vocabulary \[0, 5\)"),
        (lambda a: {**a, "reduction": "avg"}, "reduction must be"),
        (lambda a: {**a, "logit_lens": torch.tensor([4, 0])}, r"logit_lens must lie in \[1, 3\]"),
        (lambda a: {**a, "target_lens": torch.tensor([3, 1])}, r"target_lens must lie in \[0, 2\]"),
        (lambda a: {**a, "targets": torch.tensor([[1, 5], [2, 9]])}, "label ids in"),
        (lambda a: {**a, "targets": torch.tensor([[1, 0], [2, 9]])}, "other than blank_idx 0"),
    ],
)
def test_rejects_inconsistent_inputs(change, message):
    logits, t_lens, targets, u_lens = random_batch([3, 2], [2, 1], 5, 0, seed=9)
    args = dict(logits=logits, logit_lens=t_lens, targets=targets, target_lens=u_lens, blank_idx=0)
    with pytest.raises(ValueError, match=message):
        rnnt_loss(**change(args))


def test_padded_label_ids_are_not_validated():
    logits, t_lens, targets, u_lens = random_batch([3, 2], [2, 1], 5, 0, seed=10)
    targets[1, 1] = 999  # beyond target_lens[1]: padding
    assert torch.isfinite(rnnt_loss(logits, t_lens, targets, u_lens, 0))
