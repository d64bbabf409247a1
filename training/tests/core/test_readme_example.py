"""core/README.md's example runs as written: a hardware checkpoint and a waveform, no training code."""

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile

from caiman_asr_train.export.hardware_ckpt import create_hardware_ckpt, save_hardware_ckpt

README = Path(__file__).resolve().parents[2] / "caiman_asr_train" / "core" / "README.md"

pytestmark = pytest.mark.filterwarnings("ignore:the EMA weights match no FPGA")


def test_readme_example_decodes_a_file_with_the_core_front_end(export_env, tmp_path, capsys, monkeypatch):
    hw = create_hardware_ckpt(export_env.ckpt_path, export_env.config_path, skip_state_dict_check=True)
    save_hardware_ckpt(hw, tmp_path / "results" / "RNN-T_best_checkpoint.hw.pt")
    noise = np.random.default_rng(0).normal(0, 0.1, 8000).astype(np.float32)
    soundfile.write(tmp_path / "utterance.flac", noise, 16000)
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "caiman_asr_train.data" not in example
    monkeypatch.chdir(tmp_path)
    exec(compile(example, str(README), "exec"), {})
    assert capsys.readouterr().out.endswith("\n")
