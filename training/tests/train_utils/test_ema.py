"""EMA over every state entry."""

import copy

import torch
from torch import nn

from caiman_asr_train.train_utils.ema import update_ema


class WithBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("running", torch.zeros(2))
        self.register_buffer("count", torch.tensor(0, dtype=torch.long))


def test_ema_averages_parameters_and_float_buffers_and_copies_integers():
    model = WithBuffers()
    ema = copy.deepcopy(model)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.running.fill_(4.0)
        model.count.fill_(7)
    update_ema(ema, model, decay=0.75)
    state = ema.state_dict()
    for key in ("linear.weight", "linear.bias"):
        torch.testing.assert_close(state[key], 0.75 * before[key] + 0.25 * model.state_dict()[key])
    torch.testing.assert_close(state["running"], torch.full((2,), 1.0))
    assert int(state["count"]) == 7


def test_ema_unwraps_a_wrapped_model():
    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = WithBuffers()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        model.linear.weight.fill_(2.0)
        ema.linear.weight.fill_(0.0)
    update_ema(ema, Wrapper(model), decay=0.5)
    assert torch.equal(ema.linear.weight, torch.ones_like(ema.linear.weight))
