"""Weight quantization: error bounds of the math, int4 packing, *.q.pt checkpoints and the WER gate."""

import json

import pytest
import torch

from caiman_asr_train import val
from caiman_asr_train.core.decoder import greedy_decode
from caiman_asr_train.core.errors import ExportError, UserError
from caiman_asr_train.core.load_hw import load_hw_checkpoint
from caiman_asr_train.core.quantized import dequantize, unpack_int4
from caiman_asr_train.deploy.quantize import (
    QUANTIZE_TYPES,
    pack_int4,
    quantize,
    quantize_settings,
    quantized_checkpoint,
    quantized_weight_bytes,
    wer_gate,
    write_quantized_checkpoint,
)


def weights(rows: int = 16, cols: int = 300, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed rows of different magnitudes, like trained weights."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=generator)
    return x * x.abs() * torch.rand(rows, 1, generator=generator)


def error(w: torch.Tensor, bits: int, block_size, axis: int = 1) -> torch.Tensor:
    q, scale = quantize(w, bits, block_size, axis=axis)
    return (dequantize(q, scale, block_size, axis=axis) - w).abs()


def test_int8_per_channel_error_is_at_most_half_a_scale_per_element():
    w = weights()
    q, scale = quantize(w, 8, None, axis=1)
    assert q.dtype == torch.int8 and scale.shape == (16, 1)
    torch.testing.assert_close(scale[:, 0], w.abs().amax(dim=1) / 127)
    assert int(q.abs().max()) == 127
    assert bool((error(w, 8, None) <= scale / 2 + 1e-7).all())


def test_blockwise_scales_and_errors_are_at_most_per_channel_ones_on_the_same_tensor():
    w = weights()
    _, channel_scale = quantize(w, 8, None, axis=1)
    for bits in (8, 4):
        _, scale = quantize(w, bits, 64, axis=1)
        assert scale.shape == (16, 5)  # 300 = 4 blocks of 64 + one of 44
        assert bool((scale <= channel_scale * 127 / (2 ** (bits - 1) - 1) + 1e-7).all())
        assert bool((error(w, bits, 64) <= scale.repeat_interleave(64, dim=1)[:, :300] / 2 + 1e-6).all())
        blockwise, per_channel = error(w, bits, 64), error(w, bits, None)
        assert float(blockwise.pow(2).mean()) < float(per_channel.pow(2).mean())
        assert float(blockwise.max()) <= float(per_channel.max()) + 1e-6


def test_int4_errors_exceed_int8_errors():
    w = weights()
    for block_size in (None, 128):
        assert float(error(w, 4, block_size).mean()) > 10 * float(error(w, 8, block_size).mean())


def test_blocks_run_along_the_input_axis_whatever_its_position_and_the_last_block_is_shorter():
    w = weights(rows=5, cols=70)
    q_rows, scale_rows = quantize(w, 8, 32, axis=1)
    q_cols, scale_cols = quantize(w.T.contiguous(), 8, 32, axis=0)
    assert scale_rows.shape == (5, 3) and scale_cols.shape == (3, 5)
    torch.testing.assert_close(q_cols, q_rows.T)
    torch.testing.assert_close(scale_rows[:, 2], w[:, 64:].abs().amax(dim=1) / 127)


def test_all_zero_rows_quantize_to_zero_and_a_block_larger_than_the_row_is_per_channel():
    w = weights(rows=3, cols=20)
    w[1] = 0
    q, scale = quantize(w, 4, 1000, axis=1)
    assert scale.shape == (3, 1) and float(scale[1, 0]) == 0.0
    assert bool((q[1] == 0).all())
    assert bool((dequantize(q, scale, 1000)[1] == 0).all())
    torch.testing.assert_close(scale, quantize(w, 4, None, axis=1)[1])


@pytest.mark.parametrize("numel", [1, 2, 7, 64, 301])
def test_int4_packing_round_trips_odd_and_even_lengths(numel):
    values = torch.arange(numel) % 16 - 8
    q = values.to(torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 1) // 2
    torch.testing.assert_close(unpack_int4(packed, numel), q)


def test_int4_packing_puts_the_first_value_in_the_low_nibble():
    packed = pack_int4(torch.tensor([-1, 3, -8], dtype=torch.int8))
    assert packed.tolist() == [0x3F, 0x08]


def test_unknown_types_and_bad_block_sizes_are_refused_in_one_line():
    assert quantize_settings("int4_blockwise", 32) == (4, 32)
    assert quantize_settings("int8_per_channel", 32) == (8, None)
    with pytest.raises(UserError, match="unknown --quantize_type 'int3'.*int8_per_channel"):
        quantize_settings("int3", 128)
    with pytest.raises(UserError, match="--block_size must be a positive"):
        quantize_settings("int8_blockwise", 0)


def spliced(tiny_hw, frames: int = 30, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    in_feats = tiny_hw.hw["rnnt_config"]["rnnt"]["in_feats"]
    return torch.randn(frames, batch, in_feats, generator=generator), torch.tensor([frames, frames - 7])


@pytest.mark.parametrize("quantize_type", QUANTIZE_TYPES)
def test_a_q_pt_loads_with_weights_only_and_decodes_with_its_dequantized_weights(
    tiny_hw, tmp_path, quantize_type
):
    path = tmp_path / "model.q.pt"
    write_quantized_checkpoint(tiny_hw.hw, path, quantize_type, block_size=16)
    stored = torch.load(path, weights_only=True)
    assert "state_dict" not in stored  # a reader that does not know the layout refuses it
    assert stored["quantization"]["type"] == quantize_type
    assert stored["sentpiece_model"] == tiny_hw.hw["sentpiece_model"]

    loaded = load_hw_checkpoint(path)
    assert loaded.step == 42
    float_state = tiny_hw.hw["state_dict"]
    for name, tensor in loaded.model.state_dict().items():
        if tensor.dim() == 1:
            assert torch.equal(tensor, float_state[name]), name  # biases stay float32
        else:
            entry = stored["quantized_state_dict"][name]
            assert entry["q"].dtype == (torch.uint8 if quantize_type.startswith("int4") else torch.int8)
            assert not torch.equal(tensor, float_state[name]), name
    x, lens = spliced(tiny_hw)
    hyps = greedy_decode(loaded.model, x, lens, max_symbols_per_step=2)
    assert len(hyps) == 2 and all(hyps)


def test_q_pt_logits_stay_close_to_float_and_int4_moves_them_more_than_int8(tiny_hw, tmp_path):
    x, lens = spliced(tiny_hw)
    y = torch.tensor([[1, 2, 3], [4, 5, 6]])

    def logits(model):
        with torch.no_grad():
            return model(x, lens, y)[0]

    reference = logits(tiny_hw.model)
    deviation = {}
    for quantize_type in QUANTIZE_TYPES:
        path = tmp_path / f"{quantize_type}.q.pt"
        write_quantized_checkpoint(tiny_hw.hw, path, quantize_type, block_size=16)
        deviation[quantize_type] = float((logits(load_hw_checkpoint(path).model) - reference).abs().mean())
    spread = float(reference.abs().mean())
    assert deviation["int8_per_channel"] < 0.02 * spread
    assert deviation["int8_blockwise"] < 0.02 * spread
    assert min(deviation["int4_blockwise"], deviation["int4_per_channel"]) > 4 * max(
        deviation["int8_blockwise"], deviation["int8_per_channel"]
    )


def test_q_pt_weight_bytes_shrink_by_type(tiny_hw):
    fp32 = quantized_weight_bytes(tiny_hw.hw)
    sizes = {
        t: quantized_weight_bytes(quantized_checkpoint(tiny_hw.hw, t, 16)) / fp32 for t in QUANTIZE_TYPES
    }
    assert sizes["int4_per_channel"] < sizes["int4_blockwise"] < sizes["int8_per_channel"] < 0.4
    assert sizes["int8_per_channel"] < sizes["int8_blockwise"]


def test_val_validates_a_q_pt_like_a_hardware_checkpoint(tiny_hw, speech, tmp_path, capsys):
    path = tmp_path / "model.q.pt"
    write_quantized_checkpoint(tiny_hw.hw, path, "int8_per_channel")
    args = [
        "--ckpt",
        str(path),
        "--val_manifests",
        str(speech.manifest),
        "--output_dir",
        str(tmp_path / "val"),
    ]
    assert val.main(args + ["--device", "cpu", "--max_symbol_per_sample", "2"]) == 0
    predictions = json.loads((tmp_path / "val" / "model.q.predictions.json").read_text())
    assert len(predictions) == len(speech.texts)


def test_the_wer_gate_passes_within_the_limit_and_refuses_beyond_it_with_both_wers():
    wer_gate(0.100, 0.109, 1.0, "int8_per_channel")
    with pytest.raises(
        ExportError, match=r"int4_blockwise export refused: WER 11\.50% vs 10\.00%.*\+1\.50 points"
    ):
        wer_gate(0.100, 0.115, 1.0, "int4_blockwise")
