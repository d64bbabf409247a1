"""The model contract of docs/formats.md section 5: names, order, shapes, initialisation, streaming."""

import json
import warnings

import pytest
import torch

from caiman_asr_train.core.model import RNNT, ConfigRNNT
from caiman_asr_train.export.model_schema import (
    CheckpointNotSupportedError,
    check_model_schema,
    get_schema,
    return_schemas,
    state_dict_schema,
)
from caiman_asr_train.rnnt import config
from caiman_asr_train.rnnt.model import RNNT as TrainRNNT

CONFIGS = "configs"


def build_from_yaml(name: str, vocab_size: int, device: str = "meta") -> TrainRNNT:
    cfg = config.load(f"{CONFIGS}/{name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = config.rnnt(cfg)
    with torch.device(device):
        return TrainRNNT(vocab_size + 1, **kwargs)


def expected_names(pre: int, post: int, pred: int) -> list[str]:
    def lstm(prefix: str, layers: int) -> list[str]:
        return [
            f"{prefix}.{kind}_l{k}"
            for k in range(layers)
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        ]

    return (
        lstm("encoder.pre_rnn.lstm", pre)
        + lstm("encoder.post_rnn.lstm", post)
        + ["prediction.embed.weight"]
        + lstm("prediction.dec_rnn.lstm", pred)
        + [
            "joint_pred.weight",
            "joint_pred.bias",
            "joint_enc.weight",
            "joint_enc.bias",
            "joint_net.2.weight",
            "joint_net.2.bias",
        ]
    )


@pytest.mark.parametrize(
    "yaml_name, vocab, H, P, J, params, variant",
    [
        ("base-8703sp.yaml", 8703, 1024, 512, 768, 84_690_432, "base"),
        ("large-17407sp.yaml", 17407, 1536, 768, 1024, 195_590_400, "large"),
    ],
)
def test_fpga_variants_have_the_contract_shapes(yaml_name, vocab, H, P, J, params, variant):
    model = build_from_yaml(yaml_name, vocab)
    sd = model.state_dict()
    assert list(sd) == expected_names(2, 6, 2)
    assert len(sd) == 47
    assert sum(t.numel() for t in sd.values()) == params
    n_classes = vocab + 1
    assert sd["encoder.pre_rnn.lstm.weight_ih_l0"].shape == (4 * H, 240)
    assert sd["encoder.pre_rnn.lstm.weight_ih_l1"].shape == (4 * H, H)
    assert sd["encoder.post_rnn.lstm.weight_ih_l0"].shape == (4 * H, 2 * H)
    assert sd["encoder.post_rnn.lstm.weight_ih_l5"].shape == (4 * H, H)
    assert sd["encoder.post_rnn.lstm.bias_hh_l5"].shape == (4 * H,)
    assert sd["prediction.embed.weight"].shape == (vocab, P)
    assert sd["prediction.dec_rnn.lstm.weight_hh_l1"].shape == (4 * P, P)
    assert sd["joint_pred.weight"].shape == (J, P)
    assert sd["joint_enc.weight"].shape == (J, H)
    assert sd["joint_net.2.weight"].shape == (n_classes, J)
    assert check_model_schema(sd, return_schemas()) == variant


def test_checked_in_schemas_match_the_model_class():
    for name, (yaml_name, vocab) in {
        "base": ("base-8703sp.yaml", 8703),
        "large": ("large-17407sp.yaml", 17407),
    }.items():
        assert get_schema(name) == state_dict_schema(build_from_yaml(yaml_name, vocab).state_dict())


def test_testing_config_is_not_an_fpga_variant():
    sd = build_from_yaml("testing-1023sp.yaml", 1023).state_dict()
    with pytest.raises(CheckpointNotSupportedError, match="--skip_state_dict_check"):
        check_model_schema(sd, return_schemas())


def test_wrong_vocabulary_names_the_differing_key():
    sd = build_from_yaml("base-8703sp.yaml", 1023).state_dict()
    with pytest.raises(CheckpointNotSupportedError, match="prediction.embed.weight"):
        check_model_schema(sd, return_schemas())


def test_schema_files_are_plain_json_in_state_dict_order():
    schema = get_schema("base")
    assert list(schema) == expected_names(2, 6, 2)
    assert all(isinstance(shape, list) for shape in schema.values())
    json.dumps(schema)


def small_config(**overrides) -> ConfigRNNT:
    fields = dict(
        n_classes=11,
        in_feats=12,
        enc_n_hid=16,
        enc_pre_rnn_layers=2,
        enc_post_rnn_layers=2,
        enc_stack_time_factor=2,
        pred_n_hid=8,
        pred_rnn_layers=2,
        joint_n_hid=10,
    )
    fields.update(overrides)
    return ConfigRNNT(**fields)


def test_forget_gate_initialisation():
    model = RNNT(small_config())
    lstm_biases = {k: v for k, v in model.state_dict().items() if ".bias_" in k}
    assert len(lstm_biases) == 2 * (2 + 2 + 2)
    for name, bias in lstm_biases.items():
        hidden = bias.shape[0] // 4
        forget = bias[hidden : 2 * hidden]
        expected = 1.0 if ".bias_ih_" in name else 0.0
        assert torch.all(forget == expected), name
        # the other gates keep PyTorch's non-zero default initialisation
        assert bias[:hidden].abs().sum() > 0


def test_weights_init_scale_scales_lstm_weights():
    torch.manual_seed(0)
    plain = RNNT(small_config()).state_dict()
    torch.manual_seed(0)
    scaled = RNNT(small_config(weights_init_scale=0.5)).state_dict()
    name = "encoder.pre_rnn.lstm.weight_hh_l0"
    torch.testing.assert_close(scaled[name], plain[name] * 0.5)


def test_state_dict_holds_only_contract_keys():
    model = RNNT(small_config(enc_pre_rnn_layers=1, enc_post_rnn_layers=1, pred_rnn_layers=1))
    assert list(model.state_dict()) == expected_names(1, 1, 1)


def test_forward_shapes_and_stack_time_lengths():
    model = RNNT(small_config()).eval()
    x = torch.randn(9, 3, 12)
    x_lens = torch.tensor([9, 6, 3])
    y = torch.randint(0, 10, (3, 4))
    logits, f_lens = model(x, x_lens, y)
    assert logits.shape == (3, 5, 5, 11)
    assert f_lens.tolist() == [5, 3, 2]


def test_stack_time_concatenates_following_frames():
    model = RNNT(small_config())
    x = torch.arange(5.0).view(5, 1, 1)
    stacked, lens = model.encoder.stack_time(x, torch.tensor([5]))
    assert stacked.squeeze(1).tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 0.0]]
    assert lens.tolist() == [3]


