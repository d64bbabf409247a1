"""train.py end to end on a tiny real corpus: exact resume, preemption, torchrun, finalize export.

The corpus is a dozen short FLAC files of tone sequences (one pitch per
letter) written with soundfile, a SentencePiece model trained on their
transcripts and mel statistics computed from the audio, with a tiny model so
every run takes seconds.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
import torch

from caiman_asr_train import train, val
from caiman_asr_train.core.decoder import greedy_decode
from caiman_asr_train.core.errors import ConfigError, UserError
from caiman_asr_train.core.load_hw import load_hw_checkpoint, read_checkpoint
from caiman_asr_train.data.dataset import collate
from caiman_asr_train.data.feature_cache import build_feature_cache
from caiman_asr_train.data.features import FeaturePipeline, pad_audio
from caiman_asr_train.data.generate_mel_stats import compute_mel_stats, save_mel_stats
from caiman_asr_train.data.manifest import manifest_entry, write_manifest
from caiman_asr_train.data.spm.spm_from_json import train_sentencepiece
from caiman_asr_train.export.hardware_ckpt import inference_only_config
from caiman_asr_train.rnnt import config
from caiman_asr_train.train_utils.batches import TrainBatches
from caiman_asr_train.train_utils.distributed import DistInfo

pytestmark = pytest.mark.filterwarnings("ignore:the EMA weights match no FPGA")

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO_ROOT / "training/caiman_asr_train/train.py"
SAMPLE_RATE = 16000
N_FILT = 16
WORDS = ["cab", "bad", "dab", "ace", "bead", "deed", "fade", "face", "cafe", "bee", "add", "dad"]


def _tones(text: str, rng: np.random.Generator) -> np.ndarray:
    """One 60 ms tone per letter (pitch by letter), 40 ms pauses between words, a little noise."""
    pieces = []
    t = np.arange(int(0.06 * SAMPLE_RATE)) / SAMPLE_RATE
    for word in text.split():
        for letter in word:
            pieces.append(0.3 * np.sin(2 * np.pi * (300 + 150 * (ord(letter) - ord("a"))) * t))
        pieces.append(np.zeros(int(0.04 * SAMPLE_RATE)))
    audio = np.concatenate(pieces)
    return (audio + 0.01 * rng.standard_normal(audio.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> SimpleNamespace:
    """datasets/tiny with train.json (12 utterances), dev.json (4), spm/, stats/ and config.yaml."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    manifests = {}
    for split, count in (("train", 12), ("dev", 4)):
        entries = []
        for i in range(count):
            text = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 4))))
            audio = _tones(text, rng)
            fname = f"audio/{split}/{i:03d}.flac"
            (root / fname).parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(root / fname, audio, SAMPLE_RATE)
            entries.append(manifest_entry(text, fname, len(audio)))
        write_manifest(entries, root / f"{split}.json")
        manifests[split] = entries
    (root / "spm").mkdir()
    train_sentencepiece([e["transcript"] for e in manifests["train"]] * 4, root / "spm/tiny", 12)
    features = dict(
        normalize="per_feature",
        sample_rate=SAMPLE_RATE,
        window_size=0.02,
        window_stride=0.01,
        window="hann",
        n_fft=512,
        n_filt=N_FILT,
        dither=1e-5,
    )
    save_mel_stats(root / "stats", *compute_mel_stats(manifests["train"], root, features, progress=False))
    config_path = root / "config.yaml"
    config_path.write_text(
        textwrap.dedent(f"""\
            tokenizer:
              sentpiece_model: spm/tiny.model
              labels: [" ", "a", "b", "c", "d", "e", "f"]
              sampling: 0.1
            input_val:
              audio_dataset: &val_dataset
                sample_rate: {SAMPLE_RATE}
                trim_silence: false
                normalize_transcripts: lowercase
                standardize_wer: true
                replacements: null
                remove_tags: true
                error_rate: word
              filterbank_features: &val_features
                normalize: per_feature
                sample_rate: {SAMPLE_RATE}
                window_size: 0.02
                window_stride: 0.01
                window: hann
                n_fft: 512
                n_filt: {N_FILT}
                dither: 0.00001
                stats_path: stats
              frame_splicing: &val_splicing
                frame_stacking: 3
                frame_subsampling: 3
            input_train:
              audio_dataset:
                <<: *val_dataset
                max_duration: 10.0
                max_transcript_len: 200
                min_duration: 0.05
                standardize_text: false
                speed_perturbation: {{min_rate: 0.9, max_rate: 1.1, p: 0.5}}
              filterbank_features:
                <<: *val_features
              frame_splicing:
                <<: *val_splicing
              spec_augment: {{freq_masks: 1, min_freq: 0, max_freq: 3, time_masks: 1, min_time: 0, max_time: 0.1}}
            rnnt:
              in_feats: {3 * N_FILT}
              enc_n_hid: 24
              enc_pre_rnn_layers: 1
              enc_post_rnn_layers: 1
              enc_stack_time_factor: 2
              enc_dropout: 0.1
              pred_n_hid: 16
              pred_rnn_layers: 1
              pred_dropout: 0.1
              joint_n_hid: 24
              joint_dropout: 0.1
            grad_noise_scheduler: {{noise_level: 0.01, decay_const: 0.55, start_step: 2}}
            ngram:
              ngram_path: ngram
              scale_factor: 0.05
            """)
    )
    return SimpleNamespace(root=root, config=config_path, manifests=manifests)


