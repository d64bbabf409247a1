"""The README's checkpoint-averaging examples run as written on a run's output directory.

A short run on the tiny corpus of test_train.py stands in for the demo's
``results/``: it saves step checkpoints 1, 2 and 3 where the demo's last three
are 1300, 1950 and 2600, validating at each. The commands are taken from the README's
code block and changed only where the stand-in differs: ``results`` is the
run's directory, the README's step numbers map in order onto the run's, and
``./val.sh`` is told where the tiny dev set is.
"""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from caiman_asr_train import train
from caiman_asr_train.core.load_hw import load_hw_checkpoint, read_checkpoint

_spec = importlib.util.spec_from_file_location("_train_tests", Path(__file__).with_name("test_train.py"))
_train_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train_tests)
corpus = _train_tests.corpus
run_args = _train_tests.run_args

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:the EMA weights match no FPGA")


def readme_commands(section: str) -> list[str]:
    """The commands of the first bash block under ``## <section>``, continuation lines joined."""
    text = (REPO_ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def _build_ngram(corpus) -> None:
    """The config's n-gram (the demo has one), from the training transcripts, with the real KenLM tools."""
    ngram = corpus.root / "ngram"
    if (ngram / "ngram.binary").exists():
        return
    text = corpus.root / "ngram_text.txt"
    text.write_text("".join(e["transcript"] + "\n" for e in corpus.manifests["train"]))
    command = [
        str(REPO_ROOT / "scripts/generate_ngram.sh"),
        "2",
        str(text),
        str(ngram / "ngram.arpa"),
        str(ngram / "ngram.binary"),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)


def test_the_readme_averaging_examples_run_on_a_short_runs_output(corpus, tmp_path):
    _build_ngram(corpus)
    results = tmp_path / "results"
    args = run_args(corpus, results, "--training_steps", "3", "--save_frequency", "1", "--val_frequency", "1")
    assert train.main(args) == 0
    saved = sorted(int(m.group(1)) for p in results.glob("*.pt") if (m := re.search(r"_step(\d+)_", p.name)))
    assert saved == [1, 2, 3]

    commands = readme_commands("Checkpoint averaging")
    assert len(commands) == 6
    readme_steps = sorted({int(s) for c in commands for s in re.findall(r"(?:--steps|_step)\D*?(\d{3,})", c)})
    step_map = dict(zip(map(str, readme_steps), map(str, saved)))
    assert len(step_map) == 3

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CAIMAN_PYTHON": sys.executable}
    for command in commands:
        words = shlex.split(command)
        words = [re.sub(r"^results(?=/|$)", str(results), w) for w in words]
        words = [re.sub(r"(?<=_step)(\d+)", lambda m: step_map[m.group(1)], w) for w in words]
        words = [step_map.get(w, w) for w in words]
        if words[0] == "./val.sh":
            words = [str(REPO_ROOT / "val.sh"), *words[1:]]
            words += ["--val_manifests", str(corpus.root / "dev.json"), "--dataset_dir", str(corpus.root)]
            words += ["--output_dir", str(tmp_path / "val")]
        else:
            words = [sys.executable, *words[1:]] if words[0] == "python" else words
        result = subprocess.run(words, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        if words[0].endswith("val.sh"):
            assert "Word Error Rate:" in result.stdout

    for name in ("avg.pt", "avg2.pt"):
        averaged = read_checkpoint(results / name)
        assert "averaging" in averaged and averaged["step"] in saved
    for name in ("avg.hw.pt", "avg3.hw.pt"):
        assert load_hw_checkpoint(results / name).step in saved
