"""Batched greedy transducer decoding."""

from typing import Optional, Sequence

import torch
from torch import Tensor

from caiman_asr_train.core.model import RNNT


@torch.no_grad()
def greedy_decode(
    model: RNNT,
    x: Tensor,
    x_lens: Tensor,
    max_symbols_per_step: int = 8,
    prefix_tokens: Optional[Sequence[int]] = None,
) -> list[list[int]]:
    """Greedy decoding of a batch.

    x[T, B, in_feats] spliced features, x_lens[B] frames. At each encoder frame the
    most likely symbol is emitted until blank (the last class) wins or
    ``max_symbols_per_step`` symbols were emitted for that frame. Before the
    first frame the prediction network consumes ``prefix_tokens`` (a
    ``prefix_token_map`` entry), which are not part of the output.
    Returns one list of label ids per utterance.
    """
    f, f_lens, _ = model.encode(x, x_lens)
    return greedy_search(model, f, f_lens, max_symbols_per_step, prefix_tokens)


@torch.no_grad()
def greedy_search(
    model: RNNT,
    f: Tensor,
    f_lens: Tensor,
    max_symbols_per_step: int = 8,
    prefix_tokens: Optional[Sequence[int]] = None,
) -> list[list[int]]:
    """The greedy search of ``greedy_decode`` over encoder output f[B, T', enc_n_hid], f_lens[B] frames."""
    batch, frames, _ = f.shape
    blank = model.config.blank_idx
    device = f.device
    if prefix_tokens:
        prefix = torch.tensor([list(prefix_tokens)] * batch, dtype=torch.long, device=device)
        g, state = model.predict(prefix, add_sos=True)
        g = g[:, -1:]
    else:
        g, state = model.predict(torch.full((batch, 1), -1, dtype=torch.long, device=device), add_sos=False)
    enc_proj = model.joint_enc(f)
    hyps: list[list[int]] = [[] for _ in range(batch)]
    for t in range(frames):
        active = t < f_lens
        for _ in range(max_symbols_per_step):
            logits = model.joint_net(enc_proj[:, t, :] + model.joint_pred(g[:, 0, :]))
            labels = logits.argmax(dim=-1)
            emit = active & (labels != blank)
            if not bool(emit.any()):
                break
            for b in emit.nonzero().flatten().tolist():
                hyps[b].append(int(labels[b]))
            new_g, new_state = model.predict(labels.masked_fill(~emit, -1).unsqueeze(1), state, add_sos=False)
            keep = emit.view(1, -1, 1)
            g = torch.where(emit.view(-1, 1, 1), new_g, g)
            state = (torch.where(keep, new_state[0], state[0]), torch.where(keep, new_state[1], state[1]))
            active = emit
    return hyps
