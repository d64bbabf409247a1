"""prepare_demo: every demo artefact made once, re-runs skip, changed inputs remake dependants.

The eSpeak NG corpus generator is replaced by a tiny noise corpus so the test
stays fast; the other phases are the real ones (mel statistics, SentencePiece,
KenLM through scripts/generate_ngram.sh).
"""

import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from caiman_asr_train.core.errors import DataError
from caiman_asr_train.core.features import load_mel_stats
from caiman_asr_train.data.feature_cache import FeatureCache, build_feature_cache
from caiman_asr_train.data.generate_mel_stats import compute_mel_stats
from caiman_asr_train.data.manifest import manifest_entry, write_manifest
from caiman_asr_train.data.ngram import is_kenlm_binary
from caiman_asr_train.data.tokenizer import Tokenizer
from caiman_asr_train.recipes import prepare_demo as prepare_demo_module
from caiman_asr_train.rnnt import config

REPO = Path(__file__).resolve().parents[3]
WORDS = "the a cat dog sat ran on under table garden red green blue house car it's".split()


def _tiny_corpus(
    dataset_dir, num_train: int = 0, progress: bool = True, featurise=None, receive=None
) -> dict:
    """Stand-in for make_demo_corpus: 24 utterances of noise with random sentences.

    Like the real one, it passes each utterance it makes, as its file decodes,
    through ``featurise`` (here, in this process) to ``receive``.
    """
    dataset_dir = Path(dataset_dir)
    if (dataset_dir / "train.json").is_file():
        return {"complete": True}
    rng = random.Random(0)
    noise = np.random.default_rng(0)
    entries = []
    for i in range(24):  # a stand-in corpus: num_train is accepted and ignored
        fname = f"audio/train/{i:03d}.flac"
        pcm = np.clip(3000 * noise.standard_normal(8000 + 400 * i), -32768, 32767).astype(np.int16)
        (dataset_dir / fname).parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(dataset_dir / fname, pcm, 16000, subtype="PCM_16")
        if featurise is not None:
            receive(fname, len(pcm), featurise(fname, pcm.astype(np.float32) / 32768))
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        entries.append(manifest_entry(sentence.capitalize(), fname, len(pcm)))
    write_manifest(entries, dataset_dir / "train.json")
    return {"complete": True}


@pytest.fixture
def demo(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_demo_module, "make_demo_corpus", _tiny_corpus)
    if shutil.which("lmplz") is None and not (REPO / "tools" / "kenlm" / "bin" / "lmplz").exists():
        subprocess.run([str(REPO / "scripts" / "build_kenlm.sh")], check=True)
    # The demo config's paths (../../datasets/demo/...) resolve inside tmp_path.
    config = tmp_path / "training" / "configs" / "demo.yaml"
    config.parent.mkdir(parents=True)
    shutil.copy(REPO / "training" / "configs" / "demo.yaml", config)
    root = tmp_path / "datasets" / "demo"

    def run(**kwargs) -> tuple[dict, list[str]]:
        lines: list[str] = []
        timings = prepare_demo_module.prepare_demo(
            config, root, vocab_size=kwargs.get("vocab_size", 40), progress=False, log=lines.append
        )
        return timings, lines

    return root, run


def _verdicts(lines: list[str]) -> dict[str, str]:
    return {line.split()[1].rstrip(":"): line.split(": ")[1].split(" (")[0] for line in lines}


