"""Triton repositories from ONNX Runtime bundles: schema-valid configs that match their graphs."""

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from caiman_asr_train.deploy.triton import (
    TritonRepositoryError,
    graph_signature,
    validate_triton_repository,
    write_triton_target,
)
from caiman_asr_train.export.inference import export_inference

HIDDEN, FEATS = 3, 4


def lstm_graph(path: Path, input_name: str, state_names: tuple[str, str], out_suffix: str) -> None:
    """A real one-layer ONNX LSTM whose h/c state goes in as ``state_names`` and out with ``out_suffix``."""
    h, c = state_names
    rng = np.random.default_rng(0)
    weights = [
        helper.make_tensor(
            name, TensorProto.FLOAT, shape, rng.standard_normal(shape).astype(np.float32).ravel()
        )
        for name, shape in (
            ("W", [1, 4 * HIDDEN, FEATS]),
            ("R", [1, 4 * HIDDEN, HIDDEN]),
            ("B", [1, 8 * HIDDEN]),
        )
    ]
    nodes = [
        helper.make_node(
            "LSTM",
            [input_name, "W", "R", "B", "", h, c],
            ["Y", h + out_suffix, c + out_suffix],
            hidden_size=HIDDEN,
        ),
        helper.make_node("Squeeze", ["Y", "axis"], ["out"]),
    ]
    weights.append(helper.make_tensor("axis", TensorProto.INT64, [1], [1]))
    state_shape = [1, "N", HIDDEN]
    graph = helper.make_graph(
        nodes,
        path.stem,
        [
            helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["T", "N", FEATS]),
            helper.make_tensor_value_info(h, TensorProto.FLOAT, state_shape),
            helper.make_tensor_value_info(c, TensorProto.FLOAT, state_shape),
        ],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, ["T", "N", HIDDEN]),
            helper.make_tensor_value_info(h + out_suffix, TensorProto.FLOAT, state_shape),
            helper.make_tensor_value_info(c + out_suffix, TensorProto.FLOAT, state_shape),
        ],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def joint_graph(path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["encoder_out", "predictor_out"], ["logits"])],
        "joint",
        [
            helper.make_tensor_value_info("encoder_out", TensorProto.FLOAT, ["N", "T", HIDDEN]),
            helper.make_tensor_value_info("predictor_out", TensorProto.FLOAT, ["N", 1, HIDDEN]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "T", HIDDEN])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A small onnxruntime-style bundle: stateful encoder and predictor, stateless joint, client files."""
    directory = tmp_path / "bundle"
    directory.mkdir()
    lstm_graph(directory / "encoder.onnx", "features", ("pre_h", "pre_c"), "_out")
    lstm_graph(directory / "predictor.onnx", "embedded", ("h", "c"), "_next")
    joint_graph(directory / "joint.onnx")
    (directory / "tokenizer.model").write_bytes(b"spm")
    (directory / "bundle.json").write_text("{}")
    return directory


def read_config(path: Path) -> mc.ModelConfig:
    config = mc.ModelConfig()
    text_format.Parse(path.read_text(), config)
    return config


def test_each_graph_becomes_a_model_whose_config_parses_and_matches_it(bundle, tmp_path):
    write_triton_target(bundle, tmp_path / "triton")

    repository = tmp_path / "triton/model_repository"
    assert validate_triton_repository(repository) == ["encoder", "joint", "predictor"]
    assert sorted(p.name for p in (tmp_path / "triton/client").iterdir()) == [
        "bundle.json",
        "tokenizer.model",
    ]
    for name in ("encoder", "joint", "predictor"):
        assert (repository / name / "1/model.onnx").read_bytes() == (bundle / f"{name}.onnx").read_bytes()
    encoder = read_config(repository / "encoder/config.pbtxt")
    assert (encoder.backend, encoder.max_batch_size) == ("onnxruntime", 0)
    assert [t.name for t in encoder.input] == ["features"]
    assert [t.name for t in encoder.output] == ["out"]
    assert list(encoder.input[0].dims) == [-1, -1, FEATS]
    states = {(s.input_name, s.output_name): s for s in encoder.sequence_batching.state}
    assert set(states) == {("pre_h", "pre_h_out"), ("pre_c", "pre_c_out")}
    assert list(states["pre_h", "pre_h_out"].dims) == [1, -1, HIDDEN]
    assert states["pre_h", "pre_h_out"].data_type == mc.TYPE_FP32
    predictor = read_config(repository / "predictor/config.pbtxt")
    assert {(s.input_name, s.output_name) for s in predictor.sequence_batching.state} == {
        ("h", "h_next"),
        ("c", "c_next"),
    }
    joint = read_config(repository / "joint/config.pbtxt")
    assert not joint.HasField("sequence_batching")
    assert [t.name for t in joint.input] == ["encoder_out", "predictor_out"]


def test_the_initial_state_feeds_the_graph_and_its_output_state_feeds_the_next_request(bundle, tmp_path):
    write_triton_target(bundle, tmp_path / "triton")
    model_dir = tmp_path / "triton/model_repository/encoder"
    config = read_config(model_dir / "config.pbtxt")
    session = ort.InferenceSession(str(model_dir / "1/model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {
        s.input_name: np.zeros(s.initial_state[0].dims, np.float32) for s in config.sequence_batching.state
    }
    chunk = np.ones((2, 1, FEATS), np.float32)
    first = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, {"features": chunk, **feeds}))
    )
    carried = {s.input_name: first[s.output_name] for s in config.sequence_batching.state}
    whole = session.run(["out"], {"features": np.concatenate([chunk, chunk]), **feeds})[0]
    second = session.run(["out"], {"features": chunk, **carried})[0]
    np.testing.assert_allclose(second, whole[2:], rtol=1e-5, atol=1e-6)


def test_a_config_that_disagrees_with_its_graph_is_refused_naming_the_tensor(bundle, tmp_path):
    write_triton_target(bundle, tmp_path / "triton")
    config_path = tmp_path / "triton/model_repository/joint/config.pbtxt"
    config_path.write_text(config_path.read_text().replace("TYPE_FP32", "TYPE_FP16", 1))
    with pytest.raises(TritonRepositoryError, match="input 'encoder_out' is TYPE_FP16"):
        validate_triton_repository(tmp_path / "triton/model_repository")
    config_path.write_text(config_path.read_text().replace("backend:", "backends:"))
    with pytest.raises(TritonRepositoryError, match="model-config schema"):
        validate_triton_repository(tmp_path / "triton/model_repository")


def test_a_predictor_without_state_tensors_is_refused_and_nothing_is_written(bundle, tmp_path):
    shutil.copyfile(bundle / "joint.onnx", bundle / "predictor.onnx")
    with pytest.raises(TritonRepositoryError, match="predictor must carry its LSTM state"):
        write_triton_target(bundle, tmp_path / "triton")
    assert not (tmp_path / "triton").exists()


def test_graph_signature_reads_symbolic_dimensions_as_minus_one(bundle):
    inputs, outputs = graph_signature(bundle / "encoder.onnx")
    assert [(t.name, t.dims) for t in inputs] == [
        ("features", (-1, -1, FEATS)),
        ("pre_h", (1, -1, HIDDEN)),
        ("pre_c", (1, -1, HIDDEN)),
    ]
    assert [t.name for t in outputs] == ["out", "pre_h_out", "pre_c_out"]


def test_the_real_onnxruntime_bundle_becomes_a_valid_repository_whose_states_stream(tiny_hw, tmp_path):
    export_inference(tiny_hw.hw_path, "onnxruntime", tmp_path / "bundle")
    write_triton_target(tmp_path / "bundle", tmp_path / "triton")

    repository = tmp_path / "triton/model_repository"
    assert validate_triton_repository(repository) == ["encoder", "features", "joint", "predictor"]
    assert (tmp_path / "triton/client/tokenizer.model").is_file()
    config = read_config(repository / "encoder/config.pbtxt")
    assert {s.input_name for s in config.sequence_batching.state} == {"pre_h", "pre_c", "post_h", "post_c"}
    assert not read_config(repository / "features/config.pbtxt").HasField("sequence_batching")
    # Two 6-frame chunks with the state carried as Triton carries it equal one 12-frame call.
    session = ort.InferenceSession(
        str(repository / "encoder/1/model.onnx"), providers=["CPUExecutionProvider"]
    )
    zeros = {
        s.input_name: np.zeros(s.initial_state[0].dims, np.float32) for s in config.sequence_batching.state
    }
    n_filt = tiny_hw.features["n_filt"]
    features = np.random.default_rng(0).standard_normal((1, n_filt, 12)).astype(np.float32)
    names = [o.name for o in session.get_outputs()]
    first = dict(zip(names, session.run(None, {"features": features[:, :, :6], **zeros})))
    carried = {s.input_name: first[s.output_name] for s in config.sequence_batching.state}
    second = session.run(["encoder_out"], {"features": features[:, :, 6:], **carried})[0]
    whole = session.run(["encoder_out"], {"features": features, **zeros})[0]
    np.testing.assert_allclose(
        np.concatenate([first["encoder_out"], second], axis=1), whole, rtol=1e-4, atol=1e-5
    )
