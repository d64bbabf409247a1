"""spm_from_json: SentencePiece unigram models from manifest transcripts (docs/formats.md section 7)."""

import string
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from caiman_asr_train.core.errors import DataError, TokenizerError
from caiman_asr_train.data.manifest import manifest_entry, read_manifest, write_manifest
from caiman_asr_train.data.normalizers import normalize_transcript
from caiman_asr_train.data.spm.spm_from_json import (
    config_user_symbols,
    main,
    spm_from_json,
    text_settings,
    train_sentencepiece,
)
from caiman_asr_train.data.tokenizer import Tokenizer
from caiman_asr_train.recipes.demo_corpus.corpus import default_output_dir
from caiman_asr_train.recipes.demo_corpus.grammar import make_sentences
from caiman_asr_train.rnnt import config
from caiman_asr_train.utils.cli import run_cli

TRAINING = Path(__file__).resolve().parents[3]
SCRIPT = TRAINING / "caiman_asr_train" / "data" / "spm" / "spm_from_json.py"
CONFIGS = TRAINING / "configs"

TRANSCRIPTS = [
    "The cat sat on the mat.",
    "A DOG ran <EOS> under the table",
    "it's a quick brown fox",
    "don't walk on the green grass",
    "seven blue birds sang",
    "the garden is quiet tonight",
]


def _write_manifest(path: Path, transcripts: list[str]) -> Path:
    entries = [manifest_entry(t, f"audio/{i}.flac", 16000) for i, t in enumerate(transcripts)]
    write_manifest(entries, path)
    return path


def _trainer_spec(model: Path):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    return proto


def test_settings_follow_the_spec(tmp_path):
    _write_manifest(tmp_path / "train.json", TRANSCRIPTS)
    model = spm_from_json(
        ["train.json"], tmp_path / "spm" / "tiny", 40, dataset_dir=tmp_path, user_symbols=["<EOS>"]
    )
    assert model == tmp_path / "spm" / "tiny.model"
    assert (tmp_path / "spm" / "tiny.vocab").is_file()
    proto = _trainer_spec(model)
    spec = proto.trainer_spec
    assert spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    assert (spec.unk_id, spec.bos_id, spec.eos_id) == (0, -1, -1)
    assert spec.character_coverage == 1.0
    assert list(spec.user_defined_symbols) == ["<EOS>"]
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.id_to_piece(0) == "<unk>"
    assert sp.piece_to_id("<EOS>") != sp.unk_id()
    # The .vocab file lists the model's pieces in id order.
    vocab = (tmp_path / "spm" / "tiny.vocab").read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[0] for line in vocab] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def test_round_trips_every_normalised_transcript(tmp_path):
    _write_manifest(tmp_path / "train.json", TRANSCRIPTS)
    model = spm_from_json([tmp_path / "train.json"], tmp_path / "tiny", 40)
    tokenizer = Tokenizer(model)
    for transcript in TRANSCRIPTS:
        text = normalize_transcript(transcript, "lowercase")
        assert text == text.lower() and "<EOS>" not in text
        ids = tokenizer.tokenize(text)  # unk="fail": no character is unknown
        assert tokenizer.detokenize(ids) == text


def test_labels_restrict_the_characters(tmp_path):
    labels = " abcdefghijklmnopqrstuvwxyz'"
    _write_manifest(tmp_path / "train.json", TRANSCRIPTS)
    model = spm_from_json(["train.json"], tmp_path / "tiny", 40, dataset_dir=tmp_path, labels=labels)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.piece_to_id(".") == sp.unk_id()
    tokenizer = Tokenizer(model)
    for transcript in TRANSCRIPTS:
        text = normalize_transcript(transcript, "lowercase", labels=labels)
        assert tokenizer.detokenize(tokenizer.tokenize(text)) == text


def test_none_keeps_case(tmp_path):
    _write_manifest(tmp_path / "train.json", TRANSCRIPTS)
    model = spm_from_json(
        ["train.json"], tmp_path / "tiny", 50, dataset_dir=tmp_path, normalize_transcripts="none"
    )
    tokenizer = Tokenizer(model)
    assert tokenizer.detokenize(tokenizer.tokenize("The DOG")) == "The DOG"


def test_several_manifests_are_combined(tmp_path):
    _write_manifest(tmp_path / "a.json", TRANSCRIPTS[:3])
    _write_manifest(tmp_path / "b.json", ["zebra xylophone jazz"])
    model = spm_from_json(["a.json", "b.json"], tmp_path / "tiny", 40, dataset_dir=tmp_path)
    tokenizer = Tokenizer(model)
    assert tokenizer.detokenize(tokenizer.tokenize("zebra xylophone jazz")) == "zebra xylophone jazz"


def test_small_corpus_gives_a_smaller_vocabulary_instead_of_failing(tmp_path):
    model = train_sentencepiece(["the cat sat", "the dog ran"], tmp_path / "tiny", 500)
    assert 0 < Tokenizer(model).num_labels < 500


