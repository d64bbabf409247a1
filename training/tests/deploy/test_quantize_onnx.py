"""Quantized ONNX bundles: every type loads and decodes in ONNX Runtime and sherpa-onnx, weights are stored
quantized, the float graphs survive the opset conversion exactly, and the WER gate refuses a damaging export."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import soundfile
from onnx import TensorProto

from caiman_asr_train.core.errors import ExportError, UserError
from caiman_asr_train.data.manifest import manifest_entry, read_manifest, write_manifest
from caiman_asr_train.deploy.onnxruntime_bundle import write_graphs
from caiman_asr_train.deploy.quantize import MODEL_GRAPHS, QUANTIZE_TYPES, quantize_onnx_bundle
from caiman_asr_train.deploy.quantize_onnx import DEQUANTIZE_OPSET, at_least_opset, weight_inputs
from caiman_asr_train.export.hardware_ckpt import save_hardware_ckpt
from caiman_asr_train.export.inference import export_inference, pytorch_transcriber, sherpa_transcriber
from caiman_asr_train.runtime.recognizer import Recognizer

BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def hw_path(tmp_path_factory, tiny_hw):
    path = tmp_path_factory.mktemp("hw") / "tiny.hw.pt"
    save_hardware_ckpt(tiny_hw.hw, path)
    return path


@pytest.fixture(scope="module")
def float_graphs(tmp_path_factory, tiny_hw):
    directory = tmp_path_factory.mktemp("float")
    write_graphs(tiny_hw.hw, directory)
    return directory


def session(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def feeds(tiny_hw) -> dict:
    """Random inputs for encoder.onnx, predictor.onnx and joint.onnx of the bundle layout."""
    cfg = tiny_hw.hw["rnnt_config"]["rnnt"]
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    hidden, pred = cfg["enc_n_hid"], cfg["pred_n_hid"]
    return {
        "encoder.onnx": {
            "features": normal(1, tiny_hw.features["n_filt"], 30),
            "pre_h": normal(cfg["enc_pre_rnn_layers"], 1, hidden),
            "pre_c": normal(cfg["enc_pre_rnn_layers"], 1, hidden),
            "post_h": normal(cfg["enc_post_rnn_layers"], 1, hidden),
            "post_c": normal(cfg["enc_post_rnn_layers"], 1, hidden),
        },
        "predictor.onnx": {
            "token": np.array([3, 7]),
            "h": normal(cfg["pred_rnn_layers"], 2, pred),
            "c": normal(cfg["pred_rnn_layers"], 2, pred),
        },
        "joint.onnx": {"encoder_out": normal(1, 5, hidden), "predictor_out": normal(1, 1, pred)},
    }


def test_the_opset_conversion_keeps_the_float_graphs_exact(tiny_hw, float_graphs):
    for name, inputs in feeds(tiny_hw).items():
        graph = onnx.load(float_graphs / name)
        converted = at_least_opset(graph, DEQUANTIZE_OPSET)
        assert converted.opset_import[0].version == DEQUANTIZE_OPSET
        for got, expected in zip(session(converted).run(None, inputs), session(graph).run(None, inputs)):
            np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("quantize_type", QUANTIZE_TYPES)
def test_every_type_stores_quantized_weights_and_stays_close_to_the_float_graphs(
    tiny_hw, float_graphs, tmp_path, quantize_type
):
    for name in MODEL_GRAPHS["onnxruntime"]:
        (tmp_path / name).write_bytes((float_graphs / name).read_bytes())
    quantize_onnx_bundle(tmp_path, "onnxruntime", quantize_type, BLOCK_SIZE)
    deviation = {}
    for name, inputs in feeds(tiny_hw).items():
        graph = onnx.load(tmp_path / name)
        assert weight_inputs(graph) == {}, f"{name} keeps float32 weights"
        float_weights = set(weight_inputs(onnx.load(float_graphs / name)))
        still_float = {init.name for init in graph.graph.initializer if init.data_type == TensorProto.FLOAT}
        assert float_weights and not float_weights & still_float, name
        # int8_per_channel MatMul weights are ONNX Runtime's uint8 with zero point 128
        expected = (
            {TensorProto.INT4} if quantize_type.startswith("int4") else {TensorProto.INT8, TensorProto.UINT8}
        )
        assert expected & {init.data_type for init in graph.graph.initializer}, name
        quantized = session(tmp_path / name).run(None, inputs)[0]
        reference = session(float_graphs / name).run(None, inputs)[0]
        deviation[name] = np.abs(quantized - reference).max() / np.abs(reference).max()
    limit = 0.03 if quantize_type.startswith("int8") else 0.3
    assert max(deviation.values()) < limit, deviation


def test_int8_per_channel_runs_matmuls_and_lstms_on_onnx_runtime_integer_kernels(float_graphs, tmp_path):
    for name in MODEL_GRAPHS["onnxruntime"]:
        (tmp_path / name).write_bytes((float_graphs / name).read_bytes())
    quantize_onnx_bundle(tmp_path, "onnxruntime", "int8_per_channel")
    joint = {node.op_type for node in onnx.load(tmp_path / "joint.onnx").graph.node}
    assert "MatMulInteger" in joint and "MatMul" not in joint
    for name in ("encoder.onnx", "predictor.onnx"):
        ops = {node.op_type for node in onnx.load(tmp_path / name).graph.node}
        assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops, name


@pytest.mark.parametrize("quantize_type", QUANTIZE_TYPES)
def test_every_type_exports_a_bundle_that_onnx_runtime_loads_and_decodes(
    hw_path, speech, tmp_path, quantize_type
):
    summary = export_inference(
        hw_path, "onnxruntime", tmp_path / "bundle", quantize_type=quantize_type, block_size=BLOCK_SIZE
    )
    assert summary["quantize_type"] == quantize_type
    assert json.loads((tmp_path / "bundle/bundle.json").read_text())["quantize_type"] == quantize_type
    recognizer = Recognizer(tmp_path / "bundle", num_threads=1)  # checks every file's sha256
    texts = [recognizer.transcribe(audio) for audio in speech.audio]
    assert all(texts)


@pytest.mark.parametrize("quantize_type", ["int8_per_channel", "int4_blockwise"])
def test_a_quantized_sherpa_onnx_bundle_loads_and_transcribes_in_sherpa_onnx(
    hw_path, speech, tiny_hw, tmp_path, quantize_type
):
    export_inference(hw_path, "sherpa-onnx", tmp_path / "sherpa", quantize_type=quantize_type)
    for name in MODEL_GRAPHS["sherpa-onnx"]:
        assert weight_inputs(onnx.load(tmp_path / "sherpa" / name)) == {}
    transcribe = sherpa_transcriber(tmp_path / "sherpa", 16000, tiny_hw.features["n_filt"])
    assert all(transcribe(audio) for audio in speech.audio)


def test_a_bundle_without_its_graphs_or_of_another_target_is_refused(tmp_path):
    with pytest.raises(UserError, match="encoder.onnx not found: a onnxruntime bundle needs"):
        quantize_onnx_bundle(tmp_path, "onnxruntime", "int8_per_channel")
    with pytest.raises(UserError, match="not 'myrtle-fpga'"):
        quantize_onnx_bundle(tmp_path, "myrtle-fpga", "int8_per_channel")


@pytest.fixture
def self_transcribed(hw_path, speech, tmp_path):
    """A manifest whose references are the float model's own transcripts (float WER is 0): the speech
    and, as one long utterance, all of it twice over. The seeded model is untrained and emits nearly
    the same piece on every frame, so damaging quantization shows only over many frames."""
    transcribe = pytorch_transcriber(hw_path)
    entries = read_manifest(speech.manifest)
    long_path = speech.dir / "audio/everything.flac"
    soundfile.write(long_path, np.concatenate(speech.audio * 2), 16000, subtype="PCM_16")
    long_audio = soundfile.read(long_path, dtype="float32")[0]  # what a reader of the FLAC gets back
    entries.append(manifest_entry("", "audio/everything.flac", len(long_audio)))
    for entry, audio in zip(entries, [*speech.audio, long_audio]):
        entry["transcript"] = transcribe(audio)
    write_manifest(entries, speech.dir / "self_transcribed.json")
    return speech.dir / "self_transcribed.json"


@pytest.mark.parametrize("target", ["onnxruntime", "pytorch"])
def test_the_gate_refuses_an_export_whose_wer_rises_beyond_the_limit_and_writes_nothing(
    hw_path, speech, self_transcribed, tmp_path, target
):
    output = tmp_path / "out" / "export"
    damaging = dict(quantize_type="int4_blockwise", block_size=1 << 20)  # one int4 scale per row
    with pytest.raises(
        ExportError, match=r"int4_blockwise export refused: WER [1-9][0-9.]*% vs 0\.00% for float32"
    ):
        export_inference(
            hw_path, target, output, verify_manifests=[self_transcribed], dataset_dir=speech.dir, **damaging
        )
    assert list((tmp_path / "out").iterdir()) == []
    summary = export_inference(
        hw_path,
        target,
        output,
        verify_manifests=[self_transcribed],
        dataset_dir=speech.dir,
        max_wer_increase=100.0,
        **damaging,
    )
    assert summary["wer"]["pytorch"] == 0 and summary["wer"]["export"] > 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["export"]
