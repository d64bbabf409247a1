"""One entry point that exports a checkpoint for every inference server (docs/formats.md section 13).

    python -m caiman_asr_train.export.inference --ckpt results/RNN-T_best_checkpoint.hw.pt \\
        --target onnxruntime --output_dir exports/demo-onnxruntime \\
        --verify_manifests datasets/demo/dev.json

``--ckpt`` is a hardware checkpoint (``*.hw.pt``) or a training checkpoint,
which is made into a hardware checkpoint in memory (never written beside it).
Targets and what ``--output_dir`` receives:

    myrtle-fpga   model.hw.pt (float32: the FPGA server applies its own number format)
    onnxruntime   features/encoder/predictor/joint.onnx, tokenizer.model, [ngram.binary], bundle.json
                  (run it with caiman_asr_train.runtime, torch-free)
    sherpa-onnx   encoder.onnx, decoder.onnx, joiner.onnx, tokens.txt (model_type="nemo_transducer")
    pytorch       model.hw.pt, or model.q.pt with --quantize_weights

The directory is built beside ``--output_dir`` and renamed into place, so it
is either complete or absent; an existing non-empty one is refused unless
``--overwrite``. With ``--verify_manifests`` the manifests are decoded with
the exported artefact and with the PyTorch model (greedy, no dither) and both
WERs and the fraction of identical transcripts are printed. With
``--quantize_weights`` the quantized artefact must not lose more than
``--max_wer_increase`` WER points against the float model on those manifests,
or nothing is written.
"""

import argparse
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch

from caiman_asr_train.core.decoder import greedy_decode
from caiman_asr_train.core.errors import CheckpointError, ExportError
from caiman_asr_train.core.load_hw import load_hw_checkpoint, read_checkpoint, validate_hw_checkpoint
from caiman_asr_train.data.features import FeaturePipeline, pad_audio
from caiman_asr_train.data.tokenizer import Tokenizer
from caiman_asr_train.deploy import DEFAULT_QUANTIZE_TYPE, QUANTIZE_TYPES
from caiman_asr_train.deploy.onnxruntime_bundle import FINAL_PADDING_SECS, HW_TEXT, write_onnxruntime_bundle
from caiman_asr_train.deploy.sherpa import write_sherpa_bundle
from caiman_asr_train.export.hardware_ckpt import create_hardware_ckpt, fpga_variant, save_hardware_ckpt
from caiman_asr_train.rnnt.config import load as load_config
from caiman_asr_train.runtime.bundle import read_bundle, write_bundle_json
from caiman_asr_train.runtime.evaluate import BundleResult, evaluate_transcriber
from caiman_asr_train.runtime.recognizer import Recognizer
from caiman_asr_train.utils.atomic import replace_directory
from caiman_asr_train.utils.cli import run_cli
from caiman_asr_train.utils.digest import sha256_file

PathLike = Union[str, Path]

TARGETS = ("myrtle-fpga", "onnxruntime", "sherpa-onnx", "pytorch")
HW_FILE = "model.hw.pt"
QUANTIZED_FILE = "model.q.pt"


def load_source(source: PathLike, config: PathLike | None = None) -> dict:
    """The hardware-checkpoint dict of ``source``: a ``.hw.pt`` as it is, a training checkpoint converted in memory.

    A training checkpoint uses ``config`` (YAML path), else the config path it
    recorded; the n-gram is embedded when the config names one. Its weights
    need not be an FPGA variant (non-FPGA targets run any size).

    Raises:
        CheckpointError: unreadable file, or neither kind of checkpoint.
        HardwareCheckpointError, ConfigError: the conversion is refused.
    """
    ckpt = read_checkpoint(source)
    if "rnnt_config" in ckpt:
        validate_hw_checkpoint(ckpt, str(source))
        return ckpt
    if "ema_state_dict" not in ckpt:
        raise CheckpointError(
            f"{source} is neither a hardware checkpoint (no 'rnnt_config') nor a training checkpoint "
            "(no 'ema_state_dict'); pass a checkpoint written by train.py or hardware_ckpt.py"
        )
    config = config if config is not None else ckpt.get("config_path")
    if config is None:
        raise CheckpointError(f"training checkpoint {source} records no config path; pass --config")
    cfg = load_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "software use only" is expected for non-FPGA sizes
        # the n-gram is optional here: greedy servers do not use it
        return create_hardware_ckpt(ckpt, cfg, skip_ngram=not cfg.get("ngram"), skip_state_dict_check=True)


