"""The training RNNT: same state dict as core, optimiser groups, freezing, loss."""

import warnings
from pathlib import Path

import pytest
import torch

from caiman_asr_train.core.model import RNNT as CoreRNNT
from caiman_asr_train.rnnt import config
from caiman_asr_train.rnnt.model import RNNT, config_rnnt

SMALL = dict(
    in_feats=12,
    enc_n_hid=16,
    enc_pre_rnn_layers=1,
    enc_post_rnn_layers=1,
    enc_stack_time_factor=2,
    pred_n_hid=8,
    pred_rnn_layers=1,
    joint_n_hid=10,
    joint_net_lr_factor=0.5,
    enc_lr_factor=2.0,
)


def test_training_model_state_dict_equals_core_model():
    torch.manual_seed(0)
    train = RNNT(11, **SMALL)
    torch.manual_seed(0)
    core = CoreRNNT(config_rnnt(11, **SMALL))
    assert list(train.state_dict()) == list(core.state_dict())
    for a, b in zip(train.state_dict().values(), core.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_param_groups_apply_lr_factors_and_cover_every_parameter():
    model = RNNT(11, **SMALL)
    groups = model.param_groups(lr=0.01)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {
        "encoder": 0.02,
        "prediction": 0.01,
        "joint_enc": 0.01,
        "joint_pred": 0.01,
        "joint_net": 0.005,
    }
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters()}


def test_enc_freeze_keeps_encoder_out_of_the_optimiser():
    model = RNNT(11, **SMALL, enc_freeze=True)
    groups = {g["name"]: g["params"] for g in model.param_groups(0.1)}
    assert groups["encoder"] == []
    assert all(not p.requires_grad for p in model.encoder.parameters())


def test_loss_is_finite_and_trains():
    torch.manual_seed(0)
    model = RNNT(11, **SMALL)
    x = torch.randn(20, 2, 12)
    x_lens = torch.tensor([20, 14])
    y = torch.tensor([[1, 2, 3], [4, 5, 0]])
    y_lens = torch.tensor([3, 2])
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    first = None
    for _ in range(30):
        loss = model.loss(x, x_lens, y, y_lens)
        assert torch.isfinite(loss)
        first = first if first is not None else loss.item()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.5 * first


def test_unsupported_training_keys_warn_once_each():
    cfg = config.load(Path(__file__).resolve().parents[2] / "configs" / "testing-1023sp.yaml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config.rnnt(cfg)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "custom_lstm" in messages[0]
    cfg["rnnt"].update(custom_lstm=False, quantize=True)
    with pytest.warns(UserWarning, match="quantize"):
        config.rnnt(cfg)
