"""The finalize conversion callback on a real tiny run directory: bundles written, failures reported
with the exact converter command, other ranks idle."""

import argparse
import importlib.util
import json
import shlex
from pathlib import Path

import pytest

from caiman_asr_train.core.errors import UserError
from caiman_asr_train.export import convert
from caiman_asr_train.export.checkpointer import asset_sha256
from caiman_asr_train.export.hardware_ckpt import create_hardware_ckpt, hw_path, save_hardware_ckpt
from caiman_asr_train.rnnt import config
from caiman_asr_train.train_utils.callbacks import ExportFailed, FinalizeContext
from caiman_asr_train.train_utils.conversion import ConversionCallback, add_export_args
from caiman_asr_train.train_utils.distributed import DistInfo

# The real tiny checkpoint artefacts of tests/export/conftest.py (importlib mode gives test folders no package).
_spec = importlib.util.spec_from_file_location(
    "_export_checkpoint_fixtures", Path(__file__).resolve().parents[1] / "export" / "conftest.py"
)
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
spm_model, kenlm_files, mel_stats, export_env = (
    _fixtures.spm_model,
    _fixtures.kenlm_files,
    _fixtures.mel_stats,
    _fixtures.export_env,
)


@pytest.fixture
def finished_run(export_env) -> FinalizeContext:
    """What the finalize hook sees after training: best and last checkpoints and their .hw.pt files."""
    cfg = config.load(export_env.config_path)
    results = export_env.dir / "results"
    for name, step in (("RNN-T_last_checkpoint.pt", 20), ("RNN-T_best_checkpoint.pt", 15)):
        path = export_env.save(results / name, step=step, config=cfg, asset_sha256=asset_sha256(cfg))
        with pytest.warns(UserWarning, match="software use only"):
            hw = create_hardware_ckpt(path, skip_state_dict_check=True)
        save_hardware_ckpt(hw, hw_path(path))
    return finalize_context(results, export_env.config_path, rank=0)


def finalize_context(results: Path, config_path: Path, rank: int) -> FinalizeContext:
    return FinalizeContext(
        best_path=results / "RNN-T_best_checkpoint.pt",
        last_path=results / "RNN-T_last_checkpoint.pt",
        config_path=config_path,
        dist=DistInfo(rank=rank, world_size=2),
        reason="finished",
    )


def parse(*argv: str) -> argparse.Namespace:
    """train.py's arguments that the callback reads."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir")
    parser.add_argument("--dataset_dir", default="datasets/demo")
    parser.add_argument("--val_manifests", nargs="+", default=["dev.json"])
    add_export_args(parser)
    return parser.parse_args(list(argv))


def test_the_callback_writes_every_configured_bundle_from_the_best_hardware_checkpoint(finished_run, capsys):
    results = finished_run.best_path.parent
    callback = ConversionCallback.from_args(
        parse("--output_dir", str(results), "--export_servers", "onnxruntime,sherpa-onnx")
    )

    callback(finished_run)

    for server in ("onnxruntime", "sherpa-onnx"):
        manifest = json.loads((results / "inference/results/best" / server / "manifest.json").read_text())
        assert manifest["source"]["url"] == str(results / "RNN-T_best_checkpoint.hw.pt")
        assert manifest["source"]["step"] == 15
    assert "onnxruntime artefacts written" in capsys.readouterr().out


def test_a_failed_conversion_prints_the_command_that_redoes_it_and_keeps_the_checkpoints(
    finished_run, capsys
):
    results = finished_run.best_path.parent
    best_hw = results / "RNN-T_best_checkpoint.hw.pt"
    intact = best_hw.read_bytes()
    best_hw.write_bytes(intact[: len(intact) // 2])
    before = {p.name: p.read_bytes() for p in results.iterdir()}
    callback = ConversionCallback.from_args(
        parse("--output_dir", str(results), "--export_servers", "onnxruntime")
    )

    with pytest.raises(ExportFailed):
        callback(finished_run)

    err = capsys.readouterr().err
    assert "truncated or corrupt" in err
    command = shlex.split(err.strip().splitlines()[-1])
    assert command[0] == "caiman-convert"
    assert {p.name: p.read_bytes() for p in results.iterdir() if p.is_file()} == before
    best_hw.write_bytes(intact)
    assert convert.main(command[1:]) == 0
    assert (results / "inference/results/best/onnxruntime/manifest.json").is_file()


def test_other_ranks_do_nothing(finished_run):
    results = finished_run.best_path.parent
    callback = ConversionCallback.from_args(
        parse("--output_dir", str(results), "--export_servers", "onnxruntime")
    )

    callback(finalize_context(results, finished_run.config_path, rank=1))

    assert not (results / "inference").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--export_servers", "tensorrt"], "unknown server"),
        (["--export_servers", "myrtle-fpga"], "always written"),
        (["--export_servers", "onnxruntime", "--export_quantize_type", "int3"], "unknown type"),
    ],
)
def test_bad_export_flags_are_refused_when_the_callback_is_made(tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        ConversionCallback.from_args(parse("--output_dir", str(tmp_path), *flags))


def test_without_export_servers_there_is_no_callback(tmp_path):
    assert ConversionCallback.from_args(parse("--output_dir", str(tmp_path))) is None