def pytorch_transcriber(hw_path: PathLike) -> Callable[[np.ndarray], str]:
    """Greedy transcription of one waveform with the PyTorch model of a ``.hw.pt``: final padding, no dither."""
    loaded = load_hw_checkpoint(hw_path)
    data = loaded.data_config
    features = {**data["filterbank_features"], "dither": 0.0}
    pipeline = FeaturePipeline(features, data["frame_splicing"], data["melmeans"], data["melvars"]).eval()
    tokenizer = Tokenizer(loaded.sentpiece_model_binary)
    sample_rate = int(features["sample_rate"])

    @torch.no_grad()
    def transcribe(audio: np.ndarray) -> str:
        waveform, lens = pad_audio(
            torch.from_numpy(audio)[None], torch.tensor([len(audio)]), FINAL_PADDING_SECS, sample_rate
        )
        x, x_lens = pipeline(waveform, lens)
        return tokenizer.detokenize(greedy_decode(loaded.model, x, x_lens)[0])

    return transcribe


def sherpa_transcriber(directory: PathLike, sample_rate: int, n_filt: int) -> Callable[[np.ndarray], str]:
    """Greedy transcription with the sherpa-onnx package (offline NeMo transducer) of a sherpa bundle.

    The final padding of silence is appended, as the server does at the end of a stream.
    """
    import sherpa_onnx

    directory = Path(directory)
    recognizer = sherpa_onnx.OfflineRecognizer.from_transducer(
        encoder=str(directory / "encoder.onnx"),
        decoder=str(directory / "decoder.onnx"),
        joiner=str(directory / "joiner.onnx"),
        tokens=str(directory / "tokens.txt"),
        num_threads=1,
        sample_rate=sample_rate,
        feature_dim=n_filt,
        decoding_method="greedy_search",
        model_type="nemo_transducer",
    )
    padding = np.zeros(int(round(FINAL_PADDING_SECS * sample_rate)), np.float32)

    def transcribe(audio: np.ndarray) -> str:
        stream = recognizer.create_stream()
        stream.accept_waveform(sample_rate, np.concatenate([audio, padding]))
        recognizer.decode_stream(stream)
        return stream.result.text.strip()

    return transcribe


def _quantizer(target: str, quantize_type: str, block_size: int) -> Callable[[Path], str]:
    def quantize(directory: Path) -> str:
        from caiman_asr_train.deploy.quantize import quantize_onnx_bundle

        quantize_onnx_bundle(directory, target, quantize_type, block_size)
        return quantize_type

    return quantize


def _write_target(
    hw: dict, target: str, directory: Path, sha256: str, quantize_type: str | None, block_size: int
) -> None:
    """Write ``target``'s files for ``hw`` into the new, empty ``directory``."""
    if target == "myrtle-fpga":
        if fpga_variant(hw["state_dict"]) is None:
            warnings.warn(
                "the weights match no FPGA-supported model (base or large): the FPGA server cannot run "
                f"{directory.name}/{HW_FILE}; it is for software use only",
                stacklevel=2,
            )
        save_hardware_ckpt(hw, directory / HW_FILE)
    elif target == "pytorch":
        if quantize_type is None:
            save_hardware_ckpt(hw, directory / HW_FILE)
        else:
            from caiman_asr_train.deploy.quantize import write_quantized_checkpoint

            write_quantized_checkpoint(hw, directory / QUANTIZED_FILE, quantize_type, block_size)
    elif target == "onnxruntime":
        quantize = None if quantize_type is None else _quantizer(target, quantize_type, block_size)
        write_onnxruntime_bundle(hw, directory, sha256, quantize=quantize)
    else:
        write_sherpa_bundle(hw, directory, sha256)
        if quantize_type is not None:
            _quantizer(target, quantize_type, block_size)(directory)


