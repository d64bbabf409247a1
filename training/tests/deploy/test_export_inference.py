"""export_inference and its CLI: every target, atomic output, verification, refusals and the real sherpa-onnx."""

import pytest
import torch

from caiman_asr_train.core.errors import ExportError, UserError
from caiman_asr_train.core.load_hw import load_hw_checkpoint
from caiman_asr_train.export.inference import export_inference, main, sherpa_transcriber
from caiman_asr_train.runtime import Recognizer
from caiman_asr_train.runtime.bundle import read_bundle
from caiman_asr_train.utils.cli import run_cli


@pytest.fixture
def hw_path(tiny_hw):
    return tiny_hw.hw_path


def test_onnxruntime_export_decodes_exactly_like_pytorch(hw_path, speech, tmp_path, capsys):
    summary = export_inference(
        hw_path,
        "onnxruntime",
        tmp_path / "bundle",
        verify_manifests=[speech.manifest],
        dataset_dir=speech.dir,
    )
    assert summary["wer"]["identical"] == 1.0
    assert summary["wer"]["export"] == summary["wer"]["pytorch"]
    assert summary["step"] == 42
    assert {
        "features.onnx",
        "encoder.onnx",
        "predictor.onnx",
        "joint.onnx",
        "tokenizer.model",
        "bundle.json",
    } == set(summary["files"])
    assert "identical transcripts 100.0% (4/4)" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no partial or scratch directories left


def test_sherpa_onnx_bundle_loads_and_transcribes_in_sherpa_onnx(hw_path, speech, tiny_hw, tmp_path):
    summary = export_inference(hw_path, "sherpa-onnx", tmp_path / "sherpa")
    assert summary["files"] == ["decoder.onnx", "encoder.onnx", "joiner.onnx", "tokens.txt"]
    lines = (tmp_path / "sherpa/tokens.txt").read_text().splitlines()
    assert lines[-1] == f"<blk> {tiny_hw.model.config.blank_idx}"
    transcribe = sherpa_transcriber(tmp_path / "sherpa", 16000, tiny_hw.features["n_filt"])
    texts = [transcribe(audio) for audio in speech.audio]
    assert all(len(text) > 10 for text in texts)
    assert set("".join(texts)) <= set("abcdefghijklmnopqrstuvwxyz' ")


def test_a_training_checkpoint_is_exported_without_writing_beside_it(tiny_hw, tmp_path):
    before = sorted(p.name for p in tiny_hw.training_path.parent.iterdir())
    summary = export_inference(tiny_hw.training_path, "pytorch", tmp_path / "out", config=tiny_hw.config_path)
    assert sorted(p.name for p in tiny_hw.training_path.parent.iterdir()) == before
    loaded = load_hw_checkpoint(tmp_path / "out" / "model.hw.pt")
    assert loaded.step == 42 and summary["files"] == ["model.hw.pt"]
    for name, tensor in tiny_hw.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor)


def test_an_existing_output_is_kept_unless_overwrite(hw_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty; pass --overwrite"):
        export_inference(hw_path, "myrtle-fpga", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.warns(UserWarning, match="no FPGA-supported model"):
        export_inference(hw_path, "myrtle-fpga", out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["model.hw.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def run_cli_main(argv: list[str]) -> int:
    """The exit status of the command line with ``argv``, run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    return exit_info.value.code


def test_cli_refuses_quantized_fpga_exports_in_one_line(hw_path, tmp_path, capsys):
    argv = [
        "--ckpt",
        str(hw_path),
        "--target",
        "myrtle-fpga",
        "--output_dir",
        str(tmp_path / "out"),
        "--quantize_weights",
    ]
    assert run_cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "float32 weights only" in err
    assert not (tmp_path / "out").exists()


def test_cli_names_a_foreign_source_file(tmp_path, capsys):
    source = tmp_path / "notes.pt"
    torch.save({"hello": torch.zeros(1)}, source)
    assert (
        run_cli_main(
            ["--ckpt", str(source), "--target", "onnxruntime", "--output_dir", str(tmp_path / "out")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a hardware checkpoint" in err


def test_a_quantized_bundle_passes_the_wer_gate_and_records_its_type(hw_path, speech, tmp_path):
    summary = export_inference(
        hw_path,
        "onnxruntime",
        tmp_path / "int8",
        verify_manifests=[speech.manifest],
        quantize_type="int8_per_channel",
        max_wer_increase=1000.0,
    )
    info = read_bundle(tmp_path / "int8")
    assert info["quantize_type"] == "int8_per_channel"
    assert info["wer"] == summary["wer"] and 0 <= summary["wer"]["identical"] <= 1
    assert Recognizer(tmp_path / "int8").transcribe(speech.audio[0])


def test_a_quantized_export_that_fails_the_wer_gate_writes_nothing(hw_path, speech, tmp_path):
    # a negative allowance fails even when quantization costs nothing
    with pytest.raises(UserError, match="nothing was written"):
        export_inference(
            hw_path,
            "onnxruntime",
            tmp_path / "int4",
            verify_manifests=[speech.manifest],
            quantize_type="int4_blockwise",
            block_size=16,
            max_wer_increase=-1000.0,
        )
    assert list(tmp_path.iterdir()) == []


def test_a_quantized_pytorch_export_writes_a_q_pt_that_decodes(hw_path, speech, tmp_path):
    summary = export_inference(
        hw_path,
        "pytorch",
        tmp_path / "q",
        verify_manifests=[speech.manifest],
        quantize_type="int8_per_channel",
        max_wer_increase=1000.0,
    )
    assert summary["files"] == ["model.q.pt"]
    assert summary["wer"]["utterances"] == len(speech.texts) and summary["wer"]["export"] >= 0
