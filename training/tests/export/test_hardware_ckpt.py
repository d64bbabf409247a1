"""Hardware checkpoints: docs/formats.md section 9 layout, every refusal, n-gram options and the command line."""

import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from caiman_asr_train.core.errors import HardwareCheckpointError, UserError
from caiman_asr_train.core.export_schema import RNNTInferenceConfigSchema
from caiman_asr_train.core.model import RNNT, ConfigRNNT
from caiman_asr_train.export import hardware_ckpt
from caiman_asr_train.export.checkpointer import asset_sha256, is_training_checkpoint, read_checkpoint
from caiman_asr_train.export.hardware_ckpt import (
    create_hardware_ckpt,
    fpga_variant,
    hw_path,
    inference_only_config,
    is_hardware_checkpoint,
    save_hardware_ckpt,
)
from caiman_asr_train.export.model_schema import CheckpointNotSupportedError
from caiman_asr_train.train_utils.callbacks import FinalizeContext, HardwareExportCallback, shown_path
from caiman_asr_train.train_utils.distributed import DistInfo
from caiman_asr_train.utils.cli import run_cli

# The tiny test model is not an FPGA variant; one test checks that warning explicitly.
pytestmark = pytest.mark.filterwarnings("ignore:the EMA weights match no FPGA")

REPO_ROOT = Path(__file__).resolve().parents[3]
SPEC_LAYOUT = {
    "state_dict": OrderedDict,
    "epoch": int,
    "step": int,
    "best_wer": float,
    "melmeans": torch.Tensor,
    "melvars": torch.Tensor,
    "melalpha": float,
    "sentpiece_model": bytes,
    "ngram": dict,
    "version": str,
    "rnnt_config": dict,
    "raw_prefix_token_map": dict,
}


def export(env, ckpt=None, **kwargs) -> dict:
    return create_hardware_ckpt(ckpt or env.ckpt_path, env.config_path, skip_state_dict_check=True, **kwargs)


def test_layout_is_exactly_spec_section_9(export_env):
    hw = export(export_env)
    assert list(hw) == list(SPEC_LAYOUT)
    for key, kind in SPEC_LAYOUT.items():
        assert type(hw[key]) is kind, key
    ema = export_env.ema.state_dict()
    assert list(hw["state_dict"]) == list(ema)
    for name, tensor in hw["state_dict"].items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, ema[name]), name
    assert not torch.equal(hw["state_dict"]["joint_enc.weight"], export_env.model.joint_enc.weight)
    assert (hw["epoch"], hw["step"], hw["best_wer"]) == (3, 10, 0.25)
    assert torch.equal(hw["melmeans"], torch.load(export_env.stats_dir / "melmeans.pt"))
    assert torch.equal(hw["melvars"], torch.load(export_env.stats_dir / "melvars.pt"))
    assert hw["melmeans"].dtype == torch.float32 and hw["melmeans"].shape == (8,)
    assert hw["melalpha"] == 0.0
    assert hw["sentpiece_model"] == export_env.spm_path.read_bytes()
    assert hw["ngram"] == {"binary": export_env.kenlm.binary.read_bytes(), "scale_factor": 0.05}
    assert hw["version"] == "1.15.0"
    assert RNNTInferenceConfigSchema.model_validate(hw["rnnt_config"]).model_dump() == hw["rnnt_config"]
    assert hw["rnnt_config"] == inference_only_config(export_env.config_path)
    assert hw["raw_prefix_token_map"] == {"domain": [1, 2]}


def test_saved_file_loads_with_weights_only_and_protocol_2(export_env, tmp_path):
    hw = export(export_env)
    path = tmp_path / "out" / "model.hw.pt"
    save_hardware_ckpt(hw, path)
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(SPEC_LAYOUT) and loaded["ngram"] == hw["ngram"]
    with zipfile.ZipFile(path) as archive:
        pickle_name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        assert archive.read(pickle_name)[:2] == b"\x80\x02"
    assert [p.name for p in path.parent.iterdir()] == ["model.hw.pt"]


