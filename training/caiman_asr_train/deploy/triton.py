"""Triton Inference Server model repositories for the ONNX Runtime bundle's graphs.

``write_triton_target(bundle_dir, target_dir)`` writes

    target_dir/model_repository/<graph>/config.pbtxt     one model per *.onnx of the bundle
    target_dir/model_repository/<graph>/1/model.onnx     the graph, unchanged
    target_dir/client/...                                the bundle's other files (tokenizer.model,
                                                         ngram.binary, bundle.json) for the client

Every config uses the ONNX Runtime backend with ``max_batch_size: 0``: our
LSTM states are ``[layers, N, hidden]``, batch in the middle, and Triton
batches along the first dimension only, so each request carries its own
batch dimension. A graph that carries state (an input and an output that
differ only by an ``in``/``out``/``new``/``next`` word, with the same type
and shape, such as ``pre_h`` -> ``pre_h_out``) gets sequence batching with
implicit state: the server keeps the state per sequence id, starts every
sequence from zeros, and the state tensors leave the model's public inputs.
The encoder and predictor must carry state; a bundle whose graphs do not is
refused.

``validate_triton_repository`` parses each ``config.pbtxt`` into Triton's
``ModelConfig`` protobuf (tritonclient's ``model_config_pb2``) and checks its
inputs, outputs and states against the ONNX graph's names, element types and
shapes read with the ``onnx`` package. The Triton server itself is not run.
"""

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from caiman_asr_train.core.errors import ExportError
from caiman_asr_train.utils.atomic import atomic_write_bytes

__all__ = [
    "STATEFUL_GRAPHS",
    "TritonRepositoryError",
    "graph_signature",
    "model_config",
    "state_pairs",
    "validate_triton_repository",
    "write_triton_target",
]

PathLike = Union[str, Path]

# The graphs whose LSTM state must live in the server between requests.
STATEFUL_GRAPHS = ("encoder", "predictor")
REPOSITORY = "model_repository"
CLIENT = "client"
# A stream idle this long (microseconds) is dropped and its state freed.
MAX_SEQUENCE_IDLE_US = 60_000_000
_STATE_WORDS = {"in", "out", "input", "output", "new", "next", "prev", "initial", "init", "state"}
_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: mc.TYPE_FP32,
    onnx.TensorProto.FLOAT16: mc.TYPE_FP16,
    onnx.TensorProto.BFLOAT16: mc.TYPE_BF16,
    onnx.TensorProto.DOUBLE: mc.TYPE_FP64,
    onnx.TensorProto.INT8: mc.TYPE_INT8,
    onnx.TensorProto.INT16: mc.TYPE_INT16,
    onnx.TensorProto.INT32: mc.TYPE_INT32,
    onnx.TensorProto.INT64: mc.TYPE_INT64,
    onnx.TensorProto.UINT8: mc.TYPE_UINT8,
    onnx.TensorProto.BOOL: mc.TYPE_BOOL,
    onnx.TensorProto.STRING: mc.TYPE_STRING,
}


class TritonRepositoryError(ExportError):
    """A bundle cannot become a Triton repository, or a repository does not match its graphs."""


@dataclass(frozen=True)
class Tensor:
    """One graph input or output: Triton data type and dims (-1 for a symbolic or unknown dimension)."""

    name: str
    data_type: int
    dims: tuple[int, ...]


def graph_signature(path: PathLike) -> tuple[list[Tensor], list[Tensor]]:
    """``(inputs, outputs)`` of an ONNX graph file, initializers excluded.

    Raises:
        TritonRepositoryError: unreadable file, or a tensor type Triton has no name for.
    """
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - protobuf and IO errors alike mean an unusable file
        raise TritonRepositoryError(f"{path} is not a readable ONNX model; export the bundle again") from None
    initializers = {init.name for init in graph.initializer}

    def describe(value: onnx.ValueInfoProto) -> Tensor:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type not in _TRITON_TYPES:
            raise TritonRepositoryError(
                f"{path}: tensor {value.name} has ONNX element type {tensor_type.elem_type}, which Triton cannot serve"
            )
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
        return Tensor(value.name, _TRITON_TYPES[tensor_type.elem_type], dims)

    inputs = [describe(v) for v in graph.input if v.name not in initializers]
    return inputs, [describe(v) for v in graph.output]


