"""Checkpoint averaging: selection, weights, float64 averages, integer buffers, outputs (issue 6)."""

import math
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml

from caiman_asr_train.core.errors import CheckpointError, UserError
from caiman_asr_train.core.load_hw import load_hw_checkpoint
from caiman_asr_train.data.spm.spm_from_json import train_sentencepiece
from caiman_asr_train.export import averaging_engine as engine
from caiman_asr_train.export import averaging_selection as selection
from caiman_asr_train.export import checkpoint_averaging as ca
from caiman_asr_train.export.checkpointer import Checkpointer, asset_sha256, read_checkpoint
from caiman_asr_train.export.hardware_ckpt import create_hardware_ckpt, save_hardware_ckpt
from caiman_asr_train.rnnt import config
from caiman_asr_train.rnnt.model import RNNT
from caiman_asr_train.train_utils.checkpoints import load_for_validation
from caiman_asr_train.utils.atomic import atomic_torch_save
from caiman_asr_train.utils.cli import run_cli

pytestmark = pytest.mark.filterwarnings("ignore:the EMA weights match no FPGA-supported model")

REPO = Path(__file__).resolve().parents[3]
WORDS = "the a cat dog sat ran on under table red green blue house car it's window".split()
TOKENIZER_KW = {"sentpiece_model": "spm/tiny.model", "labels": [" ", "a"], "sampling": 0.0, "unk": "fail"}


# --- fixtures: a tiny real model, its config, SentencePiece model and statistics ---------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    """A YAML config with a real SentencePiece model and mel statistics, and its model's n_classes."""
    root = tmp_path_factory.mktemp("assets")
    sentences = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(5)) for i in range(200)]
    spm_path = train_sentencepiece(sentences, root / "tiny", 30)
    stats = root / "stats"
    stats.mkdir()
    torch.save(torch.linspace(-5.0, 5.0, 80), stats / "melmeans.pt")
    torch.save(torch.linspace(0.5, 2.0, 80), stats / "melvars.pt")
    torch.save(torch.tensor([1000.0]), stats / "meln.pt")
    demo = yaml.safe_load((REPO / "training/configs/demo.yaml").read_text())
    demo["tokenizer"]["sentpiece_model"] = str(spm_path)
    demo["input_val"]["filterbank_features"]["stats_path"] = str(stats)
    demo["input_train"]["filterbank_features"]["stats_path"] = str(stats)
    demo["rnnt"].update(enc_n_hid=8, pred_n_hid=8, joint_n_hid=8)
    demo["ngram"] = {
        "ngram_path": str(root / "no-ngram-here"),
        "scale_factor": 0.05,
    }  # --override_ngram_path gives it
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(demo))
    return {"config": cfg_path, "n_classes": 31}


def make_model(assets: dict, seed: int) -> RNNT:
    torch.manual_seed(seed)
    return RNNT(assets["n_classes"], **config.rnnt(config.load(assets["config"])))


