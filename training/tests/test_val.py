"""val.py: training checkpoints, hardware checkpoints, directories, defaults and CLI errors.

Everything is real and tiny: FLAC files, a SentencePiece model trained here,
mel statistics computed here, the demo config with a small model, checkpoints
written by the Checkpointer and hardware checkpoints by create_hardware_ckpt.
"""

import copy
import difflib
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml

from caiman_asr_train import val
from caiman_asr_train.core.errors import UserError
from caiman_asr_train.core.load_hw import read_checkpoint
from caiman_asr_train.data.generate_mel_stats import compute_mel_stats, save_mel_stats
from caiman_asr_train.data.manifest import manifest_entry, write_manifest
from caiman_asr_train.data.spm.spm_from_json import train_sentencepiece
from caiman_asr_train.data.tokenizer import Tokenizer
from caiman_asr_train.deploy.quantize import write_quantized_checkpoint
from caiman_asr_train.evaluate.evaluator import evaluate
from caiman_asr_train.export.checkpointer import Checkpointer
from caiman_asr_train.export.inference import export_inference
from caiman_asr_train.rnnt import config
from caiman_asr_train.rnnt.model import RNNT
from caiman_asr_train.utils.atomic import atomic_torch_save
from caiman_asr_train.utils.cli import run_cli