def test_makes_everything_then_skips_and_remakes_what_changed(demo):
    root, run = demo
    timings, lines = run()
    assert set(timings) == {"corpus", "stats", "features", "spm", "ngram", "total"}
    assert _verdicts(lines) == {
        "corpus": "ready",
        "stats": "made",
        "features": "made with the corpus",
        "spm": "made",
        "ngram": "made",
    }
    melmeans, _, meln = load_mel_stats(root / "stats", 80)
    assert float(meln[0]) > 0
    entries = prepare_demo_module.read_manifests(["train.json"], root)
    demo_features = config.input(config.load(root.parents[1] / "training/configs/demo.yaml"), "train")
    cache = FeatureCache(root / "features", demo_features["filterbank_features"])
    assert cache.missing([e["files"][0]["fname"] for e in entries]) == []
    # The log-mels made with the corpus are those of its files, bit for bit.
    build_feature_cache(
        entries, root, demo_features["filterbank_features"], root / "from_files", progress=False
    )
    from_files = FeatureCache(root / "from_files", demo_features["filterbank_features"])
    for entry in entries:
        fname = entry["files"][0]["fname"]
        made, samples = cache.logmel(fname)
        expected, expected_samples = from_files.logmel(fname)
        assert samples == expected_samples and np.array_equal(made, expected)
    shutil.rmtree(root / "from_files")
    assert not list(root.glob(".features.partial-*"))
    tokenizer = Tokenizer(root / "spm" / "demo.model")
    # Normalised as the config says: lower case, no capital letters.
    assert tokenizer.pieces("the cat")[0] == "\u2581the"
    assert is_kenlm_binary(root / "ngram" / "ngram.binary")
    assert (root / "ngram" / "ngram.arpa").is_file()
    pieces = (root / "ngram" / "pieces.txt").read_text(encoding="utf-8").splitlines()
    assert len(pieces) == 24 and all(p.startswith("\u2581") for p in pieces)
    snapshot = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.suffix != ".json"}

    _, lines = run()
    assert _verdicts(lines) == {
        "corpus": "ready",
        "stats": "up to date",
        "features": "up to date",
        "spm": "up to date",
        "ngram": "up to date",
    }
    assert {p: p.read_bytes() for p in snapshot} == snapshot

    # A new vocabulary size remakes the tokenizer and the n-gram over its pieces only.
    _, lines = run(vocab_size=30)
    assert _verdicts(lines)["stats"] == "up to date"
    assert _verdicts(lines)["spm"] == _verdicts(lines)["ngram"] == "made"

    # A missing output is remade even though its inputs did not change.
    (root / "ngram" / "ngram.binary").unlink()
    _, lines = run(vocab_size=30)
    assert _verdicts(lines) == {
        "corpus": "ready",
        "stats": "up to date",
        "features": "up to date",
        "spm": "up to date",
        "ngram": "made",
    }
    assert is_kenlm_binary(root / "ngram" / "ngram.binary")


def test_a_new_front_end_version_remakes_the_statistics_and_log_mels_only(demo, monkeypatch):
    root, run = demo
    run()
    before = (root / "stats" / "melmeans.pt").stat().st_mtime_ns
    monkeypatch.setattr(prepare_demo_module, "FRONT_END_VERSION", prepare_demo_module.FRONT_END_VERSION + 1)
    _, lines = run()
    assert _verdicts(lines) == {
        "corpus": "ready",
        "stats": "made",
        "features": "made",
        "spm": "up to date",
        "ngram": "up to date",
    }
    assert (root / "stats" / "melmeans.pt").stat().st_mtime_ns != before


def test_statistics_come_from_at_most_stats_files_evenly_spaced_utterances(demo, monkeypatch):
    root, run = demo
    run()
    _, _, all_frames = load_mel_stats(root / "stats", 80)
    monkeypatch.setattr(prepare_demo_module, "STATS_FILES", 8)  # of 24: every third utterance
    _, lines = run()
    assert _verdicts(lines)["stats"] == "made" and _verdicts(lines)["spm"] == "up to date"
    means, variances, frames = load_mel_stats(root / "stats", 80)
    entries = prepare_demo_module.read_manifests(["train.json"], root)
    cfg = config.load(root.parents[1] / "training" / "configs" / "demo.yaml")
    features = config.input(cfg, "train")["filterbank_features"]
    expected = compute_mel_stats(entries[::3], root, features, progress=False)
    assert float(frames[0]) == expected[2] < float(all_frames[0])
    torch.testing.assert_close(means, expected[0].to(means.dtype))


def test_an_empty_training_manifest_is_a_one_line_data_error(demo, monkeypatch):
    root, run = demo

    def empty_corpus(dataset_dir, num_train: int = 0, progress: bool = True, **_hooks) -> dict:
        write_manifest([], Path(dataset_dir) / "train.json")
        return {"complete": True}

    monkeypatch.setattr(prepare_demo_module, "make_demo_corpus", empty_corpus)
    with pytest.raises(DataError, match="no feature frames in 0 manifest entries"):
        run()


def test_speed_perturbation_in_the_config_means_no_log_mel_cache(demo):
    root, run = demo
    run()
    assert (root / "features" / "index.json").is_file()
    config_path = root.parents[1] / "training/configs/demo.yaml"
    anchor = "    min_duration: 0.05\n"
    text = config_path.read_text()
    assert anchor in text
    config_path.write_text(
        text.replace(anchor, anchor + "    speed_perturbation: {min_rate: 0.9, max_rate: 1.1}\n")
    )
    timings, lines = run()
    # the stale cache is gone: train.sh passes --feature_cache only when it exists
    assert "features" not in timings and "features" not in _verdicts(lines)
    assert not (root / "features").exists()
