"""Real core RNNTs with hand-set weights whose next-token distribution is a chosen table.

The prediction LSTM's forget gate is shut and its output gate open, so its
output depends only on the last token; the joint's output layer then maps
each last token to the log-probabilities of a table, whatever the audio.
"""

import math
from typing import Optional

import torch

from caiman_asr_train.core.model import RNNT, ConfigRNNT

BIG = 30.0


def table_model(n_tokens: int, table: dict[Optional[int], dict[int, float]]) -> RNNT:
    """An RNNT over ``n_tokens`` tokens (blank = ``n_tokens``) with fixed next-symbol probabilities.

    ``table[last]`` maps a symbol (a token id, or ``n_tokens`` for blank) to its
    probability after token ``last`` (``None``: at the start); symbols not
    given share what is left. Rows not given are the start row.
    """
    n_classes = n_tokens + 1
    hidden = n_tokens
    model = RNNT(
        ConfigRNNT(
            n_classes=n_classes,
            in_feats=3,
            enc_n_hid=4,
            enc_pre_rnn_layers=1,
            enc_post_rnn_layers=1,
            enc_stack_time_factor=1,
            pred_n_hid=hidden,
            pred_rnn_layers=1,
            joint_n_hid=hidden,
        )
    ).eval()
    with torch.no_grad():
        lstm = model.prediction.dec_rnn.lstm
        h = hidden
        model.prediction.embed.weight.copy_(torch.eye(n_tokens) * BIG)
        lstm.weight_hh_l0.zero_()
        lstm.weight_ih_l0.zero_()
        lstm.weight_ih_l0[3 * h :].zero_()
        # gates i, f, g, o: input open, forget shut, cell candidate = tanh(x), output open
        lstm.weight_ih_l0[2 * h : 3 * h].copy_(torch.eye(h))
        lstm.bias_hh_l0.zero_()
        lstm.bias_ih_l0.zero_()
        lstm.bias_ih_l0[:h] = BIG
        lstm.bias_ih_l0[h : 2 * h] = -BIG
        lstm.bias_ih_l0[3 * h :] = BIG
        model.joint_enc.weight.zero_()
        model.joint_enc.bias.zero_()
        model.joint_pred.weight.copy_(torch.eye(h))
        model.joint_pred.bias.fill_(1.0)
        # After token j the joint input is 1 + v*e_j (v = tanh(tanh(BIG)) ~ 0.76), at the start all ones.
        v = math.tanh(math.tanh(BIG))
        start = _log_row(table.get(None, {}), n_classes)
        out = model.joint_net[2]
        for j in range(n_tokens):
            row = _log_row(table.get(j, table.get(None, {})), n_classes)
            out.weight[:, j] = (row - start) / v
        out.bias.copy_(start - out.weight.sum(dim=1))
    return model


def _log_row(probs: dict[int, float], n_classes: int) -> torch.Tensor:
    rest = [s for s in range(n_classes) if s not in probs]
    left = 1.0 - sum(probs.values())
    row = torch.tensor(
        [probs.get(s, left / max(len(rest), 1)) for s in range(n_classes)], dtype=torch.float64
    )
    return row.clamp_min(1e-9).log().float()


def silence(frames: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Spliced-feature input x[frames, batch, 3] and its lengths (the table models ignore it)."""
    return torch.zeros(frames, batch, 3), torch.full((batch,), frames)
