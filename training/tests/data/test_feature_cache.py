"""data.feature_cache: log-mels computed once from real audio files, read back by training."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml

from caiman_asr_train.core.errors import ConfigError, DataError
from caiman_asr_train.core.features import FilterbankFeatures
from caiman_asr_train.data.dataset import AudioDataset, collate
from caiman_asr_train.data.feature_cache import (
    DATA,
    INDEX,
    FeatureCache,
    build_feature_cache,
    check_covers,
    utterance_logmel,
)
from caiman_asr_train.data.features import FeaturePipeline
from caiman_asr_train.data.manifest import manifest_entry, write_manifest
from caiman_asr_train.train_utils.batches import TrainItems

SAMPLE_RATE = 16000
FEATURES = dict(
    normalize="per_feature",
    sample_rate=SAMPLE_RATE,
    window_size=0.025,
    window_stride=0.01,
    window="hann",
    n_fft=512,
    n_filt=20,
    dither=1e-5,
    stats_path="stats",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six FLAC files of chirps with digital silence at both ends (where dither shows), and a manifest."""
    root = tmp_path_factory.mktemp("cache_corpus")
    rng = np.random.default_rng(3)
    entries = []
    for i in range(6):
        seconds = 0.3 + 0.1 * i
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        tone = 0.2 * np.sin(2 * np.pi * (200 + 300 * i) * t * (1 + t)) + 0.01 * rng.standard_normal(t.shape)
        audio = np.concatenate([np.zeros(800), tone, np.zeros(800)]).astype(np.float32)
        fname = f"audio/{i}.flac"
        (root / fname).parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(root / fname, audio, SAMPLE_RATE, subtype="PCM_16")
        entries.append(manifest_entry(f"utterance {i}", fname, len(audio)))
    write_manifest(entries, root / "train.json")
    return root, entries


def _decoded(root: Path, entry: dict) -> np.ndarray:
    return soundfile.read(root / entry["files"][0]["fname"], dtype="float32")[0]


