"""KenLM n-grams: generate_ngram.sh, the binary magic header check, finding and reading (docs/formats.md section 7).

Uses the real KenLM tools: from PATH, else tools/kenlm/bin, else built once
with scripts/build_kenlm.sh (test.sh builds them before pytest).
"""

import math
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from caiman_asr_train.core.errors import DataError
from caiman_asr_train.data.ngram import KENLM_MAGIC, find_ngram, is_kenlm_binary, read_kenlm_binary

REPO = Path(__file__).resolve().parents[3]
GENERATE = REPO / "scripts" / "generate_ngram.sh"

# Too small for Kneser-Ney discount estimation: lmplz alone fails on it.
TINY_CORPUS = "the cat sat on the mat\nthe dog sat on the rug\n"


@pytest.fixture(scope="module")
def kenlm_env() -> dict:
    """Environment in which generate_ngram.sh finds lmplz and build_binary."""
    env = dict(os.environ)
    env["PATH"] = f"{REPO / 'tools' / 'kenlm' / 'bin'}{os.pathsep}{env['PATH']}"
    if (
        shutil.which("lmplz", path=env["PATH"]) is None
        or shutil.which("build_binary", path=env["PATH"]) is None
    ):
        subprocess.run([str(REPO / "scripts" / "build_kenlm.sh")], check=True)
    return env


