"""The batch converter over real tiny checkpoints: every target with a manifest, reruns, kills, bad arguments."""

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from caiman_asr_train.deploy.triton import validate_triton_repository
from caiman_asr_train.export.checkpointer import asset_sha256
from caiman_asr_train.export.convert import MANIFEST_NAME, main, select_sources
from caiman_asr_train.export.hardware_ckpt import (
    create_hardware_ckpt,
    save_hardware_ckpt,
)
from caiman_asr_train.rnnt import config
from caiman_asr_train.utils.cli import run_cli

SERVERS = "myrtle-fpga,onnxruntime,sherpa-onnx,triton"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def run_dir(export_env) -> Path:
    """A training run's output directory as train.py leaves it: step, last and best checkpoints that
    record their config, and the best one exported to .hw.pt."""
    # 25 ms windows, as the demo config and sherpa-onnx's front end use.
    config_path = export_env.config_path
    config_path.write_text(config_path.read_text().replace("window_size: 0.02", "window_size: 0.025"))
    cfg = config.load(config_path)
    results = export_env.dir / "results"
    for name, step in (
        ("RNN-T_step10_checkpoint.pt", 10),
        ("RNN-T_last_checkpoint.pt", 20),
        ("RNN-T_best_checkpoint.pt", 15),
    ):
        export_env.save(results / name, step=step, config=cfg, asset_sha256=asset_sha256(cfg))
    hw = create_hardware_ckpt(results / "RNN-T_best_checkpoint.pt", skip_state_dict_check=True)
    save_hardware_ckpt(hw, results / "RNN-T_best_checkpoint.hw.pt")
    return results