def run_args(corpus: SimpleNamespace, output_dir: Path, *extra: str) -> list[str]:
    """train.py arguments for a few quick steps on the tiny corpus."""
    return [
        "--model_config",
        str(corpus.config),
        "--dataset_dir",
        str(corpus.root),
        "--output_dir",
        str(output_dir),
        "--global_batch_size",
        "4",
        "--grad_accumulation_batches",
        "2",
        "--lr",
        "5e-3",
        "--min_lr",
        "1e-4",
        "--warmup_steps",
        "2",
        "--hold_steps",
        "1",
        "--half_life_steps",
        "2",
        "--ema",
        "0.9",
        "--val_frequency",
        "0",
        "--save_frequency",
        "2",
        "--log_frequency",
        "1",
        "--num_workers",
        "0",
        "--cpu_threads",
        "1",
        "--num_buckets",
        "2",
        "--skip_ngram",
        "--skip_state_dict_check",
        *extra,
    ]


def _assert_same_tensors(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("optimizer", ["lamb", "adamw"])
def test_resumed_run_is_bitwise_identical_to_straight_run(corpus, tmp_path, optimizer):
    straight, split = tmp_path / "straight", tmp_path / "split"
    opt = ("--optimizer", optimizer)
    assert train.main(run_args(corpus, straight, "--training_steps", "6", *opt)) == 0
    assert train.main(run_args(corpus, split, "--training_steps", "3", *opt)) == 0
    # workers load data in other processes on resume: the batches must not change
    assert (
        train.main(run_args(corpus, split, "--training_steps", "6", "--resume", "--num_workers", "2", *opt))
        == 0
    )

    a = read_checkpoint(straight / "RNN-T_last_checkpoint.pt", mmap=False)
    b = read_checkpoint(split / "RNN-T_last_checkpoint.pt", mmap=False)
    assert a["step"] == b["step"] == 6
    for key in ("state_dict", "ema_state_dict", "optimizer", "data_state"):
        _assert_same_tensors(a[key], b[key], key)
    # training moved the weights and the EMA is a distinct average of them
    first = read_checkpoint(split / "RNN-T_step2_checkpoint.pt", mmap=False)
    assert not torch.equal(a["state_dict"]["joint_net.2.weight"], first["state_dict"]["joint_net.2.weight"])
    assert not torch.equal(a["state_dict"]["joint_net.2.weight"], a["ema_state_dict"]["joint_net.2.weight"])


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _start(corpus: SimpleNamespace, output_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, str(TRAIN_SCRIPT), *run_args(corpus, output_dir, *extra)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _wait_for_line(process: subprocess.Popen, pattern: str, timeout: float = 120) -> list[str]:
    """Read stdout until a line matches ``pattern``; return the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    process.kill()
    raise AssertionError(f"no line matching {pattern!r}; got:\n{''.join(lines)}\n{process.stderr.read()}")


def test_sigterm_saves_last_checkpoint_and_exports_both_hardware_checkpoints(corpus, tmp_path):
    out = tmp_path / "run"
    process = _start(corpus, out, "--training_steps", "100000", "--save_frequency", "0")
    _wait_for_line(process, r"^step 3/")
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM received" in stderr
    assert "SIGTERM received" in (out / "train.log").read_text()

    last = read_checkpoint(out / "RNN-T_last_checkpoint.pt")
    assert 3 <= last["step"] < 100000
    assert last["data_state"]["consumed"] == 2 * last["step"]
    best = read_checkpoint(out / "RNN-T_best_checkpoint.pt")
    for name, ckpt in (("best", best), ("last", last)):
        hw = load_hw_checkpoint(out / f"RNN-T_{name}_checkpoint.hw.pt")
        assert hw.step == ckpt["step"]
        for key, value in ckpt["ema_state_dict"].items():
            assert torch.equal(hw.model.state_dict()[key], value), key
        assert f"RNN-T_{name}_checkpoint.hw.pt" in stdout


def test_two_process_gloo_run_has_one_writer(corpus, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        str(TRAIN_SCRIPT),
        *run_args(corpus, out, "--training_steps", "3", "--num_gpus", "2", "--device", "cpu"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "launching 2 processes" in result.stdout
    assert "2 process(es), 1 utterances per micro-batch" in result.stdout
    # rank 0 alone prints, logs and exports: every message appears once
    assert result.stdout.count("hardware checkpoint written") == 2
    assert result.stdout.count("saved ") == 1
    log = (out / "train.log").read_text()
    assert len(re.findall(r"step 3/3 ", log)) == 1
    # validation is sharded over both ranks and summed: all dev words are scored
    dev_words = sum(len(e["transcript"].split()) for e in corpus.manifests["dev"])
    assert f"of {dev_words} words" in log
    assert sorted(p.name for p in out.glob("*.pt")) == [
        "RNN-T_best_checkpoint.hw.pt",
        "RNN-T_best_checkpoint.pt",
        "RNN-T_last_checkpoint.hw.pt",
        "RNN-T_last_checkpoint.pt",
        "RNN-T_step2_checkpoint.pt",
    ]
    assert not list(out.glob("*.tmp"))
    assert read_checkpoint(out / "RNN-T_last_checkpoint.pt")["data_state"]["global_batch"] == 2


def test_failed_export_under_two_processes_exits_non_zero_without_hanging(corpus, tmp_path):
    out = tmp_path / "ddp"
    args = run_args(corpus, out, "--training_steps", "2", "--num_gpus", "2", "--device", "cpu")
    args.remove("--skip_state_dict_check")
    result = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), *args], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert result.returncode != 0
    assert result.stderr.count("the training checkpoint is intact") == 2
    assert read_checkpoint(out / "RNN-T_last_checkpoint.pt")["step"] == 2
    assert not list(out.glob("*.hw.pt"))


def _trainer(corpus: SimpleNamespace, output_dir: Path, *extra: str) -> "train.Trainer":
    argv = run_args(corpus, output_dir, *extra)
    args = train.parse_args(argv)
    return train.Trainer(args, argv, DistInfo())


def test_finalized_hardware_checkpoint_decodes_like_the_in_memory_ema_model(corpus, tmp_path):
    trainer = _trainer(corpus, tmp_path / "run", "--training_steps", "4")
    assert trainer.run() == 0
    hw = load_hw_checkpoint(tmp_path / "run/RNN-T_last_checkpoint.hw.pt")
    batch = collate([trainer.validator.dataset[i] for i in range(len(trainer.validator.dataset))])
    audio, lens = pad_audio(batch.audio, batch.audio_lens, 0.24, SAMPLE_RATE)
    data = hw.data_config
    hw_pipeline = FeaturePipeline(
        data["filterbank_features"], data["frame_splicing"], data["melmeans"], data["melvars"]
    ).eval()
    x, x_lens = trainer.validator.pipeline(audio, lens, generator=torch.Generator().manual_seed(5))
    hw_x, hw_lens = hw_pipeline(audio, lens, generator=torch.Generator().manual_seed(5))
    assert torch.equal(x, hw_x) and torch.equal(x_lens, hw_lens)
    expected = greedy_decode(trainer.ema_model, x, x_lens)
    assert any(expected), "an untrained model should still emit symbols here"
    assert greedy_decode(hw.model, hw_x, hw_lens) == expected


def test_failed_export_keeps_training_checkpoints_and_prints_the_command(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [a for a in run_args(corpus, out, "--training_steps", "2") if a != "--skip_state_dict_check"]
    assert train.main(argv) == 1
    stderr = capsys.readouterr().err
    assert "hardware export of" in stderr and "the training checkpoint is intact" in stderr
    assert not list(out.glob("*.hw.pt"))
    for name in ("best", "last", "step2"):
        assert read_checkpoint(out / f"RNN-T_{name}_checkpoint.pt")["step"] in (1, 2)
    commands = [line.strip() for line in stderr.splitlines() if "hardware_ckpt.py" in line]
    assert len(commands) == 2
    # the printed command, with the cause fixed, makes the missing file
    command = shlex.split(commands[1]) + ["--skip_state_dict_check"]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert load_hw_checkpoint(out / "RNN-T_last_checkpoint.hw.pt").step == 2


def test_finalize_writes_the_bundles_of_export_servers_after_the_hardware_export(corpus, tmp_path):
    out = tmp_path / "run"
    assert (
        train.main(
            run_args(corpus, out, "--training_steps", "2", "--export_servers", "onnxruntime,sherpa-onnx")
        )
        == 0
    )
    for server in ("onnxruntime", "sherpa-onnx"):
        manifest = json.loads((out / "inference" / out.name / "best" / server / "manifest.json").read_text())
        assert manifest["source"]["url"] == str(out / "RNN-T_best_checkpoint.hw.pt")


def test_bad_export_flags_stop_the_run_before_training(corpus, tmp_path):
    with pytest.raises(UserError, match="unknown server"):
        train.main(run_args(corpus, tmp_path / "run", "--export_servers", "tensorrt"))
    assert not list((tmp_path / "run").glob("*.pt"))


def test_beam_decoder_flags_make_validation_use_beam_search(corpus, tmp_path):
    out = tmp_path / "run"
    beam = ("--decoder", "beam", "--beam_width", "2", "--val_frequency", "1")
    assert train.main(run_args(corpus, out, "--training_steps", "2", *beam)) == 0
    lines = [line for line in (out / "train.log").read_text().splitlines() if "dev WER" in line]
    # Step 1, step 2 and the end: every validation names the decoder (the run skips the config's n-gram).
    assert lines and all("(EMA model, beam search, width 2, no n-gram)" in line for line in lines)


def test_bad_decoder_flags_stop_the_run_before_training(corpus, tmp_path):
    with pytest.raises(UserError, match="--beam_width must be >= 1"):
        train.main(run_args(corpus, tmp_path / "run", "--decoder", "beam", "--beam_width", "0"))
    assert not (tmp_path / "run").exists()


def test_refuses_an_output_dir_with_checkpoints_unless_resuming(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(UserError, match="--resume"):
        train.main(run_args(corpus, out, "--resume"))
    (out / "RNN-T_step2_checkpoint.pt").write_bytes(b"")
    with pytest.raises(UserError, match="already holds checkpoints.*--resume"):
        train.main(run_args(corpus, out))


def test_fine_tune_loads_weights_and_ema_with_a_fresh_schedule(corpus, tmp_path):
    assert train.main(run_args(corpus, tmp_path / "first", "--training_steps", "2")) == 0
    source = read_checkpoint(tmp_path / "first/RNN-T_last_checkpoint.pt")
    trainer = _trainer(
        corpus, tmp_path / "second", "--fine_tune", "--ckpt", str(tmp_path / "first/RNN-T_last_checkpoint.pt")
    )
    assert trainer.step == 0 and trainer.sampler.consumed == 0 and not trainer.optimizer.state
    _assert_same_tensors(dict(trainer.model.state_dict()), dict(source["state_dict"]), "state_dict")
    _assert_same_tensors(
        dict(trainer.ema_model.state_dict()), dict(source["ema_state_dict"]), "ema_state_dict"
    )
    trainer.log.close()


def test_the_run_records_its_config_and_exports_it_even_when_the_yaml_is_edited_mid_run(
    corpus, tmp_path, monkeypatch, capsys
):
    live = corpus.root / "live.yaml"
    live.write_text(corpus.config.read_text())
    original = config.load(live)
    validate = train.Trainer.validate

    def validate_then_edit_the_yaml(self):
        wer = validate(self)
        edited = corpus.config.read_text().replace("joint_n_hid: 24", "joint_n_hid: 32")
        live.write_text(edited.replace("normalize: per_feature", "normalize: none"))
        return wer

    monkeypatch.setattr(train.Trainer, "validate", validate_then_edit_the_yaml)
    out = tmp_path / "run"
    args = run_args(corpus, out, "--training_steps", "2")
    args[args.index("--model_config") + 1] = str(live)
    assert train.main(args) == 0
    monkeypatch.undo()

    last = read_checkpoint(out / "RNN-T_last_checkpoint.pt")
    assert last["config"] == original and last["model_config"]["joint_n_hid"] == 24
    assert set(last["asset_sha256"]) == {"sentpiece_model", "melmeans.pt", "melvars.pt"}
    hw = read_checkpoint(out / "RNN-T_last_checkpoint.hw.pt")
    assert hw["rnnt_config"] == inference_only_config(original)
    assert "hardware checkpoint written" in (out / "train.log").read_text()
    # The saved copy has absolute paths, so it loads from any directory.
    assert config.load(out / "model_config.yaml") == original
    # val.py takes the model from the checkpoint's recorded config, not from the edited YAML.
    capsys.readouterr()
    argv = ["--ckpt", str(out / "RNN-T_last_checkpoint.pt"), "--dataset_dir", str(corpus.root)]
    argv += ["--val_manifests", "dev.json", "--output_dir", str(tmp_path / "val"), "--device", "cpu"]
    assert val.main(argv) == 0
    assert capsys.readouterr().out.startswith("Word Error Rate: ")


def test_a_diverging_run_stops_with_one_error_line_and_keeps_the_last_good_checkpoint(
    corpus, tmp_path, capsys
):
    out = tmp_path / "run"
    assert train.main(run_args(corpus, out, "--training_steps", "2", "--optimizer", "adamw")) == 0
    good = (out / "RNN-T_last_checkpoint.pt").read_bytes()
    capsys.readouterr()
    # A learning rate near the float32 maximum makes the next loss Inf or NaN.
    too_high = ("--lr", "1e37", "--min_lr", "1e36")
    status = train.main(
        run_args(corpus, out, "--training_steps", "8", "--optimizer", "adamw", "--resume", *too_high)
    )
    assert status == 1
    captured = capsys.readouterr()
    assert re.search(r"resumed from .* at step 2 \(best WER \d+\.\d\d%\)", captured.out)
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "became NaN or Inf" in errors[0] and "intact" in errors[0]
    assert errors[0] in (out / "train.log").read_text()
    assert (out / "RNN-T_last_checkpoint.pt").read_bytes() == good
    assert sorted(p.name for p in out.glob("RNN-T_step*")) == ["RNN-T_step2_checkpoint.pt"]


def test_help_shows_the_values_the_other_arguments_give(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--lr", "0.25", "--skip_ngram", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "peak learning rate (default: 0.25)" in out
    assert "export hardware checkpoints without the config's n-gram (default: True)" in out


def test_feature_cache_trains_as_the_audio_does_and_refuses_speed_perturbation(corpus, tmp_path):
    cfg = config.load(corpus.config)
    features = config.input(cfg, "train")["filterbank_features"]
    cache = tmp_path / "features"
    build_feature_cache(corpus.manifests["train"], corpus.root, features, cache, workers=1, progress=False)
    with pytest.raises(ConfigError, match="sets input_train.speed_perturbation"):
        _trainer(corpus, tmp_path / "refused", "--feature_cache", str(cache))

    # The same corpus without speed perturbation and dither: the cache's log-mels
    # are then the audio's, to float16 rounding.
    text = corpus.config.read_text()
    line = "    speed_perturbation: {min_rate: 0.9, max_rate: 1.1, p: 0.5}\n"
    assert line in text
    text = text.replace(line, "")
    assert "dither: 0.00001" in text
    plain_config = corpus.root / "plain.yaml"
    plain_config.write_text(text.replace("dither: 0.00001", "dither: 0.0"))
    plain = SimpleNamespace(**{**vars(corpus), "config": plain_config})
    undithered = config.input(config.load(plain_config), "train")["filterbank_features"]
    build_feature_cache(corpus.manifests["train"], corpus.root, undithered, cache, workers=1, progress=False)

    # One step each, from the same initial weights and seeds: the same loss and
    # gradient norm to float16 rounding, and the same audio seconds.
    results = []
    for name, extra in (("audio", ()), ("cached", ("--feature_cache", str(cache)))):
        trainer = _trainer(plain, tmp_path / name, "--training_steps", "1", *extra)
        with TrainBatches(trainer.train_items, trainer.sampler, 0, 1, 0, 0) as batches:
            results.append(trainer.train_step(batches))
    (loss_a, norm_a, secs_a), (loss_b, norm_b, secs_b) = results
    assert secs_a == secs_b > 0
    assert loss_b == pytest.approx(loss_a, rel=1e-3) and norm_b == pytest.approx(norm_a, rel=1e-2)
    assert (loss_a, norm_a) != (loss_b, norm_b), "the cached run should not have read the audio"
