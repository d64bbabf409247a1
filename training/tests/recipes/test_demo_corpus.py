import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from caiman_asr_train.core.errors import DataError
from caiman_asr_train.data.feature_cache import (
    CacheWriter,
    FeatureCache,
    LogmelFeaturiser,
    build_feature_cache,
)
from caiman_asr_train.data.manifest import read_manifest, read_manifests
from caiman_asr_train.recipes import demo_corpus
from caiman_asr_train.recipes.demo_corpus import corpus, espeak, grammar
from caiman_asr_train.recipes.demo_corpus.corpus import default_output_dir, make_demo_corpus
from caiman_asr_train.recipes.demo_corpus.grammar import make_sentences, number_words
from caiman_asr_train.rnnt import config

PACKAGE_DATA = Path(demo_corpus.__file__).parent

TRANSCRIPT = re.compile(r"^[a-z']+( [a-z']+)*$")


@pytest.fixture(scope="module")
def sentences():
    return make_sentences(seed=0)


def test_default_sizes_vocabulary_and_held_out_dev(sentences):
    train, dev = sentences
    assert len(train) == 3000 and len(set(train)) == 3000
    assert len(dev) == 200 and len(set(dev)) == 200
    assert not set(train) & set(dev)
    vocabulary = {word for sentence in train for word in sentence.split()}
    assert len(vocabulary) >= 400
    assert {word for sentence in dev for word in sentence.split()} <= vocabulary
    for sentence in train + dev:
        assert TRANSCRIPT.match(sentence), sentence
        assert 3 <= len(sentence.split()) <= 10, sentence


def test_sentences_vary_in_length_and_pattern(sentences):
    train, _ = sentences
    lengths = {len(s.split()) for s in train}
    assert lengths == set(range(3, 11))
    first_words = {s.split()[0] for s in train}
    assert {"where", "what", "did", "please", "there"} <= first_words  # questions, commands
    assert any("'" in s for s in train)
    assert sum(any(n in s.split() for n in ("twenty", "thirty", "forty")) for s in train) > 20


def test_same_seed_same_sentences_other_seed_other_sentences(sentences):
    assert make_sentences(seed=0) == sentences
    other_train, other_dev = make_sentences(seed=1)
    assert len(set(other_train) & set(sentences[0])) < 300
    assert other_dev != sentences[1]


def test_sentences_of_a_seed_are_pinned():
    # The lexicon and patterns moved from code to data files without changing
    # a sentence; a change that does must be deliberate and update this hash.
    train, dev = make_sentences(seed=7, num_train=50, num_dev=10)
    digest = hashlib.sha256(("\n".join(train) + "|" + "\n".join(dev)).encode()).hexdigest()
    assert digest == "c15996e33f93fb53b1e77445145ebeba57d904e86db9d5391273cfc2d9404f2c"


def test_grammar_data_files_ship_in_the_package_and_are_fingerprinted(tiny):
    expected = hashlib.sha256()
    for name in ("lexicon.json", "patterns.json"):
        expected.update(hashlib.sha256((PACKAGE_DATA / name).read_bytes()).digest())
    assert grammar.data_files_sha256() == expected.hexdigest()
    assert tiny[1]["grammar_data_sha256"] == expected.hexdigest()


def test_a_corpus_made_from_other_grammar_data_is_refused(tiny, monkeypatch):
    monkeypatch.setattr(corpus, "data_files_sha256", lambda: "0" * 64)
    with pytest.raises(DataError, match="holds a demo corpus made with .*grammar_data_sha256="):
        make_demo_corpus(tiny[0], seed=0, num_train=6, num_dev=3, workers=1, progress=False)


def test_a_pattern_the_grammar_lacks_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(grammar, "_PATTERNS", [(1.0, "statement"), (1.0, "limerick")])
    with pytest.raises(DataError, match="patterns.json names 'limerick'"):
        grammar._Grammar(random.Random(0))


def test_small_requests_still_hold_out_dev():
    train, dev = make_sentences(seed=3, num_train=6, num_dev=3)
    assert len(set(train)) == 6 and len(set(dev)) == 3 and not set(train) & set(dev)


def test_number_words():
    assert number_words(0) == ["zero"]
    assert number_words(13) == ["thirteen"]
    assert number_words(40) == ["forty"]
    assert number_words(99) == ["ninety", "nine"]
    assert number_words(100) == ["one", "hundred"]