def test_stack_time_uses_zeros_past_each_utterances_end():
    model = RNNT(small_config())
    x = torch.arange(1.0, 7.0).view(3, 2, 1)  # utterance 0 has 3 frames, utterance 1 has 1
    stacked, lens = model.encoder.stack_time(x, torch.tensor([3, 1]))
    assert stacked[:, 1].tolist() == [[2.0, 0.0], [0.0, 0.0]]
    assert stacked[:, 0].tolist() == [[1.0, 3.0], [5.0, 0.0]]
    assert lens.tolist() == [2, 1]


def test_encoder_output_does_not_depend_on_batch_padding():
    torch.manual_seed(0)
    model = RNNT(small_config()).eval()
    short = torch.randn(5, 1, 12)
    alone, alone_lens, _ = model.encode(short, torch.tensor([5]))
    batch = torch.cat([torch.cat([short, torch.randn(4, 1, 12)]), torch.randn(9, 1, 12)], dim=1)
    batched, batched_lens, _ = model.encode(batch, torch.tensor([5, 9]))
    assert batched_lens[0] == alone_lens[0] == 3
    torch.testing.assert_close(batched[:1, :3], alone)


def test_prediction_starts_from_an_all_zero_input():
    model = RNNT(small_config()).eval()
    y = torch.tensor([[3, 4]])
    g, _ = model.predict(y)
    zero_start, _ = model.prediction.dec_rnn(torch.zeros(1, 1, 8))
    torch.testing.assert_close(g[:, 0], zero_start[0])
    g_none, _ = model.predict(None)
    torch.testing.assert_close(g_none[:, 0], g[:, 0])


def test_joint_is_sum_of_projections_through_joint_net():
    model = RNNT(small_config()).eval()
    f = torch.randn(2, 3, 16)
    g = torch.randn(2, 4, 8)
    logits = model.joint(f, g)
    manual = model.joint_net[2](torch.relu(model.joint_enc(f[1, 2]) + model.joint_pred(g[1, 3])))
    torch.testing.assert_close(logits[1, 2, 3], manual)


def test_chunked_encode_and_predict_equal_whole_sequence():
    torch.manual_seed(1)
    model = RNNT(small_config()).eval()
    x = torch.randn(12, 2, 12)
    lens = torch.tensor([12, 12])
    whole, _, _ = model.encode(x, lens)
    first, _, state = model.encode(x[:4], torch.tensor([4, 4]))
    second, _, state = model.encode(x[4:10], torch.tensor([6, 6]), state)
    third, _, _ = model.encode(x[10:], torch.tensor([2, 2]), state)
    torch.testing.assert_close(torch.cat([first, second, third], dim=1), whole)

    y = torch.randint(0, 10, (2, 6))
    g_whole, _ = model.predict(y)
    g_first, pred_state = model.predict(y[:, :2])
    g_rest, _ = model.predict(y[:, 2:], pred_state, add_sos=False)
    torch.testing.assert_close(torch.cat([g_first, g_rest], dim=1), g_whole)