def test_half_precision_ema_is_stored_as_float32(export_env):
    ckpt = torch.load(export_env.ckpt_path, weights_only=True)
    ckpt["ema_state_dict"] = OrderedDict((k, v.to(torch.bfloat16)) for k, v in ckpt["ema_state_dict"].items())
    hw = create_hardware_ckpt(ckpt, export_env.cfg, skip_state_dict_check=True)
    assert {t.dtype for t in hw["state_dict"].values()} == {torch.float32}


def test_unsupported_weights_warn_software_only_when_check_skipped(export_env):
    with pytest.raises(CheckpointNotSupportedError, match="skip_state_dict_check"):
        create_hardware_ckpt(export_env.ckpt_path, export_env.config_path)
    with pytest.warns(UserWarning, match="software use only"):
        create_hardware_ckpt(export_env.ckpt_path, export_env.config_path, skip_state_dict_check=True)


def test_fpga_variants_are_recognised_by_shape():
    def state_dict(enc, pred, joint, n_classes):
        with torch.device("meta"):
            config = ConfigRNNT(n_classes, 240, enc, 2, 6, 2, pred, 2, joint)
            return RNNT(config).state_dict()

    assert fpga_variant(state_dict(1024, 512, 768, 8704)) == "base"
    assert fpga_variant(state_dict(1536, 768, 1024, 17408)) == "large"
    assert fpga_variant(state_dict(1024, 512, 768, 8705)) is None


