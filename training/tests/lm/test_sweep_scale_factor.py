"""sweep_scale_factor: one encoding, a WER per scale factor, the best written into a copy of the hardware checkpoint.

Real tiny artefacts: FLAC files, the SentencePiece model, KenLM n-gram and
hardware checkpoint of tests/export/conftest.py.
"""

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from torch.utils.data import DataLoader

from caiman_asr_train.core.errors import UserError
from caiman_asr_train.core.load_hw import load_hw_checkpoint
from caiman_asr_train.data.dataset import AudioDataset, collate
from caiman_asr_train.data.manifest import manifest_entry, write_manifest
from caiman_asr_train.evaluate.decoding import add_decoder_args, build_decoder, encoder_frame_seconds
from caiman_asr_train.evaluate.evaluator import evaluate
from caiman_asr_train.export.hardware_ckpt import create_hardware_ckpt, save_hardware_ckpt
from caiman_asr_train.lm import sweep_scale_factor
from caiman_asr_train.train_utils.checkpoints import load_for_validation

pytestmark = pytest.mark.filterwarnings("ignore:the EMA weights match no FPGA")

REPO = Path(__file__).resolve().parents[3]
RATE = 16000
TRANSCRIPTS = ["the cat sat", "a dog ran after the cat", "the clocks were striking"]


@pytest.fixture
def dev_set(export_env) -> Path:
    """Three FLAC utterances and their manifest dev.json, beside a hardware checkpoint model.hw.pt."""
    root = export_env.dir
    rng = np.random.default_rng(0)
    entries = []
    for i, transcript in enumerate(TRANSCRIPTS):
        samples = 8000 + 2000 * i
        wave = 0.3 * np.sin(
            2 * np.pi * (220 + 90 * i) * np.arange(samples) / RATE
        ) + 0.05 * rng.standard_normal(samples)
        soundfile.write(root / f"{i}.flac", wave.astype(np.float32), RATE, subtype="PCM_16")
        entries.append(manifest_entry(transcript, f"{i}.flac", samples, RATE))
    write_manifest(entries, root / "dev.json")
    hw = create_hardware_ckpt(export_env.ckpt_path, export_env.config_path, skip_state_dict_check=True)
    save_hardware_ckpt(hw, root / "model.hw.pt")
    return root


def run(dev_set: Path, capsys, *extra: str) -> list[str]:
    argv = ["--ckpt", str(dev_set / "model.hw.pt"), "--val_manifests", str(dev_set / "dev.json"), *extra]
    assert sweep_scale_factor.main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_prints_a_wer_per_scale_factor_and_writes_the_best_into_a_copy(dev_set, capsys):
    source = dev_set / "model.hw.pt"
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    out = run(
        dev_set, capsys, "--scale_factors", "0", "0.5", "2", "--output_hw", str(dev_set / "tuned.hw.pt")
    )
    assert out[0].split() == ["scale_factor", "WER"]
    rows = [line.split() for line in out[1:4]]
    assert [float(scale) for scale, _ in rows] == [0.0, 0.5, 2.0]
    wers = {float(scale): float(wer.rstrip("%")) for scale, wer in rows}
    best = min(wers, key=lambda s: (wers[s], s))
    assert out[4] == f"best scale_factor: {best:g} (WER {wers[best]:.3f}%)"
    tuned = load_hw_checkpoint(dev_set / "tuned.hw.pt")
    original = load_hw_checkpoint(source)
    assert tuned.ngram == {"binary": original.ngram["binary"], "scale_factor": best}
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    assert not list(dev_set.glob(".tuned.hw.pt.*"))


def test_encoding_once_gives_what_decoding_each_scale_factor_from_audio_gives(dev_set):
    device = torch.device("cpu")
    target = load_for_validation(dev_set / "model.hw.pt", Path("unused.yaml"), device)
    ckpt = load_hw_checkpoint(dev_set / "model.hw.pt")
    entries = json.loads((dev_set / "dev.json").read_text())
    args = add_decoder_args(argparse.ArgumentParser()).parse_args(["--decoder", "beam"])
    decoder = build_decoder(
        args,
        target.tokenizer,
        frame_seconds=encoder_frame_seconds(target.pipeline, target.model, RATE),
        source="model.hw.pt",
        embedded_ngram=ckpt.ngram,
    )
    encoded = sweep_scale_factor.encode_dev_set(
        target, entries, dev_set, batch_size=2, final_padding_secs=0.24, seed=1, device=device
    )
    for scale in (0.0, 1.0):
        once = sweep_scale_factor.transcribe(target, decoder.with_ngram_scale(scale), encoded)
        loader = DataLoader(
            AudioDataset(entries, dev_set, RATE, **target.text), batch_size=2, collate_fn=collate
        )
        direct = evaluate(
            target.model,
            loader,
            target.pipeline,
            target.tokenizer,
            sample_rate=RATE,
            progress=False,
            generator=torch.Generator().manual_seed(1),
            decoder=decoder.with_ngram_scale(scale),
        )
        assert once == [p["hyp"] for p in direct.predictions]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--skip_ngram"], "nothing to sweep"),
        (["--scale_factors", "-1"], "--scale_factors must be >= 0"),
        (["--output_hw", "{dir}/model.hw.pt"], "must differ"),
        (
            ["--ckpt", "{ckpt}", "--model_config", "{config}", "--output_hw", "{dir}/x.hw.pt"],
            "needs a hardware checkpoint",
        ),
    ],
)
def test_user_mistakes_are_errors_naming_the_fix(dev_set, export_env, extra, message):
    names = {"dir": dev_set, "ckpt": export_env.ckpt_path, "config": export_env.config_path}
    argv = ["--ckpt", str(dev_set / "model.hw.pt"), "--val_manifests", str(dev_set / "dev.json")]
    with pytest.raises(UserError, match=message):
        sweep_scale_factor.main(argv + [part.format(**names) for part in extra])


def test_command_line_errors_are_one_line_with_exit_status_2(dev_set):
    script = REPO / "training" / "caiman_asr_train" / "lm" / "sweep_scale_factor.py"
    argv = [
        "--ckpt",
        str(dev_set / "model.hw.pt"),
        "--val_manifests",
        str(dev_set / "dev.json"),
        "--skip_ngram",
    ]
    result = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --skip_ngram leaves nothing to sweep; drop it"]


def test_a_training_checkpoint_sweeps_its_configs_ngram(dev_set, export_env, capsys):
    argv = ["--ckpt", str(export_env.ckpt_path), "--model_config", str(export_env.config_path)]
    assert (
        sweep_scale_factor.main(
            [*argv, "--val_manifests", str(dev_set / "dev.json"), "--scale_factors", "0", "0.1"]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:3]] == ["0", "0.1"] and out[3].startswith("best scale_factor: ")