REPO_ROOT = Path(__file__).resolve().parents[2]
RATE = 16000
TRANSCRIPTS = ["The cat sat!", "a dog ran home", "red house", "the dog sat on the cat"]
REFERENCES = ["the cat sat", "a dog ran home", "red house", "the dog sat on the cat"]
WER_LINE = re.compile(r'^Word Error Rate: (\d+\.\d{3})% on "(.*)" \((.*)\)$')


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A dataset, a config for a tiny model, and its training and hardware checkpoints."""
    root = tmp_path_factory.mktemp("val")
    data = root / "data"
    (data / "audio").mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for i, transcript in enumerate(TRANSCRIPTS):
        length = int(rng.integers(4000, 9000))
        t = np.arange(length) / RATE
        wave = 0.3 * np.sin(2 * np.pi * (180 + 90 * i) * t) + 0.05 * rng.standard_normal(length)
        soundfile.write(data / f"audio/{i}.flac", wave.astype(np.float32), RATE, subtype="PCM_16")
        entries.append(manifest_entry(transcript, f"audio/{i}.flac", length, RATE))
    write_manifest(entries, data / "dev.json")
    spm_model = train_sentencepiece(REFERENCES * 5 + ["the red cat ran", "a house"], data / "tiny", 40)

    cfg = yaml.safe_load((REPO_ROOT / "training/configs/demo.yaml").read_text())
    cfg["tokenizer"]["sentpiece_model"] = str(spm_model)
    for section in ("input_val", "input_train"):
        cfg[section]["filterbank_features"]["stats_path"] = str(data / "stats")
    cfg["rnnt"].update(enc_n_hid=16, pred_n_hid=8, joint_n_hid=16)
    cfg.pop("ngram")
    config_path = root / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    cfg = config.load(config_path)
    features = config.input(cfg, "val")["filterbank_features"]
    save_mel_stats(data / "stats", *compute_mel_stats(entries, data, features, progress=False))

    tokenizer = Tokenizer(spm_model)
    torch.manual_seed(0)
    model = RNNT(tokenizer.num_labels + 1, **config.rnnt(cfg))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.3 * torch.randn_like(p))
    blank_ema = copy.deepcopy(ema)
    with torch.no_grad():
        out = blank_ema.joint_net[2]
        out.weight.zero_()
        out.bias.fill_(-10.0)
        out.bias[-1] = 10.0  # the blank is the last class

    ckpts = root / "ckpts"
    checkpointer = Checkpointer(ckpts)
    common = dict(
        optimizer=None,
        epoch=1,
        best_wer=1.0,
        tokenizer_kw={
            "sentpiece_model": str(spm_model),
            "labels": cfg["tokenizer"]["labels"],
            "sampling": 0.0,
        },
        logmel_norm_weight=1.0,
        config_path=config_path,
    )
    train_ckpt = checkpointer.save(model, ema, step=20, **common)
    blank_ckpt = checkpointer.save(ema, blank_ema, step=30, filepath=root / "blank_ema.pt", **common)
    # As train.py saves it: the checkpoint carries its config, so no --model_config is needed.
    described_ckpt = checkpointer.save(
        model, ema, step=20, filepath=root / "described.pt", config=cfg, **common
    )
    with torch.no_grad():
        ema.joint_enc.weight[0, 0] = float("inf")
    diverged_ckpt = checkpointer.save(
        model, ema, step=40, filepath=root / "diverged.pt", config=cfg, **common
    )
    return {
        "described_ckpt": described_ckpt,
        "diverged_ckpt": diverged_ckpt,
        "root": root,
        "data": data,
        "manifest": data / "dev.json",
        "config": config_path,
        "train_ckpt": train_ckpt,
        "blank_ckpt": blank_ckpt,
    }


@pytest.fixture(scope="module")
def hw_ckpt(setup) -> Path:
    from caiman_asr_train.export.hardware_ckpt import create_hardware_ckpt, save_hardware_ckpt

    with pytest.warns(UserWarning, match="software use only"):
        hw = create_hardware_ckpt(
            setup["train_ckpt"], setup["config"], skip_state_dict_check=True, skip_ngram=True
        )
    path = setup["root"] / "hw" / "RNN-T_step20_checkpoint.hw.pt"
    path.parent.mkdir()
    save_hardware_ckpt(hw, path)
    return path


def run_val(setup, ckpt, output_dir, capsys, *extra) -> tuple[int, list[str]]:
    argv = ["--ckpt", str(ckpt), "--val_manifests", str(setup["manifest"]), "--output_dir", str(output_dir)]
    # Two symbols per frame keep the random models' long hypotheses quick to decode.
    argv += [
        "--model_config",
        str(setup["config"]),
        "--device",
        "cpu",
        "--max_symbol_per_sample",
        "2",
        *extra,
    ]
    status = val.main(argv)
    return status, capsys.readouterr().out.strip().splitlines()


def read_predictions(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def test_training_checkpoint_is_validated_with_its_ema_weights(setup, tmp_path, capsys):
    status, out = run_val(setup, setup["blank_ckpt"], tmp_path, capsys)
    assert status == 0
    # The EMA weights only ever emit blank; the raw weights would emit words.
    assert out[-1] == f'Word Error Rate: 100.000% on "{setup["manifest"]}" (greedy)'
    predictions = read_predictions(tmp_path / "blank_ema.predictions.json")
    assert predictions == [
        {"hyp": "", "ref": ref, "fname": f"audio/{i}.flac"} for i, ref in enumerate(REFERENCES)
    ]


def test_hardware_checkpoint_gives_the_training_checkpoints_predictions(setup, hw_ckpt, tmp_path, capsys):
    status, train_out = run_val(setup, setup["train_ckpt"], tmp_path / "train", capsys)
    assert status == 0
    # Nothing but the file is needed: a --model_config that does not exist is not read.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        status, hw_out = run_val(setup, hw_ckpt, tmp_path / "hw", capsys, "--model_config", "missing.yaml")
    assert status == 0
    assert hw_out[-1] == train_out[-1]
    assert WER_LINE.match(hw_out[-1])
    train_predictions = read_predictions(tmp_path / "train/RNN-T_step20_checkpoint.predictions.json")
    hw_predictions = read_predictions(tmp_path / "hw/RNN-T_step20_checkpoint.hw.predictions.json")
    assert hw_predictions == train_predictions
    assert any(p["hyp"] for p in hw_predictions), (
        "a random model should emit words: the comparison must mean something"
    )
    assert [p["ref"] for p in hw_predictions] == REFERENCES


def test_directory_mode_prints_a_table_and_writes_predictions_per_file(setup, hw_ckpt, tmp_path, capsys):
    directory = tmp_path / "ckpts"
    directory.mkdir()
    (directory / "RNN-T_step20_checkpoint.pt").write_bytes(setup["train_ckpt"].read_bytes())
    (directory / "RNN-T_step20_checkpoint.hw.pt").write_bytes(hw_ckpt.read_bytes())
    (directory / "blank_ema.pt").write_bytes(setup["blank_ckpt"].read_bytes())
    (directory / "notes.txt").write_text("not a checkpoint")
    status, out = run_val(setup, directory, tmp_path / "out", capsys)
    assert status == 0
    rows = {line.split()[0]: line.split()[1:] for line in out[1:]}
    assert out[0].split()[:3] == ["file", "step", "WER"]
    assert set(rows) == {"blank_ema.pt", "RNN-T_step20_checkpoint.pt", "RNN-T_step20_checkpoint.hw.pt"}
    assert rows["blank_ema.pt"] == ["30", "100.000%"]
    assert rows["RNN-T_step20_checkpoint.pt"] == rows["RNN-T_step20_checkpoint.hw.pt"]
    assert rows["RNN-T_step20_checkpoint.pt"][0] == "20"
    for name in ("blank_ema", "RNN-T_step20_checkpoint", "RNN-T_step20_checkpoint.hw"):
        assert len(read_predictions(tmp_path / "out" / f"{name}.predictions.json")) == len(REFERENCES)


@pytest.fixture(scope="module")
def bundle(setup, hw_ckpt) -> Path:
    """The ONNX Runtime bundle exported from ``hw_ckpt``."""
    directory = setup["root"] / "bundles" / "onnxruntime"
    export_inference(hw_ckpt, "onnxruntime", directory)
    return directory


@pytest.fixture(scope="module")
def q_ckpt(setup, hw_ckpt) -> Path:
    """``hw_ckpt`` with int8 per-channel weights, as a ``*.q.pt``."""
    path = setup["root"] / "quantized" / "RNN-T_step20_checkpoint.q.pt"
    path.parent.mkdir()
    write_quantized_checkpoint(read_checkpoint(hw_ckpt, mmap=False), path, "int8_per_channel")
    return path


def test_an_onnx_runtime_bundle_is_validated_like_its_hardware_checkpoint(
    setup, hw_ckpt, bundle, tmp_path, capsys
):
    flags = ("--val_final_padding_secs", "0.24")
    status, hw_out = run_val(setup, hw_ckpt, tmp_path / "hw", capsys, *flags)
    assert status == 0
    status, bundle_out = run_val(setup, bundle, tmp_path / "bundle", capsys, *flags)
    assert status == 0
    assert WER_LINE.match(bundle_out[-1]).groups()[1:] == (str(setup["manifest"]), "greedy")
    hw_predictions = read_predictions(tmp_path / "hw/RNN-T_step20_checkpoint.hw.predictions.json")
    bundle_predictions = read_predictions(tmp_path / "bundle/onnxruntime.predictions.json")
    assert [p["ref"] for p in bundle_predictions] == REFERENCES
    assert [p["fname"] for p in bundle_predictions] == [p["fname"] for p in hw_predictions]
    # The same random model: only dither noise and float rounding move its near-tie symbols.
    for b, h in zip(bundle_predictions, hw_predictions):
        assert difflib.SequenceMatcher(None, b["hyp"], h["hyp"]).ratio() > 0.7, (b, h)


def test_a_bundle_refuses_beam_search_in_one_line(setup, bundle, tmp_path, capsys):
    assert "decode greedily" in cli_error(
        capsys, ["--ckpt", str(bundle), "--val_manifests", str(setup["manifest"]), "--decoder", "beam"]
    )


def test_a_quantized_checkpoint_is_validated_like_a_hardware_checkpoint(setup, q_ckpt, tmp_path, capsys):
    status, out = run_val(setup, q_ckpt, tmp_path, capsys, "--num_utterances", "2")
    assert status == 0
    assert WER_LINE.match(out[-1]).group(3) == "greedy"
    predictions = read_predictions(tmp_path / "RNN-T_step20_checkpoint.q.predictions.json")
    assert [p["ref"] for p in predictions] == REFERENCES[:2]


def test_directory_mode_lists_quantized_checkpoints_and_bundles(setup, q_ckpt, bundle, tmp_path, capsys):
    directory = tmp_path / "ckpts"
    directory.mkdir()
    (directory / q_ckpt.name).write_bytes(q_ckpt.read_bytes())
    shutil.copytree(bundle, directory / "onnxruntime")
    (directory / "not_a_bundle").mkdir()
    status, out = run_val(setup, directory, tmp_path / "out", capsys, "--num_utterances", "2")
    assert status == 0
    rows = {line.split()[0]: line.split()[1:] for line in out[1:]}
    assert set(rows) == {"RNN-T_step20_checkpoint.q.pt", "onnxruntime"}
    assert rows["RNN-T_step20_checkpoint.q.pt"][0] == "20"
    assert len(read_predictions(tmp_path / "out" / "onnxruntime.predictions.json")) == 2


def test_beam_search_on_a_hardware_checkpoint_prints_the_beam_line_and_writes_predictions(
    setup, hw_ckpt, tmp_path, capsys
):
    status, out = run_val(
        setup, hw_ckpt, tmp_path, capsys, "--num_utterances", "2", "--decoder", "beam", "--beam_width", "2"
    )
    assert status == 0
    # The hardware checkpoint was exported with --skip_ngram: beam search says it fused none.
    assert WER_LINE.match(out[-1]).group(3) == "beam search, width 2, no n-gram"
    predictions = read_predictions(tmp_path / "RNN-T_step20_checkpoint.hw.predictions.json")
    assert [p["ref"] for p in predictions] == REFERENCES[:2]
    assert any(p["hyp"] for p in predictions)


def test_directory_mode_reports_unreadable_files_and_exits_2(setup, tmp_path, capsys):
    directory = tmp_path / "ckpts"
    directory.mkdir()
    (directory / "RNN-T_step9_checkpoint.pt").write_bytes(setup["blank_ckpt"].read_bytes()[:500])
    (directory / "RNN-T_step10_checkpoint.pt").write_bytes(setup["blank_ckpt"].read_bytes())
    status = val.main(
        [
            "--ckpt",
            str(directory),
            "--val_manifests",
            str(setup["manifest"]),
            "--output_dir",
            str(tmp_path / "out"),
            "--model_config",
            str(setup["config"]),
        ]
    )
    captured = capsys.readouterr()
    assert status == 2
    assert "RNN-T_step9_checkpoint.pt is truncated or corrupt" in captured.err
    lines = captured.out.strip().splitlines()
    # natural order: step9 before step10
    assert [line.split()[:3] for line in lines[1:]] == [
        ["RNN-T_step9_checkpoint.pt", "-", "error"],
        ["RNN-T_step10_checkpoint.pt", "30", "100.000%"],
    ]


def test_decoding_flags_reach_the_evaluator(setup, hw_ckpt, tmp_path, capsys, monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(val, "evaluate", spy)
    flags = ["--num_utterances", "2", "--val_batch_size", "1", "--max_symbol_per_sample", "1"]
    status, _ = run_val(setup, hw_ckpt, tmp_path, capsys, *flags, "--val_final_padding_secs", "0.5")
    assert status == 0
    predictions = read_predictions(tmp_path / "RNN-T_step20_checkpoint.hw.predictions.json")
    assert [p["ref"] for p in predictions] == REFERENCES[:2]
    (kwargs,) = calls
    assert kwargs["max_symbols_per_step"] == 1 and kwargs["final_padding_secs"] == 0.5


def test_defaults_are_relative_to_the_repository_root(setup, hw_ckpt, tmp_path, monkeypatch, capsys):
    fake_root = tmp_path / "repo"
    demo = fake_root / "datasets/demo"
    demo.parent.mkdir(parents=True)
    demo.symlink_to(setup["data"], target_is_directory=True)
    monkeypatch.setattr(val, "REPO_ROOT", fake_root)
    monkeypatch.chdir(tmp_path)
    assert val.main(["--ckpt", str(hw_ckpt), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith('% on "datasets/demo/dev.json" (greedy)')
    assert (fake_root / "results/val/RNN-T_step20_checkpoint.hw.predictions.json").is_file()


def cli_error(capsys, argv: list[str]) -> str:
    """Run val.py's command line in-process; return its one-line stderr (exit status must be 2)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: val.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_user_mistakes_are_one_line_errors(setup, tmp_path, capsys):
    manifest = ["--val_manifests", str(setup["manifest"])]
    assert "no such checkpoint" in cli_error(capsys, ["--ckpt", str(tmp_path / "missing.pt"), *manifest])
    assert "manifest not found" in cli_error(
        capsys, ["--ckpt", str(setup["train_ckpt"]), "--val_manifests", str(tmp_path / "nope.json")]
    )
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert "hold no utterances" in cli_error(
        capsys, ["--ckpt", str(setup["train_ckpt"]), "--val_manifests", str(empty)]
    )
    assert "--val_batch_size must be >= 1" in cli_error(
        capsys, ["--ckpt", str(setup["train_ckpt"]), *manifest, "--val_batch_size", "0"]
    )

    # A file claiming to be a hardware checkpoint but missing keys.
    bad_hw = tmp_path / "bad.hw.pt"
    atomic_torch_save({"rnnt_config": {}, "version": "1.15.0"}, bad_hw)
    assert "key 'state_dict' is missing" in cli_error(capsys, ["--ckpt", str(bad_hw), *manifest])

    # Neither kind of checkpoint.
    other = tmp_path / "other.pt"
    atomic_torch_save({"weights": torch.zeros(2)}, other)
    assert "no 'ema_state_dict'" in cli_error(
        capsys, ["--ckpt", str(other), *manifest, "--model_config", str(setup["config"])]
    )

    # A training checkpoint with a config for another model size.
    cfg = yaml.safe_load(setup["config"].read_text())
    cfg["rnnt"]["enc_n_hid"] = 32
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(cfg))
    err = cli_error(capsys, ["--ckpt", str(setup["train_ckpt"]), *manifest, "--model_config", str(wrong)])
    assert (
        "does not fit the model" in err
        and "encoder.pre_rnn.lstm.weight_ih_l0" in err
        and "--model_config" in err
    )


