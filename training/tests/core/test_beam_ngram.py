"""N-gram shallow fusion (core.ngram_scorer) with real KenLM models built by lmplz, and its effect on beam search."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import kenlm
import pytest

from caiman_asr_train.core.beam import BeamOptions, BeamSearch
from caiman_asr_train.core.errors import CheckpointError, DataError, UserError
from caiman_asr_train.core.ngram_scorer import NgramScorer

_spec = importlib.util.spec_from_file_location("beam_models", Path(__file__).with_name("beam_models.py"))
beam_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(beam_models)

REPO = Path(__file__).resolve().parents[3]
PIECES = ["\u2581x", "\u2581y", "\u2581z"]
X, Y, Z, BLANK = 0, 1, 2, 3
# "▁x" a little likelier than "▁y" to the acoustic model; each is then surely done.
CLOSE_CALL = {None: {X: 0.45, Y: 0.40, BLANK: 0.15}, X: {BLANK: 0.999}, Y: {BLANK: 0.999}, Z: {BLANK: 0.999}}


def make_ngram(directory: Path, lines: list[str], order: int = 2) -> Path:
    """A KenLM binary built by scripts/generate_ngram.sh (real lmplz and build_binary)."""
    subprocess.run([str(REPO / "scripts" / "build_kenlm.sh")], check=True)
    env = dict(os.environ, PATH=f"{REPO / 'tools' / 'kenlm' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    text = directory / "pieces.txt"
    text.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    binary = directory / "ngram.binary"
    subprocess.run(
        [
            str(REPO / "scripts" / "generate_ngram.sh"),
            str(order),
            str(text),
            str(directory / "ngram.arpa"),
            str(binary),
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    return binary


@pytest.fixture(scope="module")
def y_ngram(tmp_path_factory) -> Path:
    """An n-gram that has seen "▁y" far more often than "▁x"."""
    lines = ["\u2581y"] * 30 + ["\u2581y \u2581z"] * 10 + ["\u2581x"] * 2 + ["\u2581z \u2581y"] * 5
    return make_ngram(tmp_path_factory.mktemp("ngram"), lines)


def decode(scorer=None, width: int = 4) -> list[list[int]]:
    model = beam_models.table_model(3, CLOSE_CALL)
    x, lens = beam_models.silence(3)
    return BeamSearch(model, PIECES, BeamOptions(beam_width=width, temperature=1.0), ngram=scorer)(x, lens)


def test_the_ngram_moves_the_output_toward_its_training_text(y_ngram):
    assert decode() == [[X]]
    assert decode(NgramScorer.from_path(y_ngram, 1.0)) == [[Y]]


def test_scale_factor_zero_gives_the_result_without_the_ngram(y_ngram):
    assert decode(NgramScorer.from_path(y_ngram, 0.0)) == decode(None)


@pytest.mark.parametrize("scale", [0.05, 0.3, 1.0])
def test_score_per_piece_is_kenlms_log10_times_ln10_times_the_scale(y_ngram, scale):
    scorer = NgramScorer.from_bytes(y_ngram.read_bytes(), scale, "test")
    reference = kenlm.Model(str(y_ngram))
    sentence = ["\u2581y", "\u2581z", "\u2581x", "\u2581q"]  # "▁q" is out of vocabulary
    expected = [log10 for log10, _, _ in reference.full_scores(" ".join(sentence), bos=True, eos=False)]
    state = scorer.begin_state()
    for piece, log10 in zip(sentence, expected):
        added, state = scorer.score(state, piece)
        assert added == pytest.approx(scale * math.log(10) * log10, rel=1e-6)
    # Rescaling shares the loaded model and its cache, and scales every score.
    again = scorer.with_scale(2 * scale).score(scorer.begin_state(), "\u2581y")[0]
    assert again == pytest.approx(2 * scorer.score(scorer.begin_state(), "\u2581y")[0])


@pytest.mark.parametrize(
    "damage", [lambda b: b"not an n-gram at all", lambda b: b[: len(b) // 2], lambda b: b[:40] + b"\0" * 100]
)
def test_corrupt_embedded_bytes_give_a_one_line_error(y_ngram, damage):
    with pytest.raises(CheckpointError, match="best.hw.pt") as error:
        NgramScorer.from_bytes(damage(y_ngram.read_bytes()), 0.1, "best.hw.pt")
    assert "\n" not in str(error.value) and "--skip_ngram" in str(error.value)


def test_a_missing_ngram_file_is_named(tmp_path):
    with pytest.raises(DataError, match="missing.binary"):
        NgramScorer.from_path(tmp_path / "missing.binary", 0.1)


def test_a_negative_scale_factor_is_refused(y_ngram):
    with pytest.raises(UserError, match="scale factor must be >= 0"):
        NgramScorer.from_path(y_ngram, -0.1)


def test_user_tokens_are_not_scored_by_the_ngram(y_ngram):
    # The acoustic model prefers token 2; the n-gram has never seen it. As "<EOS>" (a user token)
    # it is not scored and stays; as an ordinary piece the n-gram's penalty replaces it with "▁y".
    model = beam_models.table_model(3, {None: {Z: 0.6, Y: 0.2, BLANK: 0.2}, Y: {BLANK: 1.0}, Z: {BLANK: 1.0}})
    x, lens = beam_models.silence(2)
    options = BeamOptions(temperature=1.0)
    scorer = NgramScorer.from_path(y_ngram, 1.0)
    user = BeamSearch(model, ["\u2581x", "\u2581y", "<EOS>"], options, ngram=scorer, user_tokens=[Z])(x, lens)
    plain = BeamSearch(model, ["\u2581x", "\u2581y", "\u2581q"], options, ngram=scorer)(x, lens)
    assert (user, plain) == ([[Z]], [[Y]])


def test_missing_kenlm_module_names_the_fix(y_ngram, monkeypatch):
    monkeypatch.setitem(sys.modules, "kenlm", None)  # what `import kenlm` sees when it is not installed
    with pytest.raises(UserError, match="pip install ufal-kenlm") as error:
        NgramScorer.from_bytes(y_ngram.read_bytes(), 0.1, "best.hw.pt")
    assert "\n" not in str(error.value)