def _artefact_transcriber(hw: dict, target: str, directory: Path, quantize_type: str | None) -> Callable:
    features = hw["rnnt_config"]["input_val"]["filterbank_features"]
    if target == "onnxruntime":
        return Recognizer(directory).transcribe
    if target == "sherpa-onnx":
        return sherpa_transcriber(directory, int(features["sample_rate"]), int(features["n_filt"]))
    return pytorch_transcriber(directory / (QUANTIZED_FILE if quantize_type else HW_FILE))


def _verify(
    hw: dict,
    target: str,
    directory: Path,
    quantize_type: str | None,
    manifests: Sequence[PathLike],
    dataset_dir: PathLike,
    max_wer_increase: float,
    num_utterances: int | None,
) -> dict:
    """Decode ``manifests`` with the artefact in ``directory`` and with the float PyTorch model; apply the gate."""
    sample_rate = int(hw["rnnt_config"]["input_val"]["filterbank_features"]["sample_rate"])
    text = {"labels": list(hw["rnnt_config"]["tokenizer"]["labels"]), **HW_TEXT}
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".reference-") as scratch:
        reference_path = Path(scratch) / HW_FILE
        save_hardware_ckpt(hw, reference_path)

        def score(transcribe: Callable[[np.ndarray], str]) -> BundleResult:
            return evaluate_transcriber(
                transcribe,
                manifests,
                dataset_dir,
                sample_rate=sample_rate,
                text=text,
                num_utterances=num_utterances,
            )

        reference: BundleResult = score(pytorch_transcriber(reference_path))
        exported: BundleResult = score(_artefact_transcriber(hw, target, directory, quantize_type))
    same = sum(a["hyp"] == b["hyp"] for a, b in zip(reference.predictions, exported.predictions))
    result = {
        "manifests": [str(m) for m in manifests],
        "utterances": len(reference.predictions),
        "pytorch": reference.wer,
        "export": exported.wer,
        "identical": same / max(1, len(reference.predictions)),
    }
    print(
        f"PyTorch greedy WER {reference.wer * 100:.3f}%, {target}"
        f"{' ' + quantize_type if quantize_type else ''} WER {exported.wer * 100:.3f}%, identical transcripts "
        f"{result['identical'] * 100:.1f}% ({same}/{len(reference.predictions)})"
    )
    if quantize_type is not None:
        from caiman_asr_train.deploy.quantize import wer_gate

        wer_gate(reference.wer, exported.wer, max_wer_increase, quantize_type)
    return result


def _prepare_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"--output_dir {output_dir} is a file; pass a directory path")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ExportError(
            f"--output_dir {output_dir} exists and is not empty; pass --overwrite or another directory"
        )