def _zipf_corpus(path: Path, lines: int = 1000, seed: int = 0) -> Path:
    """Word frequencies like natural text, so lmplz needs no discount fallback."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(200)]
    weights = [1 / (rank + 1) for rank in range(200)]
    path.write_text(
        "".join(" ".join(rng.choices(words, weights, k=rng.randint(3, 10))) + "\n" for _ in range(lines))
    )
    return path


def _generate(env: dict, order: int, txt: Path, arpa: Path, binary: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(GENERATE), str(order), str(txt), str(arpa), str(binary)],
        capture_output=True,
        text=True,
        env=env,
    )


@pytest.fixture(scope="module")
def tiny_ngram(kenlm_env, tmp_path_factory) -> Path:
    # A space in the path: the script must quote every path.
    directory = tmp_path_factory.mktemp("ngram") / "with space"
    directory.mkdir()
    (directory / "corpus.txt").write_text(TINY_CORPUS)
    result = _generate(
        kenlm_env, 3, directory / "corpus.txt", directory / "ngram.arpa", directory / "ngram.binary"
    )
    assert result.returncode == 0, result.stderr
    return directory


def test_tiny_corpus_needs_and_gets_the_discount_fallback(kenlm_env, tiny_ngram, tmp_path):
    lmplz = shutil.which("lmplz", path=kenlm_env["PATH"])
    (tmp_path / "corpus.txt").write_text(TINY_CORPUS)
    direct = subprocess.run(
        [
            lmplz,
            "-o",
            "3",
            "-S",
            "10%",
            "-T",
            f"{tmp_path}/",
            "--text",
            str(tmp_path / "corpus.txt"),
            "--arpa",
            str(tmp_path / "direct.arpa"),
        ],
        capture_output=True,
        text=True,
    )
    assert direct.returncode != 0 and "discount_fallback" in direct.stderr
    result = _generate(kenlm_env, 3, tmp_path / "corpus.txt", tmp_path / "a.arpa", tmp_path / "b.binary")
    assert result.returncode == 0, result.stderr
    assert "retrying with --discount_fallback" in result.stderr
    assert is_kenlm_binary(tmp_path / "b.binary")


def test_natural_corpus_needs_no_fallback(kenlm_env, tmp_path):
    txt = _zipf_corpus(tmp_path / "corpus.txt")
    result = _generate(kenlm_env, 4, txt, tmp_path / "ngram.arpa", tmp_path / "ngram.binary")
    assert result.returncode == 0, result.stderr
    assert "discount_fallback" not in result.stderr
    assert "\\4-grams:" in (tmp_path / "ngram.arpa").read_text()
    assert is_kenlm_binary(tmp_path / "ngram.binary")


def test_outputs_are_complete_and_no_temporary_files_are_left(tiny_ngram):
    assert sorted(p.name for p in tiny_ngram.iterdir()) == ["corpus.txt", "ngram.arpa", "ngram.binary"]
    arpa = (tiny_ngram / "ngram.arpa").read_text()
    assert arpa.startswith("\n\\data\\") or arpa.startswith("\\data\\")
    assert arpa.rstrip().endswith("\\end\\")


def test_binary_has_the_kenlm_magic_header(tiny_ngram):
    assert (tiny_ngram / "ngram.binary").read_bytes().startswith(KENLM_MAGIC)
    assert is_kenlm_binary(tiny_ngram / "ngram.binary")
    assert not is_kenlm_binary(tiny_ngram / "ngram.arpa")


def test_renamed_arpa_is_not_a_binary(tiny_ngram, tmp_path):
    shutil.copy(tiny_ngram / "ngram.arpa", tmp_path / "ngram.binary")
    assert not is_kenlm_binary(tmp_path / "ngram.binary")
    assert find_ngram(tmp_path) == tmp_path / "ngram.binary"
    with pytest.raises(DataError, match="not a KenLM binary"):
        read_kenlm_binary(tmp_path / "ngram.binary")


def test_read_binary_returns_the_file_bytes(tiny_ngram):
    assert read_kenlm_binary(tiny_ngram / "ngram.binary") == (tiny_ngram / "ngram.binary").read_bytes()


def test_missing_file_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="gone.binary"):
        is_kenlm_binary(tmp_path / "gone.binary")


def test_binary_loads_with_the_kenlm_module_and_scores(tiny_ngram):
    import kenlm  # the dev extra installs it: a missing module must fail, not skip

    model = kenlm.Model(str(tiny_ngram / "ngram.binary"))
    assert model.order == 3
    seen = model.score("the cat sat on the mat", bos=True, eos=True)
    shuffled = model.score("mat the on sat cat the", bos=True, eos=True)
    assert math.isfinite(seen) and seen < 0
    assert seen > shuffled
    # The ARPA file is the same model.
    assert kenlm.Model(str(tiny_ngram / "ngram.arpa")).score("the cat sat on the mat") == pytest.approx(
        seen, abs=1e-4
    )


def test_find_ngram_prefers_the_binary(tmp_path):
    (tmp_path / "ngram.arpa").write_text("\\data\\\n")
    assert find_ngram(tmp_path) == tmp_path / "ngram.arpa"
    (tmp_path / "ngram.binary").write_bytes(KENLM_MAGIC)
    assert find_ngram(tmp_path) == tmp_path / "ngram.binary"


def test_find_ngram_errors_name_the_directory(tmp_path):
    with pytest.raises(DataError, match="no ngram.binary or ngram.arpa"):
        find_ngram(tmp_path)
    with pytest.raises(DataError, match="missing_dir"):
        find_ngram(tmp_path / "missing_dir")


def test_script_fails_fast_on_bad_input(kenlm_env, tmp_path):
    missing = _generate(kenlm_env, 3, tmp_path / "none.txt", tmp_path / "a", tmp_path / "b")
    assert missing.returncode != 0 and "none.txt" in missing.stderr
    (tmp_path / "c.txt").write_text(TINY_CORPUS)
    bad_order = _generate(kenlm_env, "x", tmp_path / "c.txt", tmp_path / "a", tmp_path / "b")
    assert bad_order.returncode != 0 and "ORDER" in bad_order.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_failed_run_keeps_the_previous_outputs(kenlm_env, tiny_ngram, tmp_path):
    for name in ("ngram.arpa", "ngram.binary"):
        shutil.copy(tiny_ngram / name, tmp_path / name)
    before = (tmp_path / "ngram.binary").read_bytes()
    # Order 9 is above the tools' compiled maximum (6): lmplz fails both times.
    (tmp_path / "c.txt").write_text(TINY_CORPUS)
    result = _generate(kenlm_env, 9, tmp_path / "c.txt", tmp_path / "ngram.arpa", tmp_path / "ngram.binary")
    assert result.returncode != 0
    assert (tmp_path / "ngram.binary").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "ngram.arpa", "ngram.binary"]
