"""prep_kenlm_data: manifest transcripts as SentencePiece piece lines for lmplz (docs/formats.md section 7)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from caiman_asr_train.core.errors import TokenizerError
from caiman_asr_train.data.manifest import manifest_entry, write_manifest
from caiman_asr_train.data.spm.spm_from_json import spm_from_json
from caiman_asr_train.data.tokenizer import Tokenizer
from caiman_asr_train.lm.prep_kenlm_data import prep_kenlm_data

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "training" / "caiman_asr_train" / "lm" / "prep_kenlm_data.py"

TRANSCRIPTS = [
    "The cat sat on the MAT",
    "the dog <EOS> sat on the rug",
    "",
    "it's a quick brown fox",
    "don't walk on the grass",
]


@pytest.fixture
def corpus(tmp_path) -> Path:
    entries = [manifest_entry(t, f"audio/{i}.flac", 16000) for i, t in enumerate(TRANSCRIPTS)]
    write_manifest(entries, tmp_path / "train.json")
    spm_from_json(["train.json"], tmp_path / "spm", 40, dataset_dir=tmp_path)
    return tmp_path


def test_one_line_of_pieces_per_normalised_transcript(corpus):
    out = corpus / "lm" / "pieces.txt"
    assert prep_kenlm_data(["train.json"], corpus / "spm.model", out, dataset_dir=corpus) == 4
    lines = out.read_text(encoding="utf-8").splitlines()
    tokenizer = Tokenizer(corpus / "spm.model")
    expected = [
        "the cat sat on the mat",
        "the dog sat on the rug",
        "it's a quick brown fox",
        "don't walk on the grass",
    ]
    assert lines == [" ".join(tokenizer.pieces(t)) for t in expected]
    # The pieces of a line spell the normalised transcript.
    assert [line.replace(" ", "").replace("\u2581", " ").strip() for line in lines] == expected
    assert all(line.split()[0].startswith("\u2581") for line in lines)


def test_unknown_characters_fail_by_default(corpus):
    write_manifest([manifest_entry("the caf\u00e9", "a.flac", 16000)], corpus / "other.json")
    with pytest.raises(TokenizerError, match="caf\u00e9"):
        prep_kenlm_data(["other.json"], corpus / "spm.model", corpus / "x.txt", dataset_dir=corpus)
    assert not (corpus / "x.txt").exists()
    with pytest.warns(UserWarning):
        prep_kenlm_data(
            ["other.json"], corpus / "spm.model", corpus / "x.txt", dataset_dir=corpus, unk="warn"
        )
    assert "<unk>" in (corpus / "x.txt").read_text(encoding="utf-8").split()


def test_command_line_output_feeds_generate_ngram(corpus):
    out = corpus / "pieces.txt"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--dataset_dir",
            str(corpus),
            "--manifests",
            "train.json",
            "--spm_model",
            str(corpus / "spm.model"),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 4 lines" in result.stdout
    env = dict(os.environ)
    env["PATH"] = f"{REPO / 'tools' / 'kenlm' / 'bin'}{os.pathsep}{env['PATH']}"
    if shutil.which("lmplz", path=env["PATH"]) is None:
        subprocess.run([str(REPO / "scripts" / "build_kenlm.sh")], check=True)
    ngram = subprocess.run(
        [
            str(REPO / "scripts" / "generate_ngram.sh"),
            "3",
            str(out),
            str(corpus / "ngram.arpa"),
            str(corpus / "ngram.binary"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ngram.returncode == 0, ngram.stderr
    # The n-gram's vocabulary is exactly the pieces of the text.
    arpa = (corpus / "ngram.arpa").read_text(encoding="utf-8")
    unigrams = arpa.split("\\1-grams:\n")[1].split("\n\n")[0].splitlines()
    vocabulary = {line.split("\t")[1] for line in unigrams} - {"<s>", "</s>", "<unk>"}
    assert vocabulary == set(out.read_text(encoding="utf-8").split())