def test_default_output_dir_is_at_the_repository_root():
    repo_root = Path(__file__).resolve().parents[3]
    assert (repo_root / "training" / "caiman_asr_train").is_dir()
    assert default_output_dir() == repo_root / "datasets" / "demo"


def _files(root: Path) -> dict:
    return {p.relative_to(root): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 6 + 3 utterance corpus made in-process."""
    root = tmp_path_factory.mktemp("demo") / "demo"
    marker = make_demo_corpus(root, seed=0, num_train=6, num_dev=3, workers=1, progress=False)
    return root, marker


def test_tiny_corpus_is_real_16khz_speech_with_valid_manifests(tiny):
    root, marker = tiny
    assert marker["complete"] and marker["seed"] == 0
    train, dev = make_sentences(seed=0, num_train=6, num_dev=3)
    for split, texts in (("train", train), ("dev", dev)):
        entries = read_manifests([f"{split}.json"], root)
        assert [e["transcript"] for e in entries] == texts
        for entry in entries:
            info = entry["files"][0]
            assert info["fname"].startswith(f"audio/{split}/") and info["fname"].endswith(".flac")
            audio, rate = soundfile.read(root / info["fname"], dtype="float32")
            assert rate == 16000 and audio.ndim == 1 and len(audio) == info["num_samples"]
            assert info["duration"] == len(audio) / 16000
            # Speech, not silence: loud somewhere, and 0.4-6 s for 3-10 words.
            assert np.abs(audio).max() > 0.2
            assert 0.4 < info["duration"] < 6
    total = sum(e["original_duration"] for s in ("train", "dev") for e in read_manifest(root / f"{s}.json"))
    assert marker["train_hours"] + marker["dev_hours"] == pytest.approx(total / 3600, abs=1e-3)


def test_rerun_is_a_no_op(tiny):
    root, marker = tiny
    before = _files(root)
    assert make_demo_corpus(root, seed=0, num_train=6, num_dev=3, workers=1, progress=False) == marker
    assert _files(root) == before


def test_same_seed_gives_identical_corpus_with_a_worker_pool(tiny, tmp_path):
    root, _ = tiny
    make_demo_corpus(tmp_path, seed=0, num_train=6, num_dev=3, workers=2, progress=False)
    for split in ("train", "dev"):
        assert (tmp_path / f"{split}.json").read_bytes() == (root / f"{split}.json").read_bytes()
    for entry in read_manifest(root / "train.json"):
        fname = entry["files"][0]["fname"]
        np.testing.assert_array_equal(soundfile.read(tmp_path / fname)[0], soundfile.read(root / fname)[0])


def test_interrupted_run_resumes_keeping_finished_audio(tiny, tmp_path):
    root = tmp_path / "demo"
    shutil.copytree(tiny[0], root)
    # What an interruption leaves: no manifests, an incomplete marker, some audio missing.
    marker = json.loads((root / "corpus.json").read_text())
    (root / "corpus.json").write_text(json.dumps({**marker, "complete": False}))
    for name in ("train.json", "dev.json", "audio/train/train_00004.flac", "audio/dev/dev_00001.flac"):
        (root / name).unlink()
    stale = root / "audio" / "train" / ".train_00004.flac.abc123.tmp"
    stale.write_bytes(b"half a file")
    kept = _files(root / "audio")
    del kept[stale.relative_to(root / "audio")]

    make_demo_corpus(root, seed=0, num_train=6, num_dev=3, workers=1, progress=False)
    after = _files(root / "audio")
    assert {k: after[k] for k in kept} == kept  # finished files untouched
    assert len(after) == 9 and not stale.exists()
    for name in ("train.json", "dev.json", "corpus.json"):
        assert (root / name).read_bytes() == (tiny[0] / name).read_bytes()


def test_audio_cut_short_is_made_again_on_resume(tiny, tmp_path):
    # The FLACs are not synced one by one, so a power cut can leave one whose
    # header promises more samples than its data holds.
    root = tmp_path / "demo"
    shutil.copytree(tiny[0], root)
    marker = json.loads((root / "corpus.json").read_text())
    (root / "corpus.json").write_text(json.dumps({**marker, "complete": False}))
    cut = root / "audio" / "train" / "train_00002.flac"
    whole = cut.read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    assert soundfile.info(str(cut)).frames > 0  # the header alone still looks complete

    make_demo_corpus(root, seed=0, num_train=6, num_dev=3, workers=1, progress=False)
    assert cut.read_bytes() == whole
    assert (root / "train.json").read_bytes() == (tiny[0] / "train.json").read_bytes()


def test_blocks_of_sentences_give_the_same_audio_whatever_the_workers_and_on_resume(tmp_path, monkeypatch):
    # Blocks of 4: three train blocks (the last one short) spread over two workers.
    monkeypatch.setattr(corpus, "BLOCK", 4)
    one, two = tmp_path / "one", tmp_path / "two"
    make_demo_corpus(one, seed=0, num_train=10, num_dev=3, workers=1, progress=False)
    make_demo_corpus(two, seed=0, num_train=10, num_dev=3, workers=2, progress=False)
    audio = sorted(p.relative_to(one) for p in one.rglob("*.flac"))
    assert len(audio) == 13
    for name in audio:
        assert (one / name).read_bytes() == (two / name).read_bytes()
    # Within a block an utterance follows the ones before it: spoken alone, it differs.
    settings = espeak.speaker_settings(0, "train", 6)
    text = make_sentences(seed=0, num_train=10, num_dev=3)[0][6]
    alone = corpus._pcm16(espeak.synthesize(text, settings))
    in_block = soundfile.read(one / "audio/train/train_00006.flac", dtype="int16")[0]
    assert not np.array_equal(alone, in_block)
    # A file in the middle of a block, lost: the block is spoken again up to it, the same.
    marker = json.loads((two / "corpus.json").read_text())
    (two / "corpus.json").write_text(json.dumps({**marker, "complete": False}))
    lost = two / "audio/train/train_00006.flac"
    lost.unlink()
    kept = _files(two / "audio")
    make_demo_corpus(two, seed=0, num_train=10, num_dev=3, workers=2, progress=False)
    assert lost.read_bytes() == (one / "audio/train/train_00006.flac").read_bytes()
    after = _files(two / "audio")
    assert {k: after[k] for k in kept} == kept  # its neighbours were not written again


def test_log_mels_made_with_the_corpus_are_those_of_its_files(tmp_path):
    cfg = config.load(Path(__file__).resolve().parents[3] / "training/configs/demo.yaml")
    features = config.input(cfg, "train")["filterbank_features"]
    root = tmp_path / "demo"
    received = []
    with CacheWriter(tmp_path / "made", features) as cache:

        def receive(fname, samples, logmel):
            received.append(fname)
            cache.add(fname, samples, logmel)

        make_demo_corpus(
            root,
            seed=0,
            num_train=6,
            num_dev=3,
            workers=2,
            progress=False,
            featurise=LogmelFeaturiser(features),
            receive=receive,
        )
        cache.commit()
    entries = read_manifests(["train.json"], root)
    assert sorted(received) == sorted(e["files"][0]["fname"] for e in entries)  # training utterances only
    build_feature_cache(entries, root, features, tmp_path / "files", workers=1, progress=False)
    made, files = FeatureCache(tmp_path / "made", features), FeatureCache(tmp_path / "files", features)
    for entry in entries:
        fname = entry["files"][0]["fname"]
        (a, a_samples), (b, b_samples) = made.logmel(fname), files.logmel(fname)
        assert a_samples == b_samples == entry["files"][0]["num_samples"]
        assert a.shape[0] > 50 and np.array_equal(a, b)


def test_other_settings_in_the_same_folder_are_refused(tiny):
    root, _ = tiny
    with pytest.raises(DataError, match="holds a demo corpus made with .*seed=0.*pass another --output_dir"):
        make_demo_corpus(root, seed=1, num_train=6, num_dev=3, workers=1, progress=False)


def test_espeak_command_fallback(monkeypatch, tmp_path):
    executable = shutil.which("espeak-ng")
    if executable is None:
        pytest.skip("the espeak-ng command is not installed")
    monkeypatch.setattr(espeak, "_ENGINE", espeak._EspeakCommand(executable))
    audio = espeak.synthesize("hello there", espeak.speaker_settings(0, "train", 0))
    assert audio.dtype == np.float32 and 0.3 < len(audio) / 16000 < 3
    assert np.abs(audio).max() > 0.2


def test_runs_as_a_script(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "caiman_asr_train.recipes.demo_corpus",
            "--output_dir",
            str(tmp_path),
            "--num_train",
            "3",
            "--num_dev",
            "1",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "demo corpus: 3 train + 1 dev utterances" in result.stdout
    assert len(read_manifest(tmp_path / "train.json")) == 3
