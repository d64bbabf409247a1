"""Reading *.q.pt files: dequantization, and malformed files refused in one line naming the key."""

import pytest
import torch

from caiman_asr_train.core.errors import CheckpointError
from caiman_asr_train.core.load_hw import load_hw_checkpoint, validate_hw_checkpoint
from caiman_asr_train.core.quantized import dequantize, dequantize_checkpoint, unpack_int4
from caiman_asr_train.deploy.quantize import quantized_checkpoint
from caiman_asr_train.export.hardware_ckpt import create_hardware_ckpt

pytestmark = pytest.mark.filterwarnings("ignore:the EMA weights match no FPGA")


@pytest.fixture
def hw(export_env) -> dict:
    return create_hardware_ckpt(export_env.ckpt_path, export_env.config_path, skip_state_dict_check=True)


def test_unpack_reads_the_low_nibble_first_and_sign_extends():
    packed = torch.tensor([0x8F, 0x07], dtype=torch.uint8)
    assert unpack_int4(packed, 3).tolist() == [-1, -8, 7]


def test_dequantize_repeats_each_scale_over_its_block_and_the_shorter_last_block():
    q = torch.ones(2, 5, dtype=torch.int8)
    scale = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert dequantize(q, scale, 2).tolist() == [[1, 1, 2, 2, 3], [4, 4, 5, 5, 6]]
    assert dequantize(q, scale[:, :1], None).tolist() == [[1] * 5, [4] * 5]


def test_a_q_pt_is_no_hardware_checkpoint_until_dequantized(hw):
    quantized = quantized_checkpoint(hw, "int4_blockwise", 8)
    with pytest.raises(CheckpointError, match="key 'state_dict' is missing"):
        validate_hw_checkpoint(quantized)
    restored = dequantize_checkpoint(quantized)
    validate_hw_checkpoint(restored)
    assert list(restored["state_dict"]) == list(hw["state_dict"])
    assert all(restored["state_dict"][k].shape == v.shape for k, v in hw["state_dict"].items())


def damage_type(q):
    q["quantization"]["type"] = "int2_per_channel"


def damage_block_size(q):
    q["quantization"]["block_size"] = 0


def damage_values(q):
    q["quantized_state_dict"]["joint_net.2.weight"]["q"] = torch.zeros(3, dtype=torch.uint8)


def damage_scales(q):
    entry = q["quantized_state_dict"]["joint_enc.weight"]
    entry["scale"] = entry["scale"][:, :1]


def damage_entry(q):
    q["quantized_state_dict"]["joint_enc.weight"] = {"q": torch.zeros(2)}


@pytest.mark.parametrize(
    "damage, words",
    [
        (damage_type, "key 'quantization' must be a dict whose 'type' is one of"),
        (damage_block_size, "quantization.block_size must be a positive int"),
        (damage_values, "quantized_state_dict.joint_net.2.weight.q must be"),
        (damage_scales, "quantized_state_dict.joint_enc.weight.scale must be a float tensor of shape"),
        (damage_entry, "quantized_state_dict.joint_enc.weight must be a float tensor or"),
    ],
)
def test_malformed_q_pt_files_are_refused_naming_the_key(hw, tmp_path, damage, words):
    quantized = quantized_checkpoint(hw, "int4_blockwise", 8)
    damage(quantized)
    path = tmp_path / "bad.q.pt"
    torch.save(quantized, path)
    with pytest.raises(CheckpointError, match=f"{path}: .*{words.replace('.', '[.]')}"):
        load_hw_checkpoint(path)
