"""evaluate(): final padding, greedy decoding, detokenising and scoring, with real components.

The models here have joint biases that force their output (always blank, or
always one token), so the expected hypotheses follow from the frame counts of
docs/formats.md section 6 and the per-frame symbol cap.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from torch.utils.data import DataLoader

from caiman_asr_train.core.model import RNNT, ConfigRNNT
from caiman_asr_train.data.dataset import AudioDataset, collate
from caiman_asr_train.data.features import FeaturePipeline
from caiman_asr_train.data.generate_mel_stats import compute_mel_stats
from caiman_asr_train.data.manifest import manifest_entry
from caiman_asr_train.data.spm.spm_from_json import train_sentencepiece
from caiman_asr_train.data.tokenizer import Tokenizer
from caiman_asr_train.evaluate.evaluator import EvalResult, evaluate
from caiman_asr_train.evaluate.wer import word_error_rate

RATE = 16000
FEATURES = {
    "sample_rate": RATE,
    "window_size": 0.02,
    "window_stride": 0.01,
    "window": "hann",
    "n_fft": 512,
    "n_filt": 20,
    "dither": 1e-5,
}
SPLICING = {"frame_stacking": 3, "frame_subsampling": 3}
STACK_TIME = 2
TRANSCRIPTS = ["the cat sat", "a dog ran home", "red house", "the dog"]
LENGTHS = [6000, 9100, 3300, 4800]  # samples


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(1)
    entries = []
    for i, (transcript, length) in enumerate(zip(TRANSCRIPTS, LENGTHS)):
        t = np.arange(length) / RATE
        wave = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.standard_normal(length)
        soundfile.write(root / f"{i}.flac", wave.astype(np.float32), RATE, subtype="PCM_16")
        entries.append(manifest_entry(transcript, f"{i}.flac", length, RATE))
    return root, entries


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    text = TRANSCRIPTS * 5 + ["the red cat ran", "a house"]
    return Tokenizer(train_sentencepiece(text, tmp_path_factory.mktemp("spm") / "tiny", 30))


@pytest.fixture(scope="module")
def pipeline(corpus) -> FeaturePipeline:
    root, entries = corpus
    means, variances, _ = compute_mel_stats(entries, root, FEATURES, progress=False)
    return FeaturePipeline(FEATURES, SPLICING, means.float(), variances.float())


def tiny_model(tokenizer: Tokenizer, seed: int = 0) -> RNNT:
    torch.manual_seed(seed)
    return RNNT(
        ConfigRNNT(
            n_classes=tokenizer.num_labels + 1,
            in_feats=FEATURES["n_filt"] * SPLICING["frame_stacking"],
            enc_n_hid=16,
            enc_pre_rnn_layers=1,
            enc_post_rnn_layers=1,
            enc_stack_time_factor=STACK_TIME,
            pred_n_hid=8,
            pred_rnn_layers=1,
            joint_n_hid=16,
        )
    )


def forced(model: RNNT, label: int) -> RNNT:
    """Make the joint output ``label`` whatever the input."""
    with torch.no_grad():
        model.joint_net[2].weight.zero_()
        model.joint_net[2].bias.fill_(-10.0)
        model.joint_net[2].bias[label] = 10.0
    return model


def batches(corpus, batch_size: int) -> DataLoader:
    root, entries = corpus
    return DataLoader(AudioDataset(entries, root, RATE), batch_size=batch_size, collate_fn=collate)


def encoder_frames(samples: int, final_padding_secs: float) -> int:
    """Encoder frames of an utterance per docs/formats.md section 6 (10 ms hop, splicing 3, stack time 2)."""
    padded = samples + round(final_padding_secs * RATE) + int(RATE * (0.02 - 0.01))
    frames = 1 + (padded - 320) // 160
    return math.ceil(math.ceil(frames / 3) / STACK_TIME)


def run(model, corpus, tokenizer, pipeline, batch_size=2, **kwargs) -> EvalResult:
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return evaluate(
        model, batches(corpus, batch_size), pipeline, tokenizer, sample_rate=RATE, progress=False, **kwargs
    )


def test_a_model_that_only_emits_blank_scores_100_percent(corpus, tokenizer, pipeline):
    model = forced(tiny_model(tokenizer), tokenizer.num_labels)  # the blank is the last class
    result = run(model, corpus, tokenizer, pipeline)
    ref_words = sum(len(t.split()) for t in TRANSCRIPTS)
    assert (result.wer, result.errors, result.words) == (1.0, ref_words, ref_words)
    _, entries = corpus
    assert result.predictions == [
        {"hyp": "", "ref": t, "fname": e["files"][0]["fname"]} for t, e in zip(TRANSCRIPTS, entries)
    ]


@pytest.mark.parametrize("padding, cap", [(0.0, 1), (0.24, 1), (0.24, 3)])
def test_each_frame_emits_up_to_the_symbol_cap_over_the_padded_length(
    corpus, tokenizer, pipeline, padding, cap
):
    dog = tokenizer.tokenize("dog")
    assert len(dog) == 1, "the test needs a one-piece word"
    model = forced(tiny_model(tokenizer), dog[0])
    result = run(model, corpus, tokenizer, pipeline, final_padding_secs=padding, max_symbols_per_step=cap)
    expected = [" ".join(["dog"] * (encoder_frames(samples, padding) * cap)) for samples in LENGTHS]
    assert [p["hyp"] for p in result.predictions] == expected
    assert (result.wer, result.errors, result.words) == word_error_rate(expected, TRANSCRIPTS)


def test_predictions_repeat_with_the_same_generator(corpus, tokenizer, pipeline):
    model = tiny_model(tokenizer, seed=3)
    one = run(model, corpus, tokenizer, pipeline, batch_size=1, max_symbols_per_step=2)
    again = run(model, corpus, tokenizer, pipeline, batch_size=1, max_symbols_per_step=2)
    assert one == again
    assert any(p["hyp"] for p in one.predictions), "an untrained random model should emit something"


def test_predictions_do_not_depend_on_batching(corpus, tokenizer, pipeline):
    model = tiny_model(tokenizer, seed=3)
    quiet = FeaturePipeline({**FEATURES, "dither": 0.0}, SPLICING, pipeline.melmeans, pipeline.melvars)
    assert (
        run(model, corpus, tokenizer, quiet, batch_size=1).predictions
        == run(model, corpus, tokenizer, quiet, batch_size=4).predictions
    )


def test_modes_are_restored_and_dropout_is_off_during_evaluation(corpus, tokenizer, pipeline):
    model = tiny_model(tokenizer, seed=3)
    reference = run(model, corpus, tokenizer, pipeline, max_symbols_per_step=2)
    noisy = RNNT(ConfigRNNT(**{**vars(model.config), "joint_dropout": 0.9}))
    noisy.load_state_dict(model.state_dict())
    noisy.train()
    pipeline.train()
    try:
        assert run(noisy, corpus, tokenizer, pipeline, max_symbols_per_step=2) == reference
        assert noisy.training and pipeline.training
    finally:
        pipeline.eval()


def test_character_error_rate(corpus, tokenizer, pipeline):
    model = forced(tiny_model(tokenizer), tokenizer.num_labels)
    result = run(model, corpus, tokenizer, pipeline, error_rate="char")
    assert result.words == sum(len(t) for t in TRANSCRIPTS) and result.wer == 1.0