def _stem(name: str) -> tuple[str, ...]:
    return tuple(word for word in re.split(r"[^a-z0-9]+", name.lower()) if word and word not in _STATE_WORDS)


def state_pairs(inputs: list[Tensor], outputs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """(input, output) pairs that carry state from one request to the next.

    A pair has names equal up to the words in/out/input/output/new/next/
    prev/initial/init/state, and the same data type and dims.
    """
    by_stem = {}
    for output in outputs:
        by_stem.setdefault(_stem(output.name), []).append(output)
    pairs = []
    for tensor in inputs:
        matches = [
            o
            for o in by_stem.get(_stem(tensor.name), [])
            if o.name != tensor.name and (o.data_type, o.dims) == (tensor.data_type, tensor.dims)
        ]
        if _stem(tensor.name) and len(matches) == 1:
            pairs.append((tensor, matches[0]))
    return pairs


def model_config(name: str, graph_path: PathLike) -> mc.ModelConfig:
    """The Triton config of one ONNX graph (module docstring: backend, batching, implicit state)."""
    inputs, outputs = graph_signature(graph_path)
    pairs = state_pairs(inputs, outputs)
    if name in STATEFUL_GRAPHS and not pairs:
        raise TritonRepositoryError(
            f"{graph_path}: no state inputs and outputs (e.g. h -> h_out) found among inputs "
            f"{[t.name for t in inputs]} and outputs {[t.name for t in outputs]}; the {name} must carry its "
            "LSTM state; export the bundle with this version of caiman_asr_train"
        )
    state_inputs = {i.name for i, _ in pairs}
    state_outputs = {o.name for _, o in pairs}
    config = mc.ModelConfig(name=name, backend="onnxruntime", max_batch_size=0)
    for tensor in inputs:
        if tensor.name not in state_inputs:
            config.input.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    for tensor in outputs:
        if tensor.name not in state_outputs:
            config.output.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    if pairs:
        batching = config.sequence_batching
        batching.max_sequence_idle_microseconds = MAX_SEQUENCE_IDLE_US
        for state_in, state_out in pairs:
            # One stream per request: symbolic dims (the batch) start at 1, others as declared.
            initial_dims = [1 if d == -1 else d for d in state_in.dims]
            state = batching.state.add(
                input_name=state_in.name,
                output_name=state_out.name,
                data_type=state_in.data_type,
                dims=state_in.dims,
            )
            state.initial_state.add(
                name=f"{state_in.name}_zeros", data_type=state_in.data_type, dims=initial_dims, zero_data=True
            )
    return config


def write_triton_target(bundle_dir: PathLike, target_dir: PathLike) -> None:
    """Write a Triton repository and client files (layout in the module docstring) from an ONNX Runtime bundle.

    ``target_dir`` must not exist; it is built beside and renamed into place,
    and validated before the rename.

    Raises:
        TritonRepositoryError: no graphs in the bundle, a stateful graph
            without state tensors, or a config that does not match its graph.
    """
    bundle_dir, target_dir = Path(bundle_dir), Path(target_dir)
    graphs = sorted(bundle_dir.glob("*.onnx"))
    missing = [name for name in STATEFUL_GRAPHS if bundle_dir / f"{name}.onnx" not in graphs]
    if missing:
        raise TritonRepositoryError(
            f"{bundle_dir} has no {', '.join(f'{m}.onnx' for m in missing)}; give an onnxruntime bundle directory"
        )
    partial = target_dir.with_name(f".{target_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    repository = partial / REPOSITORY
    for graph in graphs:
        config = model_config(graph.stem, graph)
        (repository / graph.stem / "1").mkdir(parents=True)
        shutil.copyfile(graph, repository / graph.stem / "1" / "model.onnx")
        atomic_write_bytes(
            repository / graph.stem / "config.pbtxt", text_format.MessageToString(config).encode()
        )
    client = partial / CLIENT
    client.mkdir()
    for other in sorted(bundle_dir.iterdir()):
        if other.is_file() and other.suffix != ".onnx":
            shutil.copyfile(other, client / other.name)
    validate_triton_repository(repository)
    partial.rename(target_dir)


def validate_triton_repository(repository: PathLike) -> list[str]:
    """Check every model of a Triton repository against Triton's schema and its ONNX graph; return the model names.

    For each ``<model>/config.pbtxt``: it parses as a ``ModelConfig``; its
    name is the directory's; backend onnxruntime; ``1/model.onnx`` exists;
    every graph input is either a config input or a state input, every graph
    output a config output or a state output, with equal data types and dims;
    every state pairs a graph input with a graph output of its type and
    dims, with a zero initial state of matching fixed dims; and the encoder
    and predictor carry state.

    Raises:
        TritonRepositoryError: naming the model and the first mismatch.
    """
    repository = Path(repository)
    configs = sorted(repository.glob("*/config.pbtxt"))
    if not configs:
        raise TritonRepositoryError(f"{repository} holds no <model>/config.pbtxt; write the repository again")
    for config_path in configs:
        _validate_model(config_path)
    return [path.parent.name for path in configs]


def _validate_model(config_path: Path) -> None:
    model_dir = config_path.parent

    def fail(problem: str) -> TritonRepositoryError:
        return TritonRepositoryError(f"Triton model {model_dir}: {problem}; write the repository again")

    config = mc.ModelConfig()
    try:
        text_format.Parse(config_path.read_text(), config)
    except text_format.ParseError as exc:
        raise fail(f"config.pbtxt does not follow Triton's model-config schema ({exc})") from None
    if config.name != model_dir.name:
        raise fail(f"config name {config.name!r} differs from the directory name")
    if config.backend != "onnxruntime" and config.platform != "onnxruntime_onnx":
        raise fail(f"backend {config.backend or config.platform!r} is not onnxruntime")
    graph_path = model_dir / "1" / "model.onnx"
    if not graph_path.is_file():
        raise fail("1/model.onnx is missing")
    inputs, outputs = graph_signature(graph_path)
    graph_inputs = {t.name: t for t in inputs}
    graph_outputs = {t.name: t for t in outputs}
    states = list(config.sequence_batching.state)
    if model_dir.name in STATEFUL_GRAPHS and not states:
        raise fail("the model keeps no implicit state (sequence_batching.state is empty)")

    def check(kind: str, name: str, data_type: int, dims, graph_side: dict) -> None:
        tensor = graph_side.get(name)
        if tensor is None:
            raise fail(f"{kind} {name!r} is not a tensor of model.onnx ({sorted(graph_side)})")
        if data_type != tensor.data_type or tuple(dims) != tensor.dims:
            raise fail(
                f"{kind} {name!r} is {mc.DataType.Name(data_type)} {list(dims)} in config.pbtxt but "
                f"{mc.DataType.Name(tensor.data_type)} {list(tensor.dims)} in model.onnx"
            )

    for tensor in config.input:
        check("input", tensor.name, tensor.data_type, tensor.dims, graph_inputs)
    for tensor in config.output:
        check("output", tensor.name, tensor.data_type, tensor.dims, graph_outputs)
    for state in states:
        check("state input", state.input_name, state.data_type, state.dims, graph_inputs)
        check("state output", state.output_name, state.data_type, state.dims, graph_outputs)
        for initial in state.initial_state:
            if (
                not initial.zero_data
                or initial.data_type != state.data_type
                or len(initial.dims) != len(state.dims)
            ):
                raise fail(
                    f"state {state.input_name!r}: initial_state must be zeros of the state's type and rank"
                )
            if any(d < 1 or (s != -1 and d != s) for d, s in zip(initial.dims, state.dims)):
                raise fail(
                    f"state {state.input_name!r}: initial_state dims {list(initial.dims)} do not fit {list(state.dims)}"
                )
    served_inputs = {t.name for t in config.input} | {s.input_name for s in states}
    unserved = sorted(set(graph_inputs) - served_inputs)
    if unserved:
        raise fail(f"model.onnx inputs {unserved} are neither config inputs nor states")