def test_command_line_script_and_val_sh(setup, hw_ckpt, tmp_path):
    script = REPO_ROOT / "training/caiman_asr_train/val.py"
    missing = subprocess.run(
        [sys.executable, str(script), "--ckpt", str(tmp_path / "missing.hw.pt")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing.hw.pt'}: no such checkpoint file or directory; check --ckpt"
    ]
    ok = subprocess.run(
        [
            str(REPO_ROOT / "val.sh"),
            "--ckpt",
            str(hw_ckpt),
            "--val_manifests",
            str(setup["manifest"]),
            "--output_dir",
            str(tmp_path),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "CAIMAN_PYTHON": sys.executable, "HOME": str(tmp_path)},
    )
    assert ok.returncode == 0, ok.stderr
    assert WER_LINE.match(ok.stdout.strip().splitlines()[-1])
    assert (tmp_path / "RNN-T_step20_checkpoint.hw.predictions.json").is_file()


def test_a_checkpoint_that_records_its_config_needs_no_model_config(setup, tmp_path, capsys):
    _, with_flag = run_val(setup, setup["train_ckpt"], tmp_path / "a", capsys)
    # The YAML on disk no longer matters: the checkpoint's recorded config is used.
    broken = tmp_path / "moved.yaml"
    argv = ["--ckpt", str(setup["described_ckpt"]), "--val_manifests", str(setup["manifest"])]
    argv += ["--output_dir", str(tmp_path / "b"), "--device", "cpu", "--max_symbol_per_sample", "2"]
    assert not broken.exists()
    assert val.main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == with_flag[-1]
    # --model_config still overrides: a config of another size no longer fits the weights.
    cfg = yaml.safe_load(setup["config"].read_text())
    cfg["rnnt"]["enc_n_hid"] = 32
    broken.write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match="does not fit the model"):
        val.main(argv + ["--model_config", str(broken)])


def test_non_finite_weights_are_reported_in_one_warning(setup, tmp_path, capsys):
    argv = [
        "--ckpt",
        str(setup["diverged_ckpt"]),
        "--val_manifests",
        str(setup["manifest"]),
        "--num_utterances",
        "1",
    ]
    argv += ["--output_dir", str(tmp_path), "--device", "cpu", "--max_symbol_per_sample", "2"]
    with pytest.warns(
        UserWarning, match=r"diverged.pt: weight 'joint_enc.weight' holds NaN or Inf"
    ) as caught:
        val.main(argv)
    assert all("\n" not in str(w.message) for w in caught)