def save(directory: Path, assets: dict, step: int, seed: int, **extra) -> Path:
    """A real training checkpoint of step ``step`` (Checkpointer format); raw and EMA weights differ."""
    kw = {
        key: extra.pop(key, default)
        for key, default in (("is_best", False), ("is_last", False), ("filepath", None))
    }
    return Checkpointer(directory).save(
        make_model(assets, seed),
        make_model(assets, seed + 1000),
        None,
        epoch=extra.pop("epoch", step // 100),
        step=step,
        best_wer=extra.pop("best_wer", 0.5),
        tokenizer_kw=TOKENIZER_KW,
        logmel_norm_weight=extra.pop("logmel_norm_weight", 1.0),
        config_path=None,
        **kw,
        **extra,
    )


def make_hw(ckpt: Path, assets: dict) -> dict:
    """A software-only hardware checkpoint of ``ckpt`` (real SentencePiece and statistics, no n-gram)."""
    return create_hardware_ckpt(ckpt, assets["config"], skip_ngram=True, skip_state_dict_check=True)


def weighted(paths: list[Path], weights: list[float], entry: str) -> dict:
    """Reference average in float64, independent of the module under test."""
    ckpts = [torch.load(p, weights_only=True) for p in paths]
    return {
        key: sum(w * c[entry][key].double() for c, w in zip(ckpts, weights)).float()
        for key in ckpts[0][entry]
    }


def assert_weights_equal(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-7, msg=key)


def quiet(_: str) -> None:
    pass


# --- weights -------------------------------------------------------------------------------------


def test_resolve_weights_inverse_wer_equal_and_custom():
    weights, how = selection.resolve_weights([0.1, 0.2], wer_eps=0.01)
    assert how == "inverse_wer"
    assert weights == pytest.approx([(1 / 0.11) / (1 / 0.11 + 1 / 0.21), (1 / 0.21) / (1 / 0.11 + 1 / 0.21)])
    assert selection.resolve_weights([0.1, None]) == ([0.5, 0.5], "equal")
    assert selection.resolve_weights([0.1, 0.2], equal=True) == ([0.5, 0.5], "equal")
    assert selection.resolve_weights([0.1, None], [1, 3]) == ([0.25, 0.75], "custom")


def test_a_wer_of_zero_gets_a_finite_weight():
    weights, _ = selection.resolve_weights([0.0, 0.1], wer_eps=0.01)
    assert all(math.isfinite(w) for w in weights)
    assert weights == pytest.approx([100 / (100 + 1 / 0.11), (1 / 0.11) / (100 + 1 / 0.11)])


@pytest.mark.parametrize(
    "weights, message",
    [
        ([1.0], "got 1 weight(s) for 2"),
        ([1.0, -1.0], "-1.0 is not a finite number >= 0"),
        ([0.0, 0.0], "sum to 0"),
    ],
)
def test_bad_weights_are_rejected(weights, message):
    with pytest.raises(UserError) as excinfo:
        selection.resolve_weights([0.1, 0.2], weights)
    assert message in str(excinfo.value)


# --- known-value averages ------------------------------------------------------------------------


def test_equal_weights_when_a_wer_is_missing(tmp_path, assets):
    paths = [save(tmp_path, assets, 100 * i, seed=i) for i in (1, 2, 3)]
    threads = torch.get_num_threads()
    avg = engine.average_checkpoints(paths, progress=False, log=quiet)
    assert torch.get_num_threads() == threads
    for entry in ("state_dict", "ema_state_dict"):
        assert_weights_equal(avg[entry], weighted(paths, [1 / 3] * 3, entry))
    assert avg["averaging"]["weighting"] == "equal"
    assert avg["averaging"]["weights"] == pytest.approx([1 / 3] * 3)


def test_custom_weights(tmp_path, assets):
    paths = [save(tmp_path, assets, 100 * i, seed=i, dev_wer=0.1 * i) for i in (1, 2)]
    avg = engine.average_checkpoints(paths, [1.0, 3.0], progress=False, log=quiet)
    for entry in ("state_dict", "ema_state_dict"):
        assert_weights_equal(avg[entry], weighted(paths, [0.25, 0.75], entry))
    assert avg["averaging"]["weighting"] == "custom"


def test_inverse_wer_weights_when_every_input_has_a_dev_wer(tmp_path, assets):
    paths = [
        save(tmp_path, assets, 100 * i, seed=i, dev_wer=wer) for i, wer in ((1, 0.1), (2, 0.3), (3, 0.0))
    ]
    avg = engine.average_checkpoints(paths, progress=False, log=quiet)
    inverse = [1 / 0.11, 1 / 0.31, 1 / 0.01]
    expected = [w / sum(inverse) for w in inverse]
    assert avg["averaging"]["weighting"] == "inverse_wer"
    assert avg["averaging"]["weights"] == pytest.approx(expected)
    assert avg["averaging"]["wers"] == [0.1, 0.3, 0.0]
    assert_weights_equal(avg["ema_state_dict"], weighted(paths, expected, "ema_state_dict"))


def test_averaging_one_checkpoint_reproduces_it_exactly(tmp_path, assets):
    path = save(tmp_path, assets, 700, seed=7, best_wer=0.25)
    original = torch.load(path, weights_only=True)
    avg = engine.average_checkpoints([path], progress=False, log=quiet)
    for entry in ("state_dict", "ema_state_dict"):
        assert list(avg[entry]) == list(original[entry])
        for key, tensor in original[entry].items():
            assert avg[entry][key].dtype == tensor.dtype
            assert torch.equal(avg[entry][key], tensor), key
    for key in ("epoch", "step", "best_wer", "tokenizer_kw", "logmel_norm_weight"):
        assert avg[key] == original[key]
    assert avg["optimizer"] is None


def test_output_metadata_comes_from_the_newest_input(tmp_path, assets):
    cfg = config.load(assets["config"])
    old = save(tmp_path, assets, 900, seed=1, epoch=9, best_wer=0.3, config={**cfg, "note": "old"})
    new = save(tmp_path, assets, 1200, seed=2, epoch=12, best_wer=0.2, config={**cfg, "note": "new"})
    avg = engine.average_checkpoints([new, old], progress=False, log=quiet)
    assert (avg["epoch"], avg["step"], avg["best_wer"], avg["config"]["note"]) == (12, 1200, 0.2, "new")
    assert avg["model_config"] == read_checkpoint(new)["model_config"] is not None
    assert avg["config_path"] is None  # as the Checkpointer wrote it
    assert avg["averaging"]["inputs"] == [str(new), str(old)]
    assert avg["averaging"]["steps"] == [1200, 900]
    assert "dev_wer" not in avg


def test_output_file_is_a_training_checkpoint_the_checkpointer_loads(tmp_path, assets):
    paths = [save(tmp_path, assets, 100 * i, seed=i) for i in (1, 2)]
    out = tmp_path / "out" / "avg.pt"
    run_cli_ok(["--ckpts", *map(str, paths), "--output_path", str(out)])
    stored = read_checkpoint(out, mmap=False)
    assert stored["optimizer"] is None and stored["averaging"]["weights"] == [0.5, 0.5]
    model, ema = make_model(assets, 0), make_model(assets, 0)
    Checkpointer(tmp_path).load(out, model, ema)
    expected = weighted(paths, [0.5, 0.5], "ema_state_dict")
    assert_weights_equal(ema.state_dict(), expected)


# --- integer buffers, EMA presence, shared storage ----------------------------------------------


def write_raw(path: Path, state_dict: dict, ema: object = "same", step: int = 100, **extra) -> Path:
    """A hand-made docs/formats.md section 8 checkpoint (for cases train.py never writes)."""
    atomic_torch_save(
        {
            "epoch": 1,
            "step": step,
            "best_wer": 0.5,
            "state_dict": state_dict,
            "ema_state_dict": state_dict if ema == "same" else ema,
            "optimizer": None,
            "tokenizer_kw": TOKENIZER_KW,
            "logmel_norm_weight": extra.pop("logmel_norm_weight", 1.0),
            **extra,
        },
        path,
    )
    return path


def test_integer_buffers_come_from_the_most_weighted_input(tmp_path):
    def sd(value: float, count: int) -> dict:
        return OrderedDict(
            w=torch.full((3,), value), count=torch.tensor(count), flag=torch.tensor([True, False])
        )

    a = write_raw(tmp_path / "a.pt", sd(1.0, 10), step=100)
    b = write_raw(tmp_path / "b.pt", sd(3.0, 20), step=200)
    notes = []
    avg = engine.average_checkpoints([a, b], [3.0, 1.0], progress=False, log=notes.append)
    assert torch.equal(avg["state_dict"]["w"], torch.full((3,), 1.5))
    assert avg["state_dict"]["count"].dtype == torch.int64 and int(avg["state_dict"]["count"]) == 10
    assert torch.equal(avg["state_dict"]["flag"], torch.tensor([True, False]))
    assert any("'count'" in n and str(a) in n for n in notes)
    assert not any("'flag'" in n for n in notes)
    # Equal weights: the tie goes to the newer step.
    avg = engine.average_checkpoints([a, b], progress=False, log=quiet)
    assert int(avg["state_dict"]["count"]) == 20


def test_ema_is_the_averaged_raw_weights_when_an_input_has_none(tmp_path):
    a = write_raw(tmp_path / "a.pt", OrderedDict(w=torch.full((4,), 1.0)), ema={"w": torch.zeros(4)})
    b = write_raw(tmp_path / "b.pt", OrderedDict(w=torch.full((4,), 3.0)), ema=None, step=200)
    notes = []
    avg = engine.average_checkpoints([a, b], progress=False, log=notes.append)
    assert torch.equal(avg["ema_state_dict"]["w"], torch.full((4,), 2.0))
    assert avg["averaging"]["ema_averaged"] is False
    assert any("not every input has ema_state_dict" in n for n in notes)


def test_inputs_whose_raw_and_ema_weights_share_storage_average_correctly(tmp_path):
    # Large enough to span many accumulation chunks of the one storage both entries view.
    big = [torch.randn(300_000, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    paths = [write_raw(tmp_path / f"{i}.pt", OrderedDict(w=t), step=100 * (i + 1)) for i, t in enumerate(big)]
    avg = engine.average_checkpoints(paths, [0.25, 0.75], progress=False, log=quiet)
    expected = (0.25 * big[0].double() + 0.75 * big[1].double()).float()
    assert torch.equal(avg["state_dict"]["w"], expected)
    assert torch.equal(avg["ema_state_dict"]["w"], expected)
    # The inputs are untouched.
    assert torch.equal(torch.load(paths[0], weights_only=True)["state_dict"]["w"], big[0])


def test_zero_weight_inputs_are_skipped(tmp_path):
    a = write_raw(tmp_path / "a.pt", OrderedDict(w=torch.full((2,), 2.0)))
    b = write_raw(tmp_path / "b.pt", OrderedDict(w=torch.full((2,), float("nan"))), step=200)
    avg = engine.average_checkpoints([a, b], [1.0, 0.0], progress=False, log=quiet)
    assert torch.equal(avg["state_dict"]["w"], torch.full((2,), 2.0))


def test_non_finite_weights_are_refused_naming_the_file_and_tensor(tmp_path):
    a = write_raw(tmp_path / "a.pt", OrderedDict(w=torch.full((2,), 2.0)))
    b = write_raw(tmp_path / "b.pt", OrderedDict(w=torch.tensor([1.0, float("inf")])), step=200)
    with pytest.raises(CheckpointError, match=r"b\.pt: 'state_dict\.w' holds NaN or Inf values"):
        engine.average_checkpoints([a, b], progress=False, log=quiet)


# --- mismatches ------------------------------------------------------------------------------------


def test_a_missing_key_is_rejected_naming_the_file_and_key(tmp_path, assets):
    good = save(tmp_path, assets, 100, seed=1)
    sd = OrderedDict(torch.load(good, weights_only=True)["state_dict"])
    del sd["joint_enc.bias"]
    bad = write_raw(tmp_path / "bad.pt", sd)
    with pytest.raises(CheckpointError, match=r"bad\.pt: state_dict has no key 'joint_enc\.bias'"):
        engine.average_checkpoints([good, bad], progress=False, log=quiet)


def test_an_extra_key_is_rejected_naming_the_file_and_key(tmp_path):
    a = write_raw(tmp_path / "a.pt", OrderedDict(w=torch.ones(2)))
    b = write_raw(tmp_path / "b.pt", OrderedDict(w=torch.ones(2), extra=torch.ones(1)))
    with pytest.raises(CheckpointError, match=r"b\.pt: state_dict has key 'extra'"):
        engine.average_checkpoints([a, b], progress=False, log=quiet)


def test_a_shape_mismatch_is_rejected_naming_the_file_and_key(tmp_path, assets):
    good = save(tmp_path, assets, 100, seed=1)
    ckpt = torch.load(good, weights_only=True)
    ema = OrderedDict(ckpt["ema_state_dict"])
    ema["joint_net.2.weight"] = torch.zeros(5, 8)
    bad = write_raw(tmp_path / "bad.pt", ckpt["state_dict"], ema=ema)
    with pytest.raises(
        CheckpointError, match=r"bad\.pt: ema_state_dict\['joint_net\.2\.weight'\] has shape \[5, 8\]"
    ):
        engine.average_checkpoints([good, bad], progress=False, log=quiet)


def test_a_dtype_mismatch_is_rejected_naming_the_file_and_key(tmp_path):
    a = write_raw(tmp_path / "a.pt", OrderedDict(w=torch.ones(2)))
    b = write_raw(tmp_path / "b.pt", OrderedDict(w=torch.ones(2, dtype=torch.float16)))
    with pytest.raises(CheckpointError, match=r"b\.pt: state_dict\['w'\] is torch.float16 but .*a\.pt has"):
        engine.average_checkpoints([a, b], progress=False, log=quiet)


def test_half_precision_inputs_are_averaged_in_float64_and_stay_half(tmp_path):
    values = [torch.tensor(v, dtype=torch.float16) for v in ([1.0, 2048.0, 0.1], [2.0, 2052.0, 0.3])]
    paths = [write_raw(tmp_path / f"{i}.pt", OrderedDict(w=v), step=i) for i, v in enumerate(values)]
    avg = engine.average_checkpoints(paths, progress=False, log=quiet)["state_dict"]["w"]
    assert avg.dtype == torch.float16
    assert torch.equal(avg, ((values[0].double() + values[1].double()) / 2).half())


def test_different_logmel_norm_weights_are_refused(tmp_path):
    a = write_raw(tmp_path / "a.pt", OrderedDict(w=torch.ones(2)))
    b = write_raw(tmp_path / "b.pt", OrderedDict(w=torch.ones(2)), logmel_norm_weight=0.5)
    with pytest.raises(CheckpointError, match=r"b\.pt: logmel_norm_weight is 0\.5"):
        engine.average_checkpoints([a, b], progress=False, log=quiet)


def test_a_hardware_checkpoint_or_a_repeated_input_is_refused(tmp_path, assets):
    good = save(tmp_path, assets, 100, seed=1)
    hw = tmp_path / "x.hw.pt"
    save_hardware_ckpt(make_hw(good, assets), hw)
    with pytest.raises(CheckpointError, match="x.hw.pt: a hardware checkpoint"):
        engine.average_checkpoints([good, hw], progress=False, log=quiet)
    with pytest.raises(UserError, match="given twice"):
        engine.average_checkpoints([good, tmp_path / "." / good.name], progress=False, log=quiet)


# --- directory selection ---------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path, assets) -> Path:
    """A training run: step files with dev WERs, best/last copies, a hardware checkpoint, an average."""
    run = tmp_path / "run"
    for step, wer in ((100, 0.40), (200, 0.10), (300, 0.30), (400, 0.20)):
        save(run, assets, step, seed=step, dev_wer=wer)
    save(run, assets, 500, seed=500)  # no dev_wer: unrated, whatever its best_wer says
    save(run, assets, 200, seed=200, dev_wer=0.10, is_best=True)
    save(run, assets, 500, seed=500, is_last=True)
    save_hardware_ckpt(
        make_hw(run / "RNN-T_step400_checkpoint.pt", assets), run / "RNN-T_step400_checkpoint.hw.pt"
    )
    averaged = engine.average_checkpoints([run / "RNN-T_step100_checkpoint.pt"], progress=False, log=quiet)
    atomic_torch_save(averaged, run / "avg.pt")
    return run


def test_top_n_picks_the_lowest_dev_wers_and_says_why(run_dir):
    lines = []
    chosen = engine.select_checkpoints(run_dir, top_n=2, log=lines.append)
    assert [c.step for c in chosen] == [200, 400]
    assert [c.wer for c in chosen] == [0.10, 0.20]
    text = "\n".join(lines)
    assert (
        "RNN-T_step200_checkpoint.pt (step 200, WER 10.000%: dev_wer stored in the checkpoint): rank 1"
        in text
    )
    assert "RNN-T_last_checkpoint.pt: a 'last' file" in text
    assert "RNN-T_best_checkpoint.pt: same step (200) as RNN-T_step200_checkpoint.pt" in text
    assert "RNN-T_step400_checkpoint.hw.pt: a hardware checkpoint" in text
    assert "avg.pt: an averaged checkpoint" in text
    assert "RNN-T_step500_checkpoint.pt: no dev WER to rank by" in text
    assert "RNN-T_step300_checkpoint.pt: rank 3 by dev WER" in text


def test_top_n_refuses_more_than_the_rated_checkpoints(run_dir):
    with pytest.raises(UserError, match="only 4 checkpoint"):
        engine.select_checkpoints(run_dir, top_n=5, log=quiet)


def test_a_best_file_of_its_own_step_is_ranked_by_its_best_wer(tmp_path, assets):
    save(tmp_path, assets, 100, seed=1, dev_wer=0.3)
    save(tmp_path, assets, 150, seed=2, best_wer=0.05, is_best=True)
    chosen = engine.select_checkpoints(tmp_path, top_n=1, log=quiet)
    assert chosen[0].path.name == "RNN-T_best_checkpoint.pt" and chosen[0].wer == 0.05


def test_steps_and_last_n_pick_step_files(run_dir):
    assert [c.step for c in engine.select_checkpoints(run_dir, steps=[400, 100], log=quiet)] == [100, 400]
    assert [c.step for c in engine.select_checkpoints(run_dir, last_n=3, log=quiet)] == [300, 400, 500]
    with pytest.raises(
        UserError, match=r"no step checkpoint for step 250 .*steps found: 100, 200, 300, 400, 500"
    ):
        engine.select_checkpoints(run_dir, steps=[250], log=quiet)


def test_nemo_style_names_give_the_wer_when_the_checkpoint_has_none(tmp_path, assets):
    for step, wer in ((1000, "0.0652"), (2000, "0.0500"), (3000, "0.0710")):
        save(
            tmp_path,
            assets,
            step,
            seed=step,
            filepath=tmp_path / f"step={step}-val_wer={wer}-val_loss=1.50.ckpt",
        )
    save(tmp_path, assets, 3000, seed=3, filepath=tmp_path / "step=3000-val_wer=0.0710-last.ckpt")
    chosen = engine.select_checkpoints(tmp_path, top_n=2, log=quiet)
    assert [(c.step, c.wer, c.wer_source) for c in chosen] == [
        (2000, 0.05, "val_wer in the file name"),
        (1000, 0.0652, "val_wer in the file name"),
    ]


# --- hardware checkpoints ----------------------------------------------------------------------------


def test_output_hw_from_model_config_loads_with_load_hw_checkpoint(tmp_path, assets):
    paths = [save(tmp_path, assets, 100 * i, seed=i, dev_wer=0.1 * i) for i in (1, 2, 3)]
    out = tmp_path / "avg.hw.pt"
    run_cli_ok(
        [
            "--checkpoint_dir",
            str(tmp_path),
            "--top_n",
            "3",
            "--output_hw",
            str(out),
            "--model_config",
            str(assets["config"]),
            "--skip_ngram",
            "--skip_state_dict_check",
        ]
    )
    loaded = load_hw_checkpoint(out)
    weights = selection.resolve_weights([0.1, 0.2, 0.3])[0]
    assert_weights_equal(loaded.model.state_dict(), weighted(paths, weights, "ema_state_dict"))
    assert loaded.step == 300 and loaded.ngram == {"binary": None, "scale_factor": None}


def test_an_average_of_self_describing_checkpoints_exports_and_validates_without_a_config(tmp_path, assets):
    cfg = config.load(assets["config"])
    hashes = asset_sha256(cfg)
    paths = [save(tmp_path, assets, 100 * i, seed=i, config=cfg, asset_sha256=hashes) for i in (1, 2)]
    avg, avg_hw = tmp_path / "avg.pt", tmp_path / "avg.hw.pt"
    run_cli_ok(
        ["--ckpts", *map(str, paths), "--output_path", str(avg), "--output_hw", str(avg_hw), "--skip_ngram"]
        + ["--skip_state_dict_check"]
    )
    expected = weighted(paths, [0.5, 0.5], "ema_state_dict")
    assert read_checkpoint(avg)["asset_sha256"] == hashes
    assert_weights_equal(load_hw_checkpoint(avg_hw).model.state_dict(), expected)
    # val.py reads the average's recorded config: no --model_config.
    target = load_for_validation(avg, None, torch.device("cpu"))
    assert target.kind == "training" and target.step == 200
    assert_weights_equal(target.model.state_dict(), expected)


def test_output_hw_of_checkpoints_that_record_no_config_asks_for_one(tmp_path, assets, capsys):
    paths = [save(tmp_path, assets, 100 * i, seed=i) for i in (1, 2)]
    with pytest.raises(SystemExit):
        run_cli(lambda: ca.main(["--ckpts", *map(str, paths), "--output_hw", str(tmp_path / "avg.hw.pt")]))
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "records no config" in err and "--model_config" in err, err
    assert "\n" not in err
    assert not (tmp_path / "avg.hw.pt").exists()


def test_output_hw_passes_the_ngram_override_through(tmp_path, assets, kenlm_files):
    paths = [save(tmp_path, assets, 100 * i, seed=i) for i in (1, 2)]
    out = tmp_path / "avg.hw.pt"
    run_cli_ok(
        [
            "--ckpts",
            *map(str, paths),
            "--output_hw",
            str(out),
            "--model_config",
            str(assets["config"]),
            "--override_ngram_path",
            str(kenlm_files.binary),
            "--skip_state_dict_check",
        ]
    )
    loaded = load_hw_checkpoint(out)
    assert loaded.ngram == {"binary": kenlm_files.binary.read_bytes(), "scale_factor": 0.05}


def test_input_hw_gets_the_averaged_ema_weights_and_keeps_the_rest(tmp_path, assets):
    paths = [save(tmp_path, assets, 100 * i, seed=i) for i in (1, 2)]
    source = tmp_path / "src.hw.pt"
    save_hardware_ckpt(make_hw(paths[0], assets), source)
    out = tmp_path / "avg.hw.pt"
    run_cli_ok(["--ckpts", *map(str, paths), "--input_hw", str(source), "--output_hw", str(out)])
    before, after = torch.load(source, weights_only=True), torch.load(out, weights_only=True)
    assert set(after) == set(before)
    for key in ("sentpiece_model", "ngram", "version", "rnnt_config", "raw_prefix_token_map", "melalpha"):
        assert after[key] == before[key]
    assert torch.equal(after["melmeans"], before["melmeans"])
    assert after["step"] == 200
    assert_weights_equal(after["state_dict"], weighted(paths, [0.5, 0.5], "ema_state_dict"))
    assert_weights_equal(load_hw_checkpoint(out).model.state_dict(), after["state_dict"])


def test_input_hw_of_another_model_is_refused_naming_the_key(tmp_path, assets, capsys):
    paths = [save(tmp_path, assets, 100, seed=1)]
    hw = make_hw(paths[0], assets)
    hw["state_dict"]["joint_enc.bias"] = torch.zeros(3)
    torch.save(hw, tmp_path / "other.hw.pt")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            lambda: ca.main(
                [
                    "--ckpts",
                    *map(str, paths),
                    "--input_hw",
                    str(tmp_path / "other.hw.pt"),
                    "--output_hw",
                    str(tmp_path / "avg.hw.pt"),
                ]
            )
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"other\.hw\.pt: the hardware checkpoint's 'joint_enc\.bias' has shape \[3\]", err)
    assert not (tmp_path / "avg.hw.pt").exists()


# --- command line ------------------------------------------------------------------------------------


def run_cli_ok(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: ca.main(argv))
    assert exit_info.value.code == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weights", "1"], "error: --weights: got 1 weight(s) for 2 checkpoint(s)"),
        (["--weights", "1", "-2"], "error: --weights: -2.0 is not a finite number >= 0"),
        (["--weights", "0", "0"], "error: --weights: the weights sum to 0"),
        (
            ["--output_hw", "x.hw.pt", "--model_config", "c.yaml", "--input_hw", "h.hw.pt"],
            "error: --model_config (build) and --input_hw (copy) exclude each other",
        ),
        (["--skip_ngram"], "error: --skip_ngram only applies with --output_hw without --input_hw"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, assets, capsys, extra, message):
    paths = [save(tmp_path, assets, 100 * i, seed=i) for i in (1, 2)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            lambda: ca.main(["--ckpts", *map(str, paths), "--output_path", str(tmp_path / "o.pt"), *extra])
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
    assert not (tmp_path / "o.pt").exists()


def test_dry_run_writes_nothing(run_dir, capsys):
    run_cli_ok(["--checkpoint_dir", str(run_dir), "--top_n", "2", "--dry_run"])
    out = capsys.readouterr().out
    assert "would average with inverse_wer weights" in out
    assert "RNN-T_step200_checkpoint.pt (step 200, WER 10.000%" in out


def test_runs_as_a_script(tmp_path, assets):
    paths = [save(tmp_path, assets, 100 * i, seed=i) for i in (1, 2)]
    script = REPO / "training/caiman_asr_train/export/checkpoint_averaging.py"
    result = subprocess.run(
        [sys.executable, str(script), "--ckpts", *map(str, paths), "--output_path", str(paths[0])],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: output {paths[0]} is one of the inputs; write the average to a new file"
    )