def export_inference(
    source: PathLike,
    target: str,
    output_dir: PathLike,
    *,
    overwrite: bool = False,
    verify_manifests: Sequence[PathLike] | None = None,
    dataset_dir: PathLike | None = None,
    quantize_type: str | None = None,
    block_size: int = 128,
    max_wer_increase: float = 1.0,
    config: PathLike | None = None,
    num_utterances: int | None = None,
) -> dict:
    """Export ``source`` for ``target`` into ``output_dir`` atomically; return a summary.

    Args:
        source: a ``.hw.pt`` or a training checkpoint (converted in memory).
        target: one of ``TARGETS``.
        output_dir: the directory to create (or, with ``overwrite``, replace).
        verify_manifests: decode these with the artefact and with PyTorch.
        dataset_dir: the manifests' audio root (default: the first manifest's directory).
        quantize_type: one of ``QUANTIZE_TYPES``, or None for float32 weights.
        block_size: input-axis block of the blockwise types.
        max_wer_increase: the quantization gate, in absolute WER points.
        config: YAML config of a training checkpoint (default: the one it recorded).
        num_utterances: verify on the first N utterances only.

    Returns:
        ``{"target", "output_dir", "files", "source", "source_sha256", "step",
        "quantize_type", "wer"}``; ``wer`` is None without ``verify_manifests``,
        else ``{"manifests", "utterances", "pytorch": the float PyTorch model's
        WER, "export": the artefact's WER, "identical"}`` (rates and the
        identical fraction as fractions).

    Raises:
        ExportError: unknown target, quantization for myrtle-fpga, or output in the way.
        UserError: the quantized artefact failed the WER gate (nothing is written).
        CheckpointError, HardwareCheckpointError, ConfigError, DataError: bad inputs.
    """
    if target not in TARGETS:
        raise ExportError(f"--target {target!r} is not one of {', '.join(TARGETS)}")
    if quantize_type is not None and target == "myrtle-fpga":
        raise ExportError(
            "--target myrtle-fpga takes float32 weights only (the FPGA server applies its own number format); "
            "drop --quantize_weights"
        )
    if quantize_type is not None and quantize_type not in QUANTIZE_TYPES:
        raise ExportError(f"--quantize_type {quantize_type!r} is not one of {', '.join(QUANTIZE_TYPES)}")
    source, output_dir = Path(source), Path(output_dir)
    _prepare_output(output_dir, overwrite)
    hw = load_source(source, config)
    sha256 = sha256_file(source)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.partial-"))
    try:
        _write_target(hw, target, built, sha256, quantize_type, block_size)
        wer = None
        if verify_manifests:
            manifests = list(verify_manifests)
            root = Path(dataset_dir) if dataset_dir is not None else Path(manifests[0]).parent
            wer = _verify(hw, target, built, quantize_type, manifests, root, max_wer_increase, num_utterances)
            if target == "onnxruntime":
                write_bundle_json({**read_bundle(built), "wer": wer}, built)
        files = sorted(p.name for p in built.iterdir())
        replace_directory(built, output_dir)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    return {
        "target": target,
        "output_dir": str(output_dir),
        "files": files,
        "source": str(source),
        "source_sha256": sha256,
        "step": int(hw["step"]),
        "quantize_type": quantize_type,
        "wer": wer,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Export a checkpoint for an inference server (FPGA, ONNX Runtime, sherpa-onnx or PyTorch)."
    )
    parser.add_argument(
        "--ckpt", required=True, type=Path, help="hardware checkpoint (*.hw.pt) or training checkpoint"
    )
    parser.add_argument("--target", required=True, choices=TARGETS, help="the server to export for")
    parser.add_argument(
        "--output_dir", required=True, type=Path, help="directory to create with the exported files"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML config of a training checkpoint (default: the one it recorded)",
    )
    parser.add_argument(
        "--verify_manifests",
        nargs="+",
        default=None,
        help="decode these manifests with the export and with PyTorch; print both WERs and the identical fraction",
    )
    parser.add_argument(
        "--dataset_dir",
        type=Path,
        default=None,
        help="audio root of the manifests (default: first manifest's directory)",
    )
    parser.add_argument(
        "--num_utterances", type=int, default=None, help="verify on the first N utterances only"
    )
    parser.add_argument(
        "--quantize_weights",
        action="store_true",
        help="store weights quantized (not for myrtle-fpga; see --quantize_type)",
    )
    parser.add_argument(
        "--quantize_type",
        choices=QUANTIZE_TYPES,
        default=None,
        help=f"weight format (default with --quantize_weights: {DEFAULT_QUANTIZE_TYPE})",
    )
    parser.add_argument(
        "--block_size", type=int, default=128, help="input-axis block of the blockwise types (default: 128)"
    )
    parser.add_argument(
        "--max_wer_increase",
        type=float,
        default=1.0,
        help="largest WER increase, in absolute points, quantization may cause on --verify_manifests (default: 1.0)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quantize_type is not None and not args.quantize_weights:
        raise ExportError("--quantize_type needs --quantize_weights")
    if args.num_utterances is not None and args.num_utterances < 1:
        raise ExportError(f"--num_utterances must be >= 1, got {args.num_utterances}")
    quantize_type = (args.quantize_type or DEFAULT_QUANTIZE_TYPE) if args.quantize_weights else None
    summary = export_inference(
        args.ckpt,
        args.target,
        args.output_dir,
        overwrite=args.overwrite,
        verify_manifests=args.verify_manifests,
        dataset_dir=args.dataset_dir,
        quantize_type=quantize_type,
        block_size=args.block_size,
        max_wer_increase=args.max_wer_increase,
        config=args.config,
        num_utterances=args.num_utterances,
    )
    print(f"{args.target}: wrote {', '.join(summary['files'])} to {summary['output_dir']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