def test_vocabulary_below_the_character_count_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="vocab_size of at least"):
        train_sentencepiece(["abcdefghijklmnop qrstuvwxyz"], tmp_path / "tiny", 10)
    assert not list(tmp_path.iterdir())


def test_same_transcripts_give_the_same_model_bytes(tmp_path):
    first = train_sentencepiece(TRANSCRIPTS, tmp_path / "a", 40).read_bytes()
    second = train_sentencepiece(TRANSCRIPTS, tmp_path / "b", 40).read_bytes()
    assert first == second


def test_overwrite_leaves_no_temporary_files(tmp_path):
    train_sentencepiece(TRANSCRIPTS, tmp_path / "tiny", 40)
    train_sentencepiece(TRANSCRIPTS[:3], tmp_path / "tiny", 45)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.model", "tiny.vocab"]


def test_missing_manifest_and_empty_transcripts_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="nope.json"):
        spm_from_json(["nope.json"], tmp_path / "tiny", 40, dataset_dir=tmp_path)
    _write_manifest(tmp_path / "empty.json", ["", "<EOS>", "   "])
    with pytest.raises(DataError, match="no non-empty transcripts"):
        spm_from_json(["empty.json"], tmp_path / "tiny", 40, dataset_dir=tmp_path)


def test_command_line(tmp_path, capsys):
    _write_manifest(tmp_path / "train.json", TRANSCRIPTS)
    args = [
        "--dataset_dir",
        str(tmp_path),
        "--manifests",
        "train.json",
        "--output_prefix",
        str(tmp_path / "out" / "cli"),
        "--user_symbols",
        "<EOS>",
    ]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--vocab_size", "40"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "cli.model").is_file()
    # A user mistake is one line on stderr and exit status 2, no traceback.
    with pytest.raises(SystemExit) as excinfo:
        run_cli(lambda: main([*args, "--vocab_size", "5"]))
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "vocab_size of at least" in err and "Traceback" not in err


def _demo_transcripts() -> tuple[list[str], list[str]]:
    """The demo corpus's transcripts when it has been made, else the generator's sentences."""
    demo = default_output_dir()
    if (demo / "train.json").is_file() and (demo / "dev.json").is_file():
        return (
            [e["transcript"] for e in read_manifest(demo / "train.json")],
            [e["transcript"] for e in read_manifest(demo / "dev.json")],
        )
    return make_sentences(seed=0)


def test_round_trips_every_demo_transcript(tmp_path):
    train, dev = _demo_transcripts()
    assert len(train) >= 3000 and len(dev) >= 200
    models = [train_sentencepiece([normalize_transcript(t) for t in train], tmp_path / "demo", 256)]
    # The model prepare_demo made, when there is one, must round-trip too.
    prepared = default_output_dir() / "spm" / "demo.model"
    if prepared.is_file():
        models.append(prepared)
    for model in models:
        tokenizer = Tokenizer(model)
        for transcript in train + dev:
            text = normalize_transcript(transcript)
            assert tokenizer.detokenize(tokenizer.tokenize(text)) == text, (model, text)


def test_config_supplies_normalisation_and_user_symbols(tmp_path):
    demo = (CONFIGS / "demo.yaml").read_text()
    (tmp_path / "model.yaml").write_text(demo + "\nuser_tokens:\n  eos: <EOS>\n")
    cfg = config.load(tmp_path / "model.yaml")
    settings = text_settings(cfg)
    assert settings["normalize_transcripts"] == "lowercase" and settings["remove_tags"] is True
    assert "".join(settings["labels"]) == " abcdefghijklmnopqrstuvwxyz'"
    assert config_user_symbols(cfg) == ["<EOS>"]

    _write_manifest(tmp_path / "train.json", TRANSCRIPTS)
    main(
        [
            "--config",
            str(tmp_path / "model.yaml"),
            "--dataset_dir",
            str(tmp_path),
            "--manifests",
            "train.json",
            "--output_prefix",
            str(tmp_path / "cfg"),
            "--vocab_size",
            "40",
        ]
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "cfg.model"))
    assert sp.piece_to_id("<EOS>") != sp.unk_id()
    assert sp.piece_to_id(".") == sp.unk_id()  # not in the config's labels
    assert sp.piece_to_id("T") == sp.unk_id()  # lower-cased
    # A flag overrides the config.
    main(
        [
            "--config",
            str(tmp_path / "model.yaml"),
            "--dataset_dir",
            str(tmp_path),
            "--manifests",
            "train.json",
            "--output_prefix",
            str(tmp_path / "keep"),
            "--vocab_size",
            "50",
            "--normalize_transcripts",
            "none",
            "--labels",
            string.ascii_letters + " '.",
            "--user_symbols",
        ]
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "keep.model"))
    assert sp.piece_to_id("T") != sp.unk_id() and sp.piece_to_id(".") != sp.unk_id()
    assert sp.piece_to_id("<EOS>") == sp.unk_id()
