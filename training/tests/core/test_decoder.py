"""Batched greedy decoding equals one-utterance-at-a-time decoding."""

import torch

from caiman_asr_train.core.decoder import greedy_decode
from caiman_asr_train.core.model import RNNT, ConfigRNNT


def reference_greedy(model: RNNT, x: torch.Tensor, length: int, max_symbols: int) -> list[int]:
    """Unbatched greedy decoding written directly from the transducer definition."""
    f, f_lens, _ = model.encode(x[:length, None], torch.tensor([length]))
    labels: list[int] = []
    g, state = model.predict(None)
    for t in range(int(f_lens[0])):
        for _ in range(max_symbols):
            k = int(model.joint(f[:, t : t + 1], g)[0, 0, 0].argmax())
            if k == model.config.blank_idx:
                break
            labels.append(k)
            g, state = model.predict(torch.tensor([[k]]), state, add_sos=False)
    return labels


def make_model(seed: int, blank_bias: float) -> RNNT:
    torch.manual_seed(seed)
    model = RNNT(
        ConfigRNNT(
            n_classes=7,
            in_feats=6,
            enc_n_hid=12,
            enc_pre_rnn_layers=1,
            enc_post_rnn_layers=1,
            enc_stack_time_factor=2,
            pred_n_hid=8,
            pred_rnn_layers=1,
            joint_n_hid=9,
        )
    ).eval()
    with torch.no_grad():
        model.joint_net[2].bias[-1] += blank_bias
    return model


def test_batched_greedy_equals_reference():
    torch.manual_seed(123)
    x = torch.randn(16, 4, 6) * 3
    lens = [16, 11, 7, 2]
    checked_nonempty = False
    for seed in range(4):
        model = make_model(seed, blank_bias=-0.5)
        batched = greedy_decode(model, x, torch.tensor(lens), max_symbols_per_step=3)
        for b, length in enumerate(lens):
            assert batched[b] == reference_greedy(model, x[:, b], length, 3)
            checked_nonempty |= bool(batched[b])
    assert checked_nonempty


def test_symbol_cap_per_frame():
    model = make_model(0, blank_bias=-100.0)
    hyps = greedy_decode(model, torch.randn(8, 1, 6), torch.tensor([8]), max_symbols_per_step=2)
    assert len(hyps[0]) == 4 * 2


def test_blank_dominated_model_outputs_nothing():
    model = make_model(0, blank_bias=100.0)
    assert greedy_decode(model, torch.randn(8, 2, 6), torch.tensor([8, 5])) == [[], []]


def test_prefix_tokens_condition_the_prediction_network():
    model = make_model(1, blank_bias=-0.5)
    x = torch.randn(10, 1, 6)
    plain = greedy_decode(model, x, torch.tensor([10]), max_symbols_per_step=1)
    prefixed = greedy_decode(model, x, torch.tensor([10]), max_symbols_per_step=1, prefix_tokens=[2, 3])
    assert plain != prefixed
