"""Weight quantization of one ONNX graph file (the op layout is documented in ``caiman_asr_train.deploy``).

``int8_per_channel`` maps onto ONNX Runtime's dynamic quantizer, which also
quantizes activations on the fly and runs integer kernels (2x the float
encoder's speed at the demo size):

- ``MatMul`` -> ``MatMulInteger`` with per-output-column symmetric weights,
  stored as uint8 with zero point 128 (scale ``max|w| / 127.5``) so that x86
  CPUs without VNNI use their u8u8 kernels;
- ``LSTM`` -> ``DynamicQuantizeLSTM`` with one symmetric scale per gate row.
  It takes int8 weights only, whose products with uint8 activations saturate
  the u8s8 kernels of x86 CPUs without VNNI (28% output error on a test
  encoder), so its weights use ONNX Runtime's reduced range [-64, 64]
  (scale ``max|w| / 64``), which cannot saturate.

Every other weight, and every weight of the other types, becomes an int8/int4
initializer read through ``DequantizeLinear`` with ``block_size`` along the
weight's input axis, values and scales from ``deploy.quantize.quantize``
(exactly docs/formats.md section 13). ONNX Runtime fuses each ``DequantizeLinear ->
MatMul`` pair into ``MatMulNBits`` at load; the LSTM weights are dequantized on
every run (a tenth of the float encoder's speed at the demo size) unless the
session folds them at load (session config ``session.disable_quant_qdq`` = 1:
float speed, float weights in memory). Blocked ``DequantizeLinear`` and int4
need opset 21, so graphs of an older opset are converted first; the
conversion changes no float result.
"""

import logging
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper, version_converter

from caiman_asr_train.deploy.quantize import pack_int4, quantize, quantize_settings
from caiman_asr_train.utils.atomic import atomic_write_bytes

# The first opset whose DequantizeLinear takes block_size and int4 inputs.
DEQUANTIZE_OPSET = 21
# ONNX Runtime's dynamic quantizer handles these for int8_per_channel.
DYNAMIC_INT8_OPS = ("MatMul", "LSTM")


def quantize_graph_file(path: Path, quantize_type: str, block_size: int) -> None:
    """Quantize the weights of the ONNX graph at ``path`` and replace the file atomically."""
    bits, block = quantize_settings(quantize_type, block_size)
    model = onnx.load(path)
    dynamic = quantize_type == "int8_per_channel"
    model = dequantize_linear_weights(model, bits, block, skip_ops=DYNAMIC_INT8_OPS if dynamic else ())
    if dynamic:
        model = _dynamic_int8(model)
    onnx.checker.check_model(model)
    atomic_write_bytes(path, model.SerializeToString())


def weight_inputs(model: onnx.ModelProto) -> dict[str, int]:
    """Float32 initializers used as weights -> the axis they are quantized along (the input axis).

    MatMul ``B [.., K, N]``: K. Gemm ``B``: K (axis 1 when ``transB``). LSTM ``W [D, 4H, in]`` and
    ``R [D, 4H, H]``: the last axis, so one scale per gate row. Gather ``data [V, E]`` (an embedding
    table): the last axis, so one scale per row.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    found: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul":
            axes = {1: -2}
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axes = {1: 1 if trans_b else 0}
        elif node.op_type == "LSTM":
            axes = {1: -1, 2: -1}
        elif node.op_type == "Gather":
            axes = {0: -1}
        else:
            continue
        for index, axis in axes.items():
            name = node.input[index] if index < len(node.input) else ""
            init = initializers.get(name)
            if init is not None and init.data_type == TensorProto.FLOAT and len(init.dims) >= 2:
                found.setdefault(name, axis % len(init.dims))
    return found


def dequantize_linear_weights(
    model: onnx.ModelProto, bits: int, block_size: Optional[int], skip_ops: tuple[str, ...] = ()
) -> onnx.ModelProto:
    """Replace each weight initializer (``weight_inputs``) by int8/int4 values + scales + ``DequantizeLinear``.

    Weights used only by ``skip_ops`` nodes are left as they are. Per channel
    is a block spanning the input axis. Returns the model at opset
    ``DEQUANTIZE_OPSET`` or later.
    """
    consumers: dict[str, set] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    targets = {
        name: axis for name, axis in weight_inputs(model).items() if not consumers[name] <= set(skip_ops)
    }
    if not targets:
        return model
    model = at_least_opset(model, DEQUANTIZE_OPSET)
    kept, nodes = [], []
    qtype = TensorProto.INT4 if bits == 4 else TensorProto.INT8
    for init in model.graph.initializer:
        axis = targets.get(init.name)
        if axis is None:
            kept.append(init)
            continue
        w = torch.from_numpy(numpy_helper.to_array(init).copy())
        q, scale = quantize(w, bits, block_size, axis=axis)
        values_name, scale_name = f"{init.name}_q{bits}", f"{init.name}_scale"
        if bits == 4:
            values = helper.make_tensor(
                values_name, qtype, list(q.shape), pack_int4(q).numpy().tobytes(), raw=True
            )
        else:
            values = numpy_helper.from_array(q.numpy(), values_name)
        kept += [values, numpy_helper.from_array(scale.numpy().astype(np.float32), scale_name)]
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [values_name, scale_name],
                [init.name],
                name=f"{init.name}_dequantize",
                axis=axis,
                block_size=w.shape[axis] if block_size is None else min(block_size, w.shape[axis]),
            )
        )
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    # The dequantized tensors keep the initializers' names, so consumers are unchanged.
    graph_nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + graph_nodes)
    return model


def at_least_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` converted to default-domain ``opset`` if it is older (ONNX's version converter)."""
    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return model if current >= opset else version_converter.convert_version(model, opset)


def _dynamic_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's dynamic per-channel symmetric quantization of MatMul and LSTM weights (module docstring)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.onnx"
        onnx.save(model, path)
        # The quantizer logs advice on the root logger (run its pre-processing, the model may be
        # quantized already: it sees our DequantizeLinear nodes) that does not apply here.
        logging.disable(logging.WARNING)
        try:
            for op_type, weight_type, reduce_range in (
                ("MatMul", QuantType.QUInt8, False),
                ("LSTM", QuantType.QInt8, True),
            ):
                quantize_dynamic(
                    path,
                    path,
                    op_types_to_quantize=[op_type],
                    per_channel=True,
                    reduce_range=reduce_range,
                    weight_type=weight_type,
                    extra_options={"WeightSymmetric": True, "MatMulConstBOnly": True},
                )
        finally:
            logging.disable(logging.NOTSET)
        return onnx.load(path)
