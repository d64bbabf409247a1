"""Tokenizer: word-by-word SentencePiece encoding, sampling, <unk> policy, model loading (docs/formats.md section 7)."""

import pickle
import random
import warnings
from pathlib import Path

import pytest
import sentencepiece as spm

from caiman_asr_train.core.errors import TokenizerError
from caiman_asr_train.data.spm.spm_from_json import train_sentencepiece
from caiman_asr_train.data.tokenizer import Tokenizer

WORDS = (
    "the a cat dog sat ran on under table garden quickly slowly red green "
    "blue house car walked talked running jumping it's don't yellow window"
).split()


def _sentences(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return train_sentencepiece(_sentences(), tmp_path_factory.mktemp("spm") / "tiny", 60)


@pytest.fixture
def tokenizer(model_path) -> Tokenizer:
    return Tokenizer(model_path)


def test_round_trips_every_training_transcript(tokenizer):
    for sentence in _sentences():
        ids = tokenizer.tokenize(sentence)
        assert all(0 <= i < tokenizer.num_labels for i in ids)
        assert tokenizer.detokenize(ids) == sentence


def test_num_labels_is_the_sentencepiece_vocabulary_size(tokenizer, model_path):
    assert tokenizer.num_labels == spm.SentencePieceProcessor(model_file=str(model_path)).get_piece_size()


def test_encodes_word_by_word(tokenizer, model_path):
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    sentence = "the cat sat under the yellow window"
    expected = [i for word in sentence.split() for i in sp.encode(word)]
    assert tokenizer.tokenize(sentence) == expected
    # Whitespace is only a word break: extra spaces change nothing.
    assert tokenizer.tokenize("  the cat\tsat under  the yellow window ") == expected


def test_words_seen_before_get_the_same_ids(tokenizer, model_path):
    # Training tokenizes every transcript once an epoch: the second and later
    # encodings of a word (remembered) must be SentencePiece's, whatever a
    # caller did with an earlier result, and an unknown character still fails.
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    sentence = "the cat sat on the table and the cat ran"
    expected = [i for word in sentence.split() for i in sp.encode(word)]
    first = tokenizer.tokenize(sentence)
    assert first == expected
    first.clear()
    for _ in range(2):
        assert tokenizer.tokenize(sentence) == expected
        with pytest.raises(TokenizerError):
            tokenizer.tokenize("the cat sat in the caf\u00e9")


def test_pieces_are_the_piece_strings_of_the_ids(tokenizer, model_path):
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    sentence = "the dog ran under the table"
    pieces = tokenizer.pieces(sentence)
    assert pieces == [sp.id_to_piece(i) for i in tokenizer.tokenize(sentence)]
    assert "".join(pieces).replace("\u2581", " ").strip() == sentence


def test_model_from_bytes_equals_model_from_path(model_path):
    from_path = Tokenizer(model_path)
    from_bytes = Tokenizer(model_path.read_bytes())
    assert from_bytes.model_bytes == from_path.model_bytes == model_path.read_bytes()
    assert from_bytes.num_labels == from_path.num_labels
    for sentence in _sentences(50, seed=1):
        assert from_bytes.tokenize(sentence) == from_path.tokenize(sentence)


def test_sampling_only_when_sample_is_true(model_path):
    tokenizer = Tokenizer(model_path, sampling=1.0)
    sentence = "running jumping quickly walked talked garden window yellow"
    best = tokenizer.tokenize(sentence)
    random.seed(0)
    assert all(tokenizer.tokenize(sentence) == best for _ in range(30))
    sampled = [tokenizer.tokenize(sentence, sample=True) for _ in range(30)]
    assert any(ids != best for ids in sampled)
    # A sampled segmentation is still a segmentation of the same text.
    assert all(tokenizer.detokenize(ids) == sentence for ids in sampled)


def test_zero_sampling_never_samples(model_path):
    tokenizer = Tokenizer(model_path, sampling=0.0)
    sentence = "running jumping quickly walked talked garden window yellow"
    best = tokenizer.tokenize(sentence)
    assert all(tokenizer.tokenize(sentence, sample=True) == best for _ in range(30))


def test_sampling_probability_is_per_word(model_path):
    random.seed(1)
    spm.set_random_generator_seed(1)
    best = Tokenizer(model_path).tokenize("running")

    def resegmented(sampling: float) -> int:
        tokenizer = Tokenizer(model_path, sampling=sampling)
        return sum(tokenizer.tokenize("running", sample=True) != best for _ in range(2000))

    # A sampled segmentation may still be the best one, so compare rates:
    # sampling half the words changes about half as many as sampling all.
    half, always = resegmented(0.5), resegmented(1.0)
    assert 0.3 * always < half < 0.7 * always


def test_unknown_character_fails_by_default_naming_transcript_and_fix(tokenizer):
    with pytest.raises(TokenizerError) as excinfo:
        tokenizer.tokenize("the caf\u00e9 sat")
    message = str(excinfo.value)
    assert "the caf\u00e9 sat" in message
    assert "\u00e9" in message
    assert "normalise" in message and "retrain" in message


def test_unknown_character_warns_once_and_keeps_unk(model_path):
    tokenizer = Tokenizer(model_path, unk="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = tokenizer.tokenize("the caf\u00e9 sat")
        tokenizer.tokenize("the z\u00fcrich dog")
    assert len(caught) == 1
    assert "caf\u00e9" in str(caught[0].message)
    assert 0 in first  # <unk> is id 0
    assert tokenizer.pieces("the caf\u00e9 sat").count("<unk>") == 1


def test_missing_model_names_the_file(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(TokenizerError, match="nope.model"):
        Tokenizer(missing)


@pytest.mark.parametrize("content", [b"", b"this is not a sentencepiece model"])
def test_corrupt_model_names_the_file(tmp_path, content):
    bad = tmp_path / "bad.model"
    bad.write_bytes(content)
    with pytest.raises(TokenizerError, match="bad.model"):
        Tokenizer(bad)
    with pytest.raises(TokenizerError):
        Tokenizer(content)


def test_rejects_bad_settings(model_path):
    with pytest.raises(TokenizerError, match="sampling"):
        Tokenizer(model_path, sampling=1.5)
    with pytest.raises(TokenizerError, match="unk"):
        Tokenizer(model_path, unk="ignore")


def test_detokenize_rejects_the_blank(tokenizer):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tokenizer.detokenize([tokenizer.num_labels])


def test_pickles_for_dataloader_workers(model_path):
    tokenizer = Tokenizer(model_path, sampling=0.3, unk="warn")
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.model_bytes == tokenizer.model_bytes
    assert (copy.sampling, copy.unk) == (0.3, "warn")
    assert copy.tokenize("the cat sat") == tokenizer.tokenize("the cat sat")