def convert(*argv: str) -> int:
    """Run the command line in-process, as ``caiman-convert`` would; return its exit status."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(list(argv)))
    return exit_info.value.code


def check_target(fs: fsspec.AbstractFileSystem, target: str, source_bytes: bytes, step: int) -> dict:
    manifest = json.loads(fs.cat_file(f"{target}/{MANIFEST_NAME}"))
    listed = {
        Path(p).relative_to(Path(target)).as_posix() for p in fs.find(target) if not p.endswith(MANIFEST_NAME)
    }
    assert set(manifest["files"]) == listed and listed
    for name, entry in manifest["files"].items():
        data = fs.cat_file(f"{target}/{name}")
        assert entry == {"sha256": sha256(data), "size": len(data)}
    assert manifest["source"]["sha256"] == sha256(source_bytes)
    assert manifest["source"]["step"] == step
    assert manifest["tool"]["name"] == "caiman_asr_train" and manifest["tool"]["version"]
    return manifest


@pytest.mark.parametrize("scheme", ["local", "file", "memory"])
def test_every_target_is_written_with_a_manifest_of_its_files_and_source(run_dir, tmp_path, scheme):
    output = {
        "local": str(tmp_path / "out"),
        "file": f"file://{tmp_path}/out",
        "memory": f"memory://convert-{os.getpid()}/out",
    }[scheme]
    assert (
        convert(
            "--input_directory",
            str(run_dir),
            "--inference_server",
            SERVERS,
            "--output_directory",
            output,
            "--model_name",
            "demo",
            "--version",
            "7",
        )
        == 0
    )

    fs, root = fsspec.core.url_to_fs(output)
    source = (run_dir / "RNN-T_best_checkpoint.hw.pt").read_bytes()
    targets = sorted(Path(p).name for p in fs.ls(f"{root}/demo/7", detail=False))
    assert targets == ["myrtle-fpga", "onnxruntime", "sherpa-onnx", "triton"]
    for server in targets:
        manifest = check_target(fs, f"{root}/demo/7/{server}", source, step=15)
        assert manifest["options"]["server"] == server
    assert any(
        name.endswith(".hw.pt")
        for name in json.loads(fs.cat_file(f"{root}/demo/7/myrtle-fpga/manifest.json"))["files"]
    )
    if scheme == "memory":
        fs.rm(root, recursive=True)
    else:
        assert validate_triton_repository(tmp_path / "out/demo/7/triton/model_repository")
        assert not list((tmp_path / "out").rglob(".*")), "partial directories left behind"


def test_a_rerun_skips_every_target_and_rewrites_nothing(run_dir, tmp_path, capsys):
    argv = [
        "--input_directory",
        str(run_dir),
        "--inference_server",
        "myrtle-fpga",
        "onnxruntime",
        "--output_directory",
        str(tmp_path / "out"),
    ]
    assert convert(*argv) == 0
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    capsys.readouterr()

    assert convert(*argv) == 0

    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == files
    assert capsys.readouterr().out.count("up to date:") == 2


def test_a_changed_source_is_converted_again(run_dir, tmp_path, export_env):
    argv = [
        "--ckpt",
        str(run_dir / "RNN-T_last_checkpoint.pt"),
        "--inference_server",
        "myrtle-fpga",
        "--output_directory",
        str(tmp_path / "out"),
    ]
    assert convert(*argv) == 0
    cfg = config.load(export_env.config_path)
    export_env.save(run_dir / "RNN-T_last_checkpoint.pt", step=30, config=cfg, asset_sha256=asset_sha256(cfg))

    assert convert(*argv) == 0

    check_target(
        fsspec.filesystem("file"),
        str(tmp_path / "out/caiman-asr/1/myrtle-fpga"),
        (run_dir / "RNN-T_last_checkpoint.pt").read_bytes(),
        step=30,
    )


def test_select_all_gives_each_checkpoint_its_version_and_an_index_picks_one(run_dir, tmp_path):
    labels = [s.label for s in select_sources(str(run_dir), "all")]
    assert labels == ["best", "last", "step10"]
    assert select_sources(str(run_dir), "best")[0].url.endswith("RNN-T_best_checkpoint.hw.pt")

    assert (
        convert(
            "--input_directory",
            str(run_dir),
            "--select",
            "all",
            "--checkpoint_index",
            "1",
            "--inference_server",
            "myrtle-fpga",
            "--output_directory",
            str(tmp_path / "out"),
        )
        == 0
    )
    assert [p.name for p in (tmp_path / "out/caiman-asr").iterdir()] == ["1-last"]
    assert (
        convert(
            "--input_directory",
            str(run_dir),
            "--select",
            "all",
            "--checkpoint_index",
            "3",
            "--inference_server",
            "myrtle-fpga",
            "--output_directory",
            str(tmp_path / "out2"),
        )
        == 0
    )
    assert not (tmp_path / "out2").exists()


def test_a_run_killed_midway_is_completed_by_the_rerun_with_no_partial_target(run_dir, tmp_path):
    output = tmp_path / "out"
    argv = [
        sys.executable,
        "-m",
        "caiman_asr_train.export.convert",
        "--input_directory",
        str(run_dir),
        "--select",
        "all",
        "--inference_server",
        "myrtle-fpga,onnxruntime",
        "--output_directory",
        str(output),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while (
        not list(output.glob("*/*/*/manifest.json"))
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = set(output.glob("*/*/*/manifest.json"))
    assert 0 < len(done_before) < 6

    subprocess.run(argv, env=env, check=True, capture_output=True)

    targets = [p for p in output.glob("*/*/*") if p.is_dir()]
    assert len(targets) == 6 and all((t / MANIFEST_NAME).is_file() for t in targets)
    assert not [p for p in output.rglob(".*")], "partial directories left behind"
    for manifest_path in done_before:
        before = json.loads(manifest_path.read_text())
        assert check_target(
            fsspec.filesystem("file"),
            str(manifest_path.parent),
            Path(before["source"]["url"]).read_bytes(),
            before["source"]["step"],
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--inference_server", "tensorrt"], "unknown server"),
        (["--inference_server", "myrtle-fpga", "--quantize_weights"], "takes float32 weights only"),
        (["--inference_server", "onnxruntime", "--quantize_type", "int3"], "unknown type"),
        (["--inference_server", "onnxruntime", "--checkpoint_index", "-1"], "must be 0 or more"),
        (["--inference_server", "onnxruntime", "--max_wer_increase", "-2"], "must be 0 or more"),
        (["--inference_server", "onnxruntime", "--model_name", "a/b"], "without '/'"),
        (
            ["--inference_server", "onnxruntime", "--select", "last", "--input_directory", "{empty}"],
            "holds no last",
        ),
        (["--inference_server", "onnxruntime", "--input_directory", "{missing}"], "is not a directory"),
        (["--inference_server", "onnxruntime", "--ckpt", "{missing}/x.pt"], "not found"),
        (
            ["--inference_server", "onnxruntime", "--output_directory", "gs://bucket/models"],
            "caiman_asr_train[gcs]",
        ),
        (
            ["--inference_server", "onnxruntime", "--output_directory", "s3://bucket/models"],
            "caiman_asr_train[s3]",
        ),
        (
            [
                "--inference_server",
                "onnxruntime",
                "--ckpt",
                "{run}/RNN-T_last_checkpoint.pt",
                "--input_directory",
                "{run}",
            ],
            "not allowed with",
        ),
        (["--input_directory", "{run}"], "required: --inference_server"),
    ],
)
def test_every_bad_argument_gives_one_line_and_exit_2_before_any_work(
    run_dir, tmp_path, capsys, argv, message
):
    (tmp_path / "empty").mkdir()
    paths = {"empty": tmp_path / "empty", "missing": tmp_path / "missing", "run": run_dir}
    argv = [a.format(**paths) for a in argv]
    if not {"--input_directory", "--ckpt"} & set(argv):
        argv += ["--input_directory", str(run_dir)]
    if "--output_directory" not in argv:
        argv += ["--output_directory", str(tmp_path / "out")]
    before = sorted(run_dir.iterdir())

    assert convert(*argv) == 2

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()
    assert sorted(run_dir.iterdir()) == before


def test_an_object_store_run_directory_is_read_and_quantized_targets_get_their_own_directory(
    run_dir, tmp_path
):
    fs = fsspec.filesystem("memory")
    remote = f"/runs-{os.getpid()}/demo"
    for path in run_dir.iterdir():
        fs.pipe_file(f"{remote}/{path.name}", path.read_bytes())
    try:
        assert (
            convert(
                "--input_directory",
                f"memory://{remote}",
                "--inference_server",
                "onnxruntime",
                "--quantize_type",
                "int8_per_channel",
                "--output_directory",
                str(tmp_path / "out"),
            )
            == 0
        )
    finally:
        fs.rm(remote, recursive=True)

    target = tmp_path / "out/caiman-asr/1/onnxruntime-int8_per_channel"
    manifest = check_target(
        fsspec.filesystem("file"),
        str(target),
        (run_dir / "RNN-T_best_checkpoint.hw.pt").read_bytes(),
        step=15,
    )
    assert manifest["source"]["url"] == f"memory://{remote}/RNN-T_best_checkpoint.hw.pt"
    assert manifest["options"]["quantize_type"] == "int8_per_channel"
    assert json.loads((target / "bundle.json").read_text())["quantize_type"] == "int8_per_channel"


# Speech and a model fitted to it, from tests/deploy/conftest.py (importlib mode gives test folders no package).
_spec = importlib.util.spec_from_file_location(
    "_deploy_fixtures", Path(__file__).resolve().parents[1] / "deploy" / "conftest.py"
)
_deploy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_deploy)
speech, tiny_hw = _deploy.speech, _deploy.tiny_hw


def test_the_manifest_records_the_wer_gate_of_a_verified_quantized_target(tiny_hw, speech, tmp_path):
    assert (
        convert(
            "--ckpt",
            str(tiny_hw.hw_path),
            "--inference_server",
            "onnxruntime",
            "--quantize_weights",
            "--verify_manifests",
            str(speech.manifest),
            "--dataset_dir",
            str(speech.dir),
            "--max_wer_increase",
            "100",
            "--output_directory",
            str(tmp_path / "out"),
        )
        == 0
    )

    manifest = json.loads(
        (tmp_path / "out/caiman-asr/1/onnxruntime-int8_per_channel/manifest.json").read_text()
    )
    wer = manifest["wer"]
    assert wer["manifests"] == [str(speech.manifest)] and wer["utterances"] == len(speech.texts)
    assert 0 <= wer["pytorch"] and 0 <= wer["export"]
    assert manifest["options"]["verify_manifests"] == [str(speech.manifest)]