def test_cache_holds_each_utterances_float32_log_mels_in_float16(corpus, tmp_path):
    root, entries = corpus
    undithered = {**FEATURES, "dither": 0.0}
    frames = build_feature_cache(entries, root, undithered, tmp_path / "c", workers=2, progress=False)
    cache = FeatureCache(tmp_path / "c", undithered)
    filterbank = FilterbankFeatures(**undithered, compute_dtype=torch.float32)
    total = 0
    for entry in entries:
        audio = _decoded(root, entry)
        expected, lens = filterbank(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
        logmel, samples = cache.logmel(entry["files"][0]["fname"])
        assert samples == len(audio) and logmel.dtype == np.float16
        assert logmel.shape == (int(lens[0]), FEATURES["n_filt"])
        np.testing.assert_array_equal(logmel, expected[0].t().numpy().astype(np.float16))
        total += logmel.shape[0]
    assert frames == total


def test_dither_is_drawn_per_file_whatever_the_worker(corpus, tmp_path):
    root, entries = corpus
    build_feature_cache(entries, root, FEATURES, tmp_path / "one", workers=1, progress=False)
    build_feature_cache(entries[::-1], root, FEATURES, tmp_path / "two", workers=2, progress=False)
    one, two = FeatureCache(tmp_path / "one", FEATURES), FeatureCache(tmp_path / "two", FEATURES)
    undithered = FilterbankFeatures(**{**FEATURES, "dither": 0.0}, compute_dtype=torch.float32)
    filterbank = FilterbankFeatures(**FEATURES, compute_dtype=torch.float32)
    for entry in entries:
        fname = entry["files"][0]["fname"]
        np.testing.assert_array_equal(one.logmel(fname)[0], two.logmel(fname)[0])
        audio = _decoded(root, entry)
        np.testing.assert_array_equal(one.logmel(fname)[0], utterance_logmel(audio, filterbank, 1, fname))
        # the digital silence is dithered: off the log floor
        plain = utterance_logmel(audio, undithered, 1, fname)
        assert plain.min() < -40 < one.logmel(fname)[0].min()
    other_seed = tmp_path / "seed2"
    build_feature_cache(entries, root, FEATURES, other_seed, seed=2, workers=1, progress=False)
    fname = entries[0]["files"][0]["fname"]
    assert not np.array_equal(FeatureCache(other_seed, FEATURES).logmel(fname)[0], one.logmel(fname)[0])


def test_training_items_from_the_cache_featurise_like_the_audio(corpus, tmp_path):
    root, entries = corpus
    undithered = {**FEATURES, "dither": 0.0}
    build_feature_cache(entries, root, undithered, tmp_path / "c", workers=1, progress=False)
    dataset = AudioDataset(entries, root, SAMPLE_RATE)
    cached = TrainItems(dataset, None, FeatureCache(tmp_path / "c", undithered))
    plain = TrainItems(dataset, None)
    keys = [(i, 7) for i in range(len(entries))]
    a, b = collate([cached[k] for k in keys]), collate([plain[k] for k in keys])
    assert torch.equal(a.audio_lens, b.audio_lens) and a.transcripts == b.transcripts
    assert a.audio.shape == (len(entries), 0) and b.logmel is None
    pipeline = FeaturePipeline(
        undithered,
        {"frame_stacking": 3, "frame_subsampling": 3},
        torch.zeros(20),
        torch.ones(20) * 4,
        compute_dtype=torch.float32,
    )
    x, x_lens = pipeline.from_logmel(a.logmel, a.logmel_lens, norm_weight=0.5)
    y, y_lens = pipeline(b.audio, b.audio_lens, norm_weight=0.5)
    assert torch.equal(x_lens, y_lens)
    torch.testing.assert_close(x, y, atol=2e-2, rtol=0)  # float16 storage
    with pytest.raises(ValueError, match="speed perturbation"):
        TrainItems(dataset, object(), FeatureCache(tmp_path / "c", undithered))


def test_a_pickled_cache_maps_the_file_again_instead_of_copying_it(corpus, tmp_path):
    root, entries = corpus
    build_feature_cache(entries, root, FEATURES, tmp_path / "c", workers=1, progress=False)
    cache = FeatureCache(tmp_path / "c", FEATURES)
    payload = pickle.dumps(cache)
    assert len(payload) < (tmp_path / "c" / DATA).stat().st_size
    copy = pickle.loads(payload)
    for entry in entries:
        fname = entry["files"][0]["fname"]
        np.testing.assert_array_equal(copy.logmel(fname)[0], cache.logmel(fname)[0])
        assert copy.logmel(fname)[1] == cache.logmel(fname)[1]


def test_open_refuses_other_settings_missing_files_and_unfinished_caches(corpus, tmp_path):
    root, entries = corpus
    build_feature_cache(entries[:4], root, FEATURES, tmp_path / "c", workers=1, progress=False)
    FeatureCache(tmp_path / "c", {**FEATURES, "stats_path": "elsewhere", "normalize": "none"})
    with pytest.raises(ConfigError, match=r"filterbank_features\.n_filt=20, the config has 40"):
        FeatureCache(tmp_path / "c", {**FEATURES, "n_filt": 40})
    cache = FeatureCache(tmp_path / "c", FEATURES)
    with pytest.raises(DataError, match=r"lacks 2 training file\(s\), e\.g\. audio/4\.flac"):
        check_covers(cache, entries)
    with pytest.raises(DataError, match=r"index\.json is missing"):
        FeatureCache(tmp_path / "nothing", FEATURES)
    data = tmp_path / "c" / DATA
    data.write_bytes(data.read_bytes()[:-2])
    with pytest.raises(DataError, match=rf"{DATA} holds \d+ bytes, expected"):
        FeatureCache(tmp_path / "c", FEATURES)


def test_failed_build_leaves_the_old_cache_and_nothing_else(corpus, tmp_path):
    root, entries = corpus
    out = tmp_path / "c"
    build_feature_cache(entries[:2], root, FEATURES, out, workers=1, progress=False)
    broken = [*entries, manifest_entry("gone", "audio/missing.flac", 16000)]
    with pytest.raises(DataError, match="missing.flac"):
        build_feature_cache(broken, root, FEATURES, out, workers=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert len(json.loads((out / INDEX).read_text())["utterances"]) == 2


def test_command_line_builds_and_refuses_speed_perturbation(corpus, tmp_path):
    root, _ = corpus
    demo = (Path(__file__).resolve().parents[2] / "configs/demo.yaml").read_text()
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(demo)
    anchor = "    min_duration: 0.05\n"
    assert anchor in demo
    bad.write_text(
        demo.replace(anchor, anchor + "    speed_perturbation: {min_rate: 0.9, max_rate: 1.1, p: 1.0}\n")
    )
    command = [sys.executable, "-m", "caiman_asr_train.data.feature_cache", "--dataset_dir", str(root)]
    command += ["--train_manifests", "train.json", "--output_dir", str(tmp_path / "out"), "--no_progress"]
    refused = subprocess.run([*command, "--model_config", str(bad)], capture_output=True, text=True)
    assert refused.returncode == 2 and not (tmp_path / "out").exists()
    assert refused.stderr.strip().splitlines() == [
        f"error: {bad}: input_train.speed_perturbation is set, so the log-mels change every epoch; "
        "a feature cache needs it removed"
    ]
    made = subprocess.run([*command, "--model_config", str(good)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert "wrote the log-mels of 6 utterances" in made.stderr
    cache = FeatureCache(tmp_path / "out", yaml.safe_load(demo)["input_train"]["filterbank_features"])
    assert cache.n_filt == 80 and cache.missing(["audio/0.flac", "audio/9.flac"]) == ["audio/9.flac"]
