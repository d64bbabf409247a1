"""AudioDataset items and collate padding, on real FLAC files and a real SentencePiece model."""

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from torch.utils.data import DataLoader

from caiman_asr_train.core.errors import DataError
from caiman_asr_train.data.dataset import AudioDataset, Batch, collate
from caiman_asr_train.data.manifest import manifest_entry
from caiman_asr_train.data.spm.spm_from_json import train_sentencepiece
from caiman_asr_train.data.tokenizer import Tokenizer

RATE = 16000
LABELS = list(" abcdefghijklmnopqrstuvwxyz'")
# raw manifest transcripts -> what the dataset must return (lowercase, tags and
# characters outside LABELS removed, whitespace collapsed)
TRANSCRIPTS = {
    "The Cat <EOS> sat.": "the cat sat",
    "a  dog's   DINNER!": "a dog's dinner",
    "green-house": "greenhouse",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[dict], dict[str, np.ndarray]]:
    """Three FLAC files of different lengths and their manifest entries."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "audio").mkdir()
    rng = np.random.default_rng(0)
    entries, waves = [], {}
    for i, (transcript, length) in enumerate(zip(TRANSCRIPTS, (4000, 7000, 2500))):
        fname = f"audio/{i}.flac"
        wave = (0.3 * rng.standard_normal(length)).clip(-1, 1).astype(np.float32)
        soundfile.write(root / fname, wave, RATE, subtype="PCM_16")
        waves[fname] = soundfile.read(root / fname, dtype="float32")[0]
        entries.append(manifest_entry(transcript, fname, length, RATE))
    return root, entries, waves


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    text = list(TRANSCRIPTS.values()) * 5 + ["the green dog sat on a cat", "dinner in the house"]
    return Tokenizer(train_sentencepiece(text, tmp_path_factory.mktemp("spm") / "tiny", 40))


def test_items_hold_audio_normalised_transcript_tokens_and_fname(corpus, tokenizer):
    root, entries, waves = corpus
    dataset = AudioDataset(entries, root, RATE, tokenizer=tokenizer, labels=LABELS)
    assert len(dataset) == 3
    for index, expected in enumerate(TRANSCRIPTS.values()):
        item = dataset[index]
        fname = entries[index]["files"][0]["fname"]
        assert item["transcript"] == expected
        assert item["tokens"] == tokenizer.tokenize(expected)
        assert tokenizer.detokenize(item["tokens"]) == expected
        assert item["fname"] == fname
        assert item["audio"].dtype == np.float32
        np.testing.assert_array_equal(item["audio"], waves[fname])
        assert item["duration"] == pytest.approx(len(waves[fname]) / RATE)


def test_transcript_settings_are_applied(corpus):
    root, entries, _ = corpus
    dataset = AudioDataset(
        entries,
        root,
        RATE,
        normalize_transcripts="identity",
        replacements=[["-", " "]],
        remove_tags=False,
    )
    assert [dataset[i]["transcript"] for i in range(3)] == [
        "The Cat <EOS> sat.",
        "a dog's DINNER!",
        "green house",
    ]
    # Without a tokenizer there are no tokens (validation needs only the text).
    assert dataset[0]["tokens"] == []


def test_durations_come_from_the_manifest_without_reading_audio(corpus, tmp_path):
    _, entries, _ = corpus
    dataset = AudioDataset(entries, tmp_path / "no_audio_here", RATE)
    assert dataset.durations == [4000 / RATE, 7000 / RATE, 2500 / RATE]


def test_missing_audio_is_a_data_error_naming_the_file(corpus, tmp_path):
    _, entries, _ = corpus
    dataset = AudioDataset(entries, tmp_path, RATE)
    with pytest.raises(DataError, match="0.flac"):
        dataset[0]


def test_collate_pads_audio_with_zeros_and_tokens_with_id_0(corpus, tokenizer):
    root, entries, waves = corpus
    dataset = AudioDataset(entries, root, RATE, tokenizer=tokenizer, labels=LABELS)
    items = [dataset[i] for i in range(3)]
    batch = collate(items)
    assert isinstance(batch, Batch) and len(batch) == 3
    assert batch.audio.dtype == torch.float32 and batch.audio.shape == (3, 7000)
    assert batch.audio_lens.tolist() == [4000, 7000, 2500]
    assert batch.tokens.dtype == torch.int64
    assert batch.token_lens.tolist() == [len(item["tokens"]) for item in items]
    assert batch.tokens.shape == (3, max(batch.token_lens.tolist()))
    for b, item in enumerate(items):
        n, u = int(batch.audio_lens[b]), int(batch.token_lens[b])
        np.testing.assert_array_equal(batch.audio[b, :n].numpy(), item["audio"])
        assert not batch.audio[b, n:].any()
        assert batch.tokens[b, :u].tolist() == item["tokens"]
        assert not batch.tokens[b, u:].any()
    assert batch.transcripts == list(TRANSCRIPTS.values())
    assert batch.fnames == [e["files"][0]["fname"] for e in entries]
    moved = batch.to("cpu")
    assert torch.equal(moved.audio, batch.audio) and moved.fnames == batch.fnames


def test_collate_without_tokens_gives_an_empty_token_matrix(corpus):
    root, entries, _ = corpus
    batch = collate([AudioDataset(entries, root, RATE)[i] for i in range(2)])
    assert batch.tokens.shape == (2, 0) and batch.token_lens.tolist() == [0, 0]


def test_speed_perturbation_changes_the_length_by_the_drawn_rate(corpus):
    root, entries, waves = corpus
    fast = AudioDataset(
        entries, root, RATE, speed_perturbation={"min_rate": 1.25, "max_rate": 1.25, "p": 1.0}
    )
    item = fast[1]
    assert len(item["audio"]) == pytest.approx(7000 / 1.25, abs=2)
    assert item["duration"] == pytest.approx(len(item["audio"]) / RATE)
    # The same seed draws the same rates.
    varied = {"min_rate": 0.8, "max_rate": 1.2, "p": 1.0}

    def lengths(seed):
        dataset = AudioDataset(entries, root, RATE, speed_perturbation=varied, seed=seed)
        return [len(dataset[i]["audio"]) for i in range(3)]

    assert lengths(7) == lengths(7)
    assert lengths(7) != lengths(8)


def test_dataloader_workers_draw_different_perturbations(corpus):
    root, entries, _ = corpus
    dataset = AudioDataset(
        [entries[1]] * 4, root, RATE, speed_perturbation={"min_rate": 0.8, "max_rate": 1.2, "p": 1.0}, seed=3
    )
    dataset[0]  # the main process's generator now exists and is copied into each worker
    torch.manual_seed(0)
    loader = DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collate)
    lengths = [int(batch.audio_lens[0]) for batch in loader]
    # Items 0 and 1 are the first draws of workers 0 and 1: copies of one
    # generator would give them the same rate.
    assert lengths[0] != lengths[1]
