"""Read weight-quantized checkpoints (``*.q.pt``) back into float weights.

A ``*.q.pt`` carries every key of a hardware checkpoint (docs/formats.md section 9)
except ``state_dict``, plus:

    quantization:         {"type": "int8_per_channel" | "int8_blockwise" | "int4_per_channel"
                           | "int4_blockwise", "bits": 8 | 4, "block_size": int | None}
    quantized_state_dict: name -> Tensor (float32, kept as it was: biases and other 1-D tensors)
                          or {"q": Tensor, "scale": float32 Tensor[rows, blocks], "shape": [rows, cols]}

A quantized entry is a 2-D weight (LSTM ``weight_ih``/``weight_hh``, linear,
embedding) quantized symmetrically along its input axis (docs/formats.md section 13):
``w[r, c] ~= q[r, c] * scale[r, c // block]``, where ``block`` is the record's
``block_size`` (``None`` = per channel: one block spanning the row, so
``scale`` is ``[rows, 1]``); the last block of a row may be shorter. ``q`` is
int8 ``[rows, cols]`` for 8 bits; for 4 bits it is uint8 ``[ceil(rows * cols / 2)]``:
the row-major values two per byte, the first in the low nibble (the ONNX INT4
layout), each nibble a two's-complement int4.

The file has no ``state_dict`` key on purpose: a reader that does not know
this layout refuses it instead of loading a model without weights.
``caiman_asr_train.deploy.quantize`` writes these files.
"""

from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor

from caiman_asr_train.core.errors import CheckpointError

QUANTIZATION_KEY = "quantization"
QUANTIZED_STATE_DICT_KEY = "quantized_state_dict"
BITS = {"int8_per_channel": 8, "int8_blockwise": 8, "int4_per_channel": 4, "int4_blockwise": 4}

_HINT = "re-export it with python -m caiman_asr_train.export.inference --target pytorch --quantize_weights"


def is_quantized_checkpoint(ckpt: Mapping) -> bool:
    """True for the dict of a ``*.q.pt`` file."""
    return QUANTIZATION_KEY in ckpt


def unpack_int4(packed: Tensor, numel: int) -> Tensor:
    """uint8[ceil(numel / 2)] two values per byte (first in the low nibble) -> int8[numel] in [-8, 7]."""
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten()[:numel].to(torch.int8)
    # Sign-extend the 4-bit two's complement values.
    return nibbles - 16 * (nibbles >= 8).to(torch.int8)


def dequantize(q: Tensor, scale: Tensor, block_size: Optional[int], axis: int = -1) -> Tensor:
    """Integer values q (any shape) times their block's scale -> float32 of q's shape.

    ``scale`` has q's shape except along ``axis``, where it has one entry per
    block of ``block_size`` elements (the last block may be shorter);
    ``block_size=None`` means one block spanning the axis.
    """
    length = q.shape[axis]
    block = length if block_size is None else block_size
    expanded = scale.to(torch.float32).repeat_interleave(block, dim=axis).narrow(axis, 0, length)
    return q.to(torch.float32) * expanded


def dequantize_checkpoint(ckpt: Mapping, source: str = "quantized checkpoint") -> dict:
    """The hardware-checkpoint dict of a ``*.q.pt`` dict: float32 ``state_dict``, no quantization keys.

    ``source`` names the file in error messages.

    Raises:
        CheckpointError: the quantization record or an entry is malformed,
            naming the key at fault.
    """
    record = ckpt[QUANTIZATION_KEY]
    if not isinstance(record, Mapping) or record.get("type") not in BITS:
        raise CheckpointError(
            f"{source}: key '{QUANTIZATION_KEY}' must be a dict whose 'type' is one of {sorted(BITS)}; {_HINT}"
        )
    bits, block_size = BITS[record["type"]], record.get("block_size")
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
    ):
        raise CheckpointError(f"{source}: quantization.block_size must be a positive int or None; {_HINT}")
    entries = ckpt.get(QUANTIZED_STATE_DICT_KEY)
    if not isinstance(entries, Mapping):
        raise CheckpointError(f"{source}: key '{QUANTIZED_STATE_DICT_KEY}' is missing or not a dict; {_HINT}")
    state_dict = {}
    for name, entry in entries.items():
        if isinstance(entry, Tensor):
            state_dict[name] = entry
        else:
            state_dict[name] = _dequantize_entry(
                entry, bits, block_size, f"{source}: {QUANTIZED_STATE_DICT_KEY}.{name}"
            )
    hw = {
        key: value for key, value in ckpt.items() if key not in (QUANTIZATION_KEY, QUANTIZED_STATE_DICT_KEY)
    }
    hw["state_dict"] = state_dict
    return hw


def _dequantize_entry(entry: object, bits: int, block_size: Optional[int], where: str) -> Tensor:
    if not (
        isinstance(entry, Mapping)
        and isinstance(entry.get("q"), Tensor)
        and isinstance(entry.get("scale"), Tensor)
        and isinstance(entry.get("shape"), (list, tuple))
        and len(entry["shape"]) == 2
    ):
        raise CheckpointError(
            f"{where} must be a float tensor or {{'q', 'scale', 'shape': [rows, cols]}}; {_HINT}"
        )
    rows, cols = (int(n) for n in entry["shape"])
    q, scale = entry["q"], entry["scale"]
    if bits == 4:
        if q.dtype != torch.uint8 or q.numel() != (rows * cols + 1) // 2:
            raise CheckpointError(
                f"{where}.q must be {(rows * cols + 1) // 2} packed uint8 int4 pairs; {_HINT}"
            )
        q = unpack_int4(q, rows * cols).view(rows, cols)
    elif q.dtype != torch.int8 or tuple(q.shape) != (rows, cols):
        raise CheckpointError(f"{where}.q must be int8 of shape [{rows}, {cols}]; {_HINT}")
    blocks = 1 if block_size is None else -(-cols // block_size)
    if tuple(scale.shape) != (rows, blocks) or not scale.is_floating_point():
        raise CheckpointError(f"{where}.scale must be a float tensor of shape [{rows}, {blocks}]; {_HINT}")
    return dequantize(q, scale, block_size)
