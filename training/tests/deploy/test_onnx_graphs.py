"""The hand-built graphs pass onnx.checker and compute what the PyTorch model computes."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from caiman_asr_train.data.features import FeaturePipeline, FilterbankFeatures, normalize
from caiman_asr_train.deploy.onnx_graphs import encoder_graph, features_graph, joint_graph, predictor_graph

TOLERANCE = 1e-4


def session(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def pipeline(hw: dict) -> FeaturePipeline:
    val = hw["rnnt_config"]["input_val"]
    return FeaturePipeline(
        {**val["filterbank_features"], "dither": 0.0}, val["frame_splicing"], hw["melmeans"], hw["melvars"]
    ).eval()


def bundle_states(hw: dict, batch: int = 1) -> dict:
    cfg = hw["rnnt_config"]["rnnt"]

    def zeros(layers: int) -> np.ndarray:
        return np.zeros((layers, batch, cfg["enc_n_hid"]), np.float32)

    return {
        "pre_h": zeros(cfg["enc_pre_rnn_layers"]),
        "pre_c": zeros(cfg["enc_pre_rnn_layers"]),
        "post_h": zeros(cfg["enc_post_rnn_layers"]),
        "post_c": zeros(cfg["enc_post_rnn_layers"]),
    }


def test_features_graph_matches_the_pytorch_front_end_on_speech(tiny_hw, speech):
    hw = tiny_hw.hw
    graph = session(
        features_graph(hw["rnnt_config"]["input_val"]["filterbank_features"], hw["melmeans"], hw["melvars"])
    )
    front_end = FilterbankFeatures(**tiny_hw.features)
    for audio in speech.audio:
        logmel, lens = front_end(torch.from_numpy(audio)[None].double(), torch.tensor([len(audio)]))
        expected = normalize(logmel, lens, hw["melmeans"].double(), hw["melvars"].double(), 1.0)[0].numpy()
        history = np.zeros(front_end.initial_padding + 1, np.float32)
        (got,) = graph.run(None, {"history": history, "waveform": audio})
        assert got.shape == (1, tiny_hw.features["n_filt"], expected.shape[1])
        np.testing.assert_allclose(got[0], expected, atol=1e-3, rtol=0)


def test_features_graph_gives_no_frames_for_a_stream_shorter_than_a_window(tiny_hw):
    hw = tiny_hw.hw
    graph = session(
        features_graph(hw["rnnt_config"]["input_val"]["filterbank_features"], hw["melmeans"], hw["melvars"])
    )
    (got,) = graph.run(None, {"history": np.zeros(1, np.float32), "waveform": np.zeros(100, np.float32)})
    assert got.shape == (1, tiny_hw.features["n_filt"], 0)


def test_encoder_graph_matches_pytorch_and_chunks_equal_the_whole_utterance(tiny_hw, speech):
    hw, model = tiny_hw.hw, tiny_hw.model
    cfg = hw["rnnt_config"]
    graph = session(encoder_graph(tiny_hw.weights, cfg["rnnt"], cfg["input_val"]["frame_splicing"]))
    features = pipeline(hw)
    audio = torch.from_numpy(speech.audio[0])[None]
    logmel, lens = features.filterbank(audio, torch.tensor([audio.shape[1]]))
    logmel = normalize(logmel, lens, features.melmeans, features.melvars, 1.0)
    x, x_lens = features(audio, torch.tensor([audio.shape[1]]))
    with torch.no_grad():
        expected, _, _ = model.encode(x, x_lens)

    whole = graph.run(None, {"features": logmel.numpy(), **bundle_states(hw)})
    np.testing.assert_allclose(whole[0], expected.numpy(), atol=TOLERANCE, rtol=0)

    chunk = 6 * 5  # a multiple of frame_subsampling * enc_stack_time_factor
    states = bundle_states(hw)
    outputs = []
    for start in range(0, logmel.shape[2], chunk):
        out = graph.run(None, {"features": logmel[:, :, start : start + chunk].numpy(), **states})
        outputs.append(out[0])
        states = dict(zip(("pre_h", "pre_c", "post_h", "post_c"), out[1:]))
    np.testing.assert_allclose(np.concatenate(outputs, axis=1), whole[0], atol=1e-5, rtol=0)


def test_predictor_graph_matches_pytorch_and_blank_gives_the_zero_start_input(tiny_hw):
    hw, model = tiny_hw.hw, tiny_hw.model
    graph = session(predictor_graph(tiny_hw.weights, hw["rnnt_config"]["rnnt"]))
    blank = model.config.blank_idx
    layers, hidden = model.config.pred_rnn_layers, model.config.pred_n_hid
    h = np.random.default_rng(0).normal(size=(layers, 2, hidden)).astype(np.float32)
    c = np.random.default_rng(1).normal(size=(layers, 2, hidden)).astype(np.float32)
    tokens = np.array([3, blank], np.int64)
    out, h_out, c_out = graph.run(None, {"token": tokens, "h": h, "c": c})
    with torch.no_grad():
        g, (h_ref, c_ref) = model.predict(
            torch.tensor([[3], [-1]]), (torch.from_numpy(h), torch.from_numpy(c)), add_sos=False
        )
    np.testing.assert_allclose(out, g.numpy(), atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(h_out, h_ref.numpy(), atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(c_out, c_ref.numpy(), atol=TOLERANCE, rtol=0)


def test_joint_graph_matches_pytorch_for_every_frame(tiny_hw):
    _hw, model = tiny_hw.hw, tiny_hw.model
    graph = session(joint_graph(tiny_hw.weights))
    rng = np.random.default_rng(0)
    f = rng.normal(size=(2, 7, model.config.enc_n_hid)).astype(np.float32)
    g = rng.normal(size=(2, 1, model.config.pred_n_hid)).astype(np.float32)
    (logits,) = graph.run(None, {"encoder_out": f, "predictor_out": g})
    with torch.no_grad():
        expected = model.joint(torch.from_numpy(f), torch.from_numpy(g))[:, :, 0]
    np.testing.assert_allclose(logits, expected.numpy(), atol=TOLERANCE, rtol=0)


def test_sherpa_encoder_normalises_splices_and_ignores_batch_padding(tiny_hw, speech):
    hw, model = tiny_hw.hw, tiny_hw.model
    cfg = hw["rnnt_config"]
    graph = session(
        encoder_graph(
            tiny_hw.weights,
            cfg["rnnt"],
            cfg["input_val"]["frame_splicing"],
            layout="sherpa",
            melmeans=hw["melmeans"].numpy(),
            melvars=hw["melvars"].numpy(),
        )
    )
    features = pipeline(hw)
    audio = [torch.from_numpy(a) for a in speech.audio[:2]]
    lens = torch.tensor([len(a) for a in audio])
    batch = torch.nn.utils.rnn.pad_sequence(audio, batch_first=True)
    logmel, frames = features.filterbank(batch, lens)
    x, x_lens = features(batch, lens)
    with torch.no_grad():
        expected, expected_lens, _ = model.encode(x, x_lens)
    # sherpa-onnx pads raw log-mels with a constant: the graph must not see it
    padded = logmel.numpy().copy()
    padded[0, :, int(frames[0]) :] = -5.0
    padded[1, :, int(frames[1]) :] = -5.0
    out, out_lens = graph.run(None, {"audio_signal": padded, "length": frames.numpy()})
    np.testing.assert_array_equal(out_lens, expected_lens.numpy())
    for b in range(2):
        n = int(out_lens[b])
        np.testing.assert_allclose(out[b, :, :n].T, expected[b, :n].numpy(), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("token", [5, -1])
def test_sherpa_decoder_and_joiner_match_pytorch(tiny_hw, token):
    hw, model = tiny_hw.hw, tiny_hw.model
    decoder = session(predictor_graph(tiny_hw.weights, hw["rnnt_config"]["rnnt"], layout="sherpa"))
    joiner = session(joint_graph(tiny_hw.weights, layout="sherpa"))
    layers, hidden = model.config.pred_rnn_layers, model.config.pred_n_hid
    zeros = np.zeros((layers, 1, hidden), np.float32)
    sherpa_token = model.config.blank_idx if token < 0 else token
    dec_out, _, _h_out, _c_out = decoder.run(
        None,
        {
            "targets": np.array([[sherpa_token]], np.int32),
            "target_length": np.array([1], np.int32),
            "states.1": zeros,
            "states.2": zeros,
        },
    )
    f = np.random.default_rng(0).normal(size=(1, model.config.enc_n_hid, 1)).astype(np.float32)
    (logits,) = joiner.run(None, {"encoder_output": f, "decoder_output": dec_out})
    with torch.no_grad():
        g, _ = model.predict(torch.tensor([[token]]), add_sos=False)
        expected = model.joint(torch.from_numpy(f).transpose(1, 2), g)
    np.testing.assert_allclose(dec_out[:, :, 0], g[:, 0].numpy(), atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(logits, expected.numpy(), atol=TOLERANCE, rtol=0)
