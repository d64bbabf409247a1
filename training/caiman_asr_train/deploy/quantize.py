"""Weight quantization on export: the math, the ``*.q.pt`` writer, the ONNX bundle entry point and the WER gate.

Symmetric and weight-only (docs/formats.md section 13): for ``b`` bits,
``scale = max|w| / (2^(b-1) - 1)`` over a block of the input axis and
``q = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1)``. ``*_per_channel`` uses
one block spanning the input axis, so one scale per output row (per gate row
of an LSTM weight, per token row of an embedding); ``*_blockwise`` cuts the
input axis into blocks of ``block_size`` elements, the last one shorter when
``block_size`` does not divide it. Biases and other 1-D tensors stay float32.
One exception: ONNX ``int8_per_channel`` graphs run on ONNX Runtime's integer
kernels, whose weight formats differ slightly (``deploy.quantize_onnx``).

``caiman_asr_train.core.quantized`` reads the ``*.q.pt`` layout back (and
documents it); ``caiman_asr_train.deploy.quantize_onnx`` rewrites ONNX graphs.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from caiman_asr_train.core.errors import ExportError, UserError
from caiman_asr_train.core.load_hw import validate_hw_checkpoint
from caiman_asr_train.core.quantized import BITS, QUANTIZATION_KEY, QUANTIZED_STATE_DICT_KEY
from caiman_asr_train.deploy import QUANTIZE_TYPES
from caiman_asr_train.utils.atomic import atomic_torch_save

PathLike = Union[str, Path]

DEFAULT_BLOCK_SIZE = 128
# The graphs holding model weights in each bundle; the features graph's DFT and
# mel matrices are signal processing, not weights, and stay float32.
MODEL_GRAPHS = {
    "onnxruntime": ("encoder.onnx", "predictor.onnx", "joint.onnx"),
    "sherpa-onnx": ("encoder.onnx", "decoder.onnx", "joiner.onnx"),
}


def quantize_settings(quantize_type: str, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[int, Optional[int]]:
    """``quantize_type`` -> (bits, block size along the input axis, None for per channel).

    Raises:
        UserError: unknown type or a block size below 1.
    """
    if quantize_type not in QUANTIZE_TYPES:
        raise UserError(
            f"unknown --quantize_type {quantize_type!r}; choose one of {', '.join(QUANTIZE_TYPES)}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise UserError(f"--block_size must be a positive number of weights, got {block_size!r}")
    return BITS[quantize_type], block_size if quantize_type.endswith("_blockwise") else None


def quantize(w: Tensor, bits: int, block_size: Optional[int], axis: int = -1) -> tuple[Tensor, Tensor]:
    """Symmetric quantization of ``w`` in blocks along ``axis`` (its input axis).

    Returns (q, scale): q int8 of w's shape with values in
    [-2^(bits-1), 2^(bits-1) - 1]; scale float32 of w's shape except
    ``ceil(w.shape[axis] / block)`` along ``axis`` (``block_size=None``: one
    block spanning the axis). ``core.quantized.dequantize(q, scale,
    block_size, axis)`` inverts it to within ``scale / 2`` per element. An
    all-zero block gets scale 0 and q 0.
    """
    w = w.detach().to(torch.float32).movedim(axis, -1)
    length = w.shape[-1]
    block = length if block_size is None else min(block_size, length)
    blocks = -(-length // block)
    padded = torch.nn.functional.pad(w, (0, blocks * block - length)).unflatten(-1, (blocks, block))
    qmax = 2 ** (bits - 1) - 1
    scale = padded.abs().amax(dim=-1) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(padded / safe.unsqueeze(-1)), -qmax - 1, qmax).to(torch.int8)
    q = q.flatten(-2)[..., :length]
    return q.movedim(-1, axis), scale.movedim(-1, axis)


def pack_int4(q: Tensor) -> Tensor:
    """int8 values in [-8, 7] (any shape) -> uint8[ceil(numel / 2)], row-major, first value in the low nibble.

    The ONNX INT4 layout; ``core.quantized.unpack_int4`` inverts it.
    """
    nibbles = (q.flatten().to(torch.int16) & 0x0F).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def quantized_checkpoint(hw: Mapping, quantize_type: str, block_size: int = DEFAULT_BLOCK_SIZE) -> dict:
    """The ``*.q.pt`` dict of hardware-checkpoint dict ``hw`` (layout in ``core.quantized``).

    Every floating 2-D state-dict tensor (LSTM, linear and embedding weights)
    is quantized along its input axis (dim 1); everything else is kept as
    float32. All other keys of ``hw`` are carried unchanged.

    Raises:
        UserError: unknown type or bad block size.
        CheckpointError: ``hw`` is not a valid hardware checkpoint.
    """
    bits, block = quantize_settings(quantize_type, block_size)
    validate_hw_checkpoint(hw, "the checkpoint to quantize")
    entries: dict = {}
    for name, tensor in hw["state_dict"].items():
        if not tensor.is_floating_point():
            entries[name] = tensor
        elif tensor.dim() != 2:
            entries[name] = tensor.to(torch.float32)
        else:
            q, scale = quantize(tensor, bits, block, axis=1)
            entries[name] = {
                "q": pack_int4(q) if bits == 4 else q,
                "scale": scale,
                "shape": list(tensor.shape),
            }
    out = {key: value for key, value in hw.items() if key != "state_dict"}
    out[QUANTIZATION_KEY] = {"type": quantize_type, "bits": bits, "block_size": block}
    out[QUANTIZED_STATE_DICT_KEY] = entries
    return out


def write_quantized_checkpoint(
    hw: Mapping, path: PathLike, quantize_type: str, block_size: int = DEFAULT_BLOCK_SIZE
) -> None:
    """Write ``quantized_checkpoint(hw, ...)`` to ``path`` (a ``*.q.pt``) atomically.

    ``core.load_hw.load_hw_checkpoint(path)`` loads the result (with
    ``weights_only=True``) as a float model with the dequantized weights.
    """
    atomic_torch_save(quantized_checkpoint(hw, quantize_type, block_size), path)


def quantized_weight_bytes(ckpt: Mapping) -> int:
    """Bytes of the weight tensors of a ``*.q.pt`` dict (values and scales) or of a hardware checkpoint dict."""
    if QUANTIZED_STATE_DICT_KEY not in ckpt:
        return sum(t.numel() * t.element_size() for t in ckpt["state_dict"].values())
    total = 0
    for entry in ckpt[QUANTIZED_STATE_DICT_KEY].values():
        tensors = [entry] if isinstance(entry, Tensor) else [entry["q"], entry["scale"]]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def quantize_onnx_bundle(
    bundle_dir: PathLike, target: str, quantize_type: str, block_size: int = DEFAULT_BLOCK_SIZE
) -> None:
    """Quantize the model graphs (``MODEL_GRAPHS[target]``) of an ONNX bundle directory in place.

    ``int8_per_channel`` goes through ONNX Runtime's dynamic quantizer
    (per-channel int8 MatMul and LSTM); the other types, and weights that
    quantizer does not cover, become int8/int4 initializers read through
    ``DequantizeLinear`` with ``block_size``. Call it on the bundle before it is
    renamed into place: each graph file is replaced atomically, but the
    directory as a whole is not.

    Raises:
        UserError: unknown target or type, bad block size, or a graph file missing.
    """
    from caiman_asr_train.deploy.quantize_onnx import quantize_graph_file

    if target not in MODEL_GRAPHS:
        raise UserError(f"ONNX quantization supports targets {', '.join(MODEL_GRAPHS)}, not {target!r}")
    quantize_settings(quantize_type, block_size)
    for name in MODEL_GRAPHS[target]:
        path = Path(bundle_dir) / name
        if not path.is_file():
            raise UserError(f"{path} not found: a {target} bundle needs {', '.join(MODEL_GRAPHS[target])}")
        quantize_graph_file(path, quantize_type, block_size)


def wer_gate(float_wer: float, quant_wer: float, max_wer_increase: float, quantize_type: str) -> None:
    """Refuse a quantized export whose WER rose by more than ``max_wer_increase`` percentage points.

    WERs are fractions (0.123 is 12.3%), as ``evaluate`` returns them;
    ``max_wer_increase`` is absolute percentage points (1.0 allows 12.3% -> 13.3%).

    Raises:
        ExportError: with both WERs and the limit.
    """
    increase = 100 * (quant_wer - float_wer)
    if increase > max_wer_increase:
        raise ExportError(
            f"{quantize_type} export refused: WER {100 * quant_wer:.2f}% vs {100 * float_wer:.2f}% for float32 "
            f"(+{increase:.2f} points > --max_wer_increase {max_wer_increase:g}); nothing was written; try "
            "int8_per_channel or a smaller --block_size, or raise --max_wer_increase"
        )
