"""The torch-free recogniser gives PyTorch's greedy transcripts, streams, scores manifests and rejects bad bundles."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from caiman_asr_train.core.decoder import greedy_decode
from caiman_asr_train.core.errors import CheckpointError
from caiman_asr_train.core.load_hw import load_hw_checkpoint
from caiman_asr_train.data.features import FeaturePipeline, pad_audio
from caiman_asr_train.data.tokenizer import Tokenizer
from caiman_asr_train.runtime import Recognizer, evaluate_bundle
from caiman_asr_train.runtime.bundle import is_bundle


def pytorch_greedy(hw_path, audio: list) -> list[str]:
    """val.py's decoding of one padded batch: final padding 0.24 s, dataset normalisation, no dither."""
    loaded = load_hw_checkpoint(hw_path)
    data = loaded.data_config
    features = {**data["filterbank_features"], "dither": 0.0}
    pipeline = FeaturePipeline(features, data["frame_splicing"], data["melmeans"], data["melvars"]).eval()
    batch = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(a) for a in audio], batch_first=True)
    waveform, lens = pad_audio(batch, torch.tensor([len(a) for a in audio]), 0.24, features["sample_rate"])
    x, x_lens = pipeline(waveform, lens)
    tokenizer = Tokenizer(loaded.sentpiece_model_binary)
    return [tokenizer.detokenize(ids) for ids in greedy_decode(loaded.model, x, x_lens)]


def test_recognizer_gives_the_pytorch_greedy_transcripts(bundle, speech):
    recognizer = Recognizer(bundle.dir, num_threads=1)
    got = [recognizer.transcribe(a) for a in speech.audio]
    assert got == pytorch_greedy(bundle.hw_path, speech.audio)
    assert all(len(text) > 10 for text in got)  # the seeded model emits plenty


def test_concurrent_streams_give_the_same_transcripts_as_one_at_a_time(bundle, speech):
    recognizer = Recognizer(bundle.dir, num_threads=1)
    one_at_a_time = [recognizer.transcribe(a) for a in speech.audio]
    assert recognizer.transcribe_many(speech.audio, streams=3) == one_at_a_time
    assert recognizer.transcribe_many(speech.audio[::-1], streams=2) == one_at_a_time[::-1]
    # batches of two: each utterance's frames beyond the pair's common length are finished on their own
    assert recognizer.transcribe_many(speech.audio, streams=1, batch_size=2) == one_at_a_time
    assert recognizer.transcribe_many([]) == []


def test_streaming_in_small_pieces_equals_the_whole_utterance(bundle, speech):
    recognizer = Recognizer(bundle.dir, num_threads=1)
    audio = speech.audio[1]
    stream = recognizer.stream()
    partials = []
    for start in range(0, len(audio), 1234):
        stream.accept_waveform(audio[start : start + 1234])
        partials.append(list(stream.tokens))
    final = stream.finish()
    assert final == recognizer.transcribe(audio)
    unpadded = Recognizer(bundle.dir, num_threads=1, final_padding_secs=0.0)
    assert unpadded.final_padding == 0 and recognizer.final_padding == 3840
    # partial results only grow
    assert all(later[: len(earlier)] == earlier for earlier, later in zip(partials, partials[1:]))
    assert 0 < len(partials[len(partials) // 2]) < len(stream.tokens)


def test_evaluate_bundle_scores_manifests_like_val_py(bundle, speech):
    assert is_bundle(bundle.dir) and not is_bundle(speech.dir)
    result = evaluate_bundle(bundle.dir, [speech.manifest], speech.dir, num_threads=1)
    assert [p["fname"] for p in result.predictions] == [
        f"audio/dev_{i}.flac" for i in range(len(speech.texts))
    ]
    assert [p["ref"] for p in result.predictions] == speech.texts
    assert result.words == sum(len(t.split()) for t in speech.texts)
    assert result.wer == result.errors / result.words > 0


def test_runtime_never_imports_torch(bundle, speech, tmp_path):
    np.save(tmp_path / "audio.npy", speech.audio[0])
    code = (
        "import sys, numpy as np\n"
        "from caiman_asr_train.runtime import Recognizer\n"
        f"text = Recognizer({str(bundle.dir)!r}).transcribe(np.load({str(tmp_path / 'audio.npy')!r}))\n"
        "assert text, 'empty transcript'\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bundle_json_records_the_source_and_the_front_end(bundle, tiny_hw):
    info = json.loads((bundle.dir / "bundle.json").read_text())
    assert info["source"]["sha256"] == bundle.summary["source_sha256"]
    assert info["source"]["step"] == 42
    assert info["chunk_frames"] == 6
    assert info["features"]["win_length"] == 400 and info["features"]["initial_padding"] == 240
    assert info["model"]["blank_id"] == tiny_hw.model.config.blank_idx


def test_a_corrupt_or_foreign_bundle_gives_one_line_errors(bundle, tmp_path):
    with pytest.raises(CheckpointError, match="no bundle.json"):
        Recognizer(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(bundle.dir, broken)
    data = bytearray((broken / "encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="encoder.onnx changed since export") as error:
        Recognizer(broken)
    assert "\n" not in str(error.value)
    (broken / "encoder.onnx").write_bytes(b"not a graph")
    with pytest.raises(CheckpointError, match="cannot be loaded by ONNX Runtime") as error:
        Recognizer(broken, verify_files=False)
    assert "\n" not in str(error.value)
    (broken / "bundle.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Recognizer(broken)
    sherpa_like = tmp_path / "sherpa"
    sherpa_like.mkdir()
    (sherpa_like / "tokens.txt").write_text("a 0\n")
    with pytest.raises(CheckpointError, match="sherpa-onnx bundle"):
        Recognizer(sherpa_like)