def _remove(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    else:
        path.unlink()


# name -> (break the environment, words the one-line error must contain)
REFUSALS = {
    "norm_ramp_unfinished": (
        lambda env: env.save(logmel_norm_weight=0.5),
        ["logmel_norm_weight is 0.5", "--norm_ramp_end_step"],
    ),
    "stats_dir_missing": (
        lambda env: _remove(env.stats_dir),
        ["stats", "does not exist", "generate_mel_stats"],
    ),
    "stats_file_missing": (lambda env: _remove(env.stats_dir / "melvars.pt"), ["melvars.pt", "missing"]),
    "sentencepiece_missing": (
        lambda env: _remove(env.spm_path),
        ["tiny.model", "tokenizer.sentpiece_model", "not found"],
    ),
    "ngram_missing": (lambda env: _remove(env.ngram_dir), ["ngram", "generate_ngram.sh", "--skip_ngram"]),
    "ngram_renamed_text": (
        lambda env: (env.ngram_dir / "ngram.binary").write_text("this is not a language model\n"),
        ["ngram.binary", "not a KenLM binary", "build_binary"],
    ),
    "ngram_arpa_only": (
        lambda env: _remove(env.ngram_dir / "ngram.binary"),
        ["ngram.arpa", "not a KenLM binary", "build_binary"],
    ),
    "no_fpga_variant": (lambda env: None, ["match no FPGA-supported model", "--skip_state_dict_check"]),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_each_refusal_is_one_line_exit_2_and_writes_nothing(export_env, case, capsys):
    breaks, words = REFUSALS[case]
    breaks(export_env)
    skip_check = case != "no_fpga_variant"
    with pytest.raises(HardwareCheckpointError) as error:
        create_hardware_ckpt(export_env.ckpt_path, export_env.config_path, skip_state_dict_check=skip_check)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message

    output = export_env.dir / "exported" / "model.hw.pt"
    argv = [
        "--ckpt",
        str(export_env.ckpt_path),
        "--config",
        str(export_env.config_path),
        "--output_ckpt",
        str(output),
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: hardware_ckpt.main(argv + (["--skip_state_dict_check"] if skip_check else [])))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {message}\n" and captured.out == ""
    assert not output.parent.exists() or not any(output.parent.iterdir())


def test_skip_ngram_and_override_ngram_path(export_env, tmp_path):
    assert export(export_env, skip_ngram=True)["ngram"] == {"binary": None, "scale_factor": None}
    # The configured directory holds only an ARPA file (refused), the override a real binary.
    _remove(export_env.ngram_dir / "ngram.binary")
    override = tmp_path / "elsewhere" / "lm.bin"
    override.parent.mkdir()
    override.write_bytes(export_env.kenlm.binary.read_bytes())
    hw = export(export_env, override_ngram_path=override)
    assert hw["ngram"] == {"binary": override.read_bytes(), "scale_factor": 0.05}
    # A directory works as in the config: its ngram.binary is used.
    with pytest.raises(HardwareCheckpointError, match="no ngram.binary or ngram.arpa"):
        export(export_env, override_ngram_path=override.parent)
    override.rename(override.parent / "ngram.binary")
    assert export(export_env, override_ngram_path=override.parent)["ngram"]["binary"] == hw["ngram"]["binary"]
    with pytest.raises(HardwareCheckpointError, match="missing.arpa.*not found"):
        export(export_env, override_ngram_path=tmp_path / "missing.arpa")
    with pytest.raises(HardwareCheckpointError, match="not a KenLM binary"):
        export(export_env, override_ngram_path=export_env.kenlm.arpa)


def test_vocabulary_must_match_the_weights(export_env, other_size_spm_bytes):
    export_env.spm_path.write_bytes(other_size_spm_bytes)
    with pytest.raises(HardwareCheckpointError, match="pieces but the weights have"):
        export(export_env)


def test_command_line_script_writes_and_reports(export_env):
    output = export_env.dir / "model.hw.pt"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "training/caiman_asr_train/export/hardware_ckpt.py"),
            "--ckpt",
            str(export_env.ckpt_path),
            "--config",
            str(export_env.config_path),
            "--output_ckpt",
            str(output),
            "--skip_state_dict_check",
            "--skip_ngram",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {output}" in result.stdout and "software use only" in result.stdout
    assert "step 10" in result.stdout and "n-gram none" in result.stdout
    assert torch.load(output, weights_only=True)["ngram"] == {"binary": None, "scale_factor": None}


def test_hw_path_sits_next_to_the_training_checkpoint():
    assert hw_path("results/RNN-T_best_checkpoint.pt") == Path("results/RNN-T_best_checkpoint.hw.pt")
    assert hw_path("results/model.ckpt") == Path("results/model.ckpt.hw.pt")


def self_describing(env) -> Path:
    """A checkpoint of env's models that records its config and asset hashes, as train.py saves them."""
    return env.save(env.dir / "results/described.pt", config=env.cfg, asset_sha256=asset_sha256(env.cfg))


def test_a_self_describing_checkpoint_exports_without_a_config(export_env):
    path = self_describing(export_env)
    hw = create_hardware_ckpt(path, skip_state_dict_check=True)
    assert hw["rnnt_config"] == inference_only_config(export_env.cfg)
    assert hw["sentpiece_model"] == export_env.spm_path.read_bytes()


def test_a_yaml_edited_after_training_does_not_change_the_export(export_env):
    path = self_describing(export_env)
    output = export_env.dir / "out.hw.pt"
    argv = ["--ckpt", str(path), "--output_ckpt", str(output), "--skip_state_dict_check"]
    hardware_ckpt.main(argv)
    before = output.read_bytes()
    edited = export_env.config_path.read_text().replace("scale_factor: 0.05", "scale_factor: 0.9")
    export_env.config_path.write_text(edited.replace("enc_n_hid: 16", "enc_n_hid: 32"))
    hardware_ckpt.main(argv)
    assert output.read_bytes() == before
    # The recorded config wins; an explicit --config still overrides (and here no longer fits).
    with pytest.raises(HardwareCheckpointError, match="do not fit the config's model"):
        hardware_ckpt.main(argv + ["--config", str(export_env.config_path)])


def test_a_changed_tokenizer_or_statistics_file_is_refused_unless_allowed(export_env):
    path = self_describing(export_env)
    export_env.spm_path.write_bytes(export_env.spm_path.read_bytes() + b"\0")
    with pytest.raises(
        HardwareCheckpointError, match=r"tiny.model \(sentpiece_model\).*--allow_changed_assets"
    ):
        create_hardware_ckpt(path, skip_state_dict_check=True)
    export_env.spm_path.write_bytes(export_env.spm_path.read_bytes()[:-1])
    melmeans = export_env.stats_dir / "melmeans.pt"
    new_means = torch.load(melmeans, weights_only=True) + 1.0
    torch.save(new_means, melmeans)
    with pytest.raises(HardwareCheckpointError, match=r"melmeans.pt \(melmeans.pt\) is not the file"):
        create_hardware_ckpt(path, skip_state_dict_check=True)
    hw = create_hardware_ckpt(path, skip_state_dict_check=True, allow_changed_assets=True)
    assert torch.equal(hw["melmeans"], new_means)


def test_an_old_layout_checkpoint_needs_and_accepts_an_explicit_config(export_env):
    ckpt = torch.load(export_env.ckpt_path, weights_only=True)
    assert ckpt["config"] is None and ckpt["asset_sha256"] is None
    for key in ("config", "model_config", "asset_sha256", "config_path"):
        del ckpt[key]
    old = export_env.dir / "old.pt"
    torch.save(ckpt, old)
    with pytest.raises(HardwareCheckpointError, match="records no config.*--config"):
        create_hardware_ckpt(old, skip_state_dict_check=True)
    hw = create_hardware_ckpt(old, export_env.config_path, skip_state_dict_check=True)
    assert hw["step"] == 10


def test_non_finite_ema_weights_are_refused_naming_the_tensor(export_env):
    with torch.no_grad():
        export_env.ema.joint_enc.weight[0, 0] = float("nan")
    path = export_env.save(export_env.dir / "nan.pt")
    with pytest.raises(HardwareCheckpointError, match="'joint_enc.weight' holds NaN or Inf"):
        export(export_env, ckpt=path)


def test_weights_that_do_not_fit_the_config_are_refused_even_with_skip_state_dict_check(export_env, tmp_path):
    other = export_env.config_path.read_text().replace("pred_n_hid: 12", "pred_n_hid: 14")
    other_path = export_env.dir / "other.yaml"
    other_path.write_text(other)
    output = tmp_path / "x.hw.pt"
    argv = ["--ckpt", str(export_env.ckpt_path), "--config", str(other_path), "--output_ckpt", str(output)]
    with pytest.raises(HardwareCheckpointError, match="do not fit the config's model.*prediction"):
        hardware_ckpt.main(argv + ["--skip_state_dict_check"])
    assert not output.exists()


def test_an_output_equal_to_the_input_is_refused(export_env):
    before = export_env.ckpt_path.read_bytes()
    argv = ["--ckpt", str(export_env.ckpt_path), "--config", str(export_env.config_path)]
    with pytest.raises(UserError, match="is the input --ckpt"):
        hardware_ckpt.main(argv + ["--output_ckpt", str(export_env.ckpt_path), "--skip_state_dict_check"])
    assert export_env.ckpt_path.read_bytes() == before


def test_the_kind_of_a_checkpoint_is_decided_by_its_content(export_env):
    training = torch.load(export_env.ckpt_path, weights_only=True)
    hw = export(export_env)
    assert is_training_checkpoint(training) and not is_hardware_checkpoint(training)
    assert is_hardware_checkpoint(hw) and not is_training_checkpoint(hw)
    assert not is_training_checkpoint({k: v for k, v in training.items() if k != "tokenizer_kw"})
    assert not is_training_checkpoint([1, 2]) and not is_hardware_checkpoint([1, 2])


def test_a_config_whose_in_feats_does_not_fit_the_features_is_refused(export_env):
    cfg = {**export_env.cfg, "rnnt": {**export_env.cfg["rnnt"], "in_feats": 23}}
    with pytest.raises(HardwareCheckpointError, match=r"in_feats \(23\) must equal .*\(8 \* 3 = 24\)"):
        create_hardware_ckpt(export_env.ckpt_path, cfg, skip_state_dict_check=True)


def test_the_finalize_export_uses_each_checkpoints_recorded_config_else_the_runs(export_env, capsys):
    described = self_describing(export_env)
    # The YAML on disk changes after training; only the old-layout checkpoint may use the run's config.
    export_env.config_path.write_text(
        export_env.config_path.read_text().replace("enc_n_hid: 16", "enc_n_hid: 32")
    )
    lines = []
    ctx = FinalizeContext(
        best_path=described,
        last_path=export_env.ckpt_path,
        config_path=export_env.config_path,
        dist=DistInfo(),
        reason="finished",
        config=export_env.cfg,
        log=lines.append,
    )
    HardwareExportCallback(skip_ngram=True, skip_state_dict_check=True)(ctx)
    assert lines == [
        f"hardware checkpoint written: {shown_path(hw_path(p))}" for p in (described, export_env.ckpt_path)
    ]
    for path in (described, export_env.ckpt_path):
        assert read_checkpoint(hw_path(path))["rnnt_config"] == inference_only_config(export_env.cfg)
