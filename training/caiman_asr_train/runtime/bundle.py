"""``bundle.json``: the description of an ONNX Runtime bundle directory, its one reader and writer.

A bundle directory (written by ``python -m caiman_asr_train.export.inference
--target onnxruntime``) holds ``features.onnx``, ``encoder.onnx``,
``predictor.onnx``, ``joint.onnx``, ``tokenizer.model``, optionally
``ngram.binary``, and ``bundle.json``:

    format          "caiman-asr-onnxruntime-bundle"
    layout_version  BUNDLE_VERSION ("MAJOR.MINOR.PATCH"; readers refuse a newer MAJOR.MINOR)
    source          {"sha256": hex of the checkpoint file, "step": int, "epoch": int,
                     "hw_version": the hardware-checkpoint layout it came from}
    model           {"n_classes", "blank_id", "enc_n_hid", "enc_pre_rnn_layers", "enc_post_rnn_layers",
                     "pred_n_hid", "pred_rnn_layers"}
    features        {"sample_rate" (Hz), "win_length", "hop_length", "initial_padding" (samples),
                     "final_padding_secs" (seconds of silence appended at the end of a stream),
                     "n_filt", "frame_stacking", "frame_subsampling"}
    chunk_frames    feature frames per encoder step unit: frame_subsampling * enc_stack_time_factor
    text            {"labels", "normalize_transcripts", "standardize_wer", "error_rate"}: how WER is scored
    quantize_type   null, or one of the weight quantization types
    wer             null, or {"manifests", "utterances", "pytorch", "export", "identical"} from
                    --verify_manifests (WERs of the float PyTorch model and of this bundle, and the
                    fraction of identical transcripts, all as fractions)
    files           {file name: sha256 hex}: every other file of the bundle

Only the standard library and core errors are imported, so the torch-free
runtime can read bundles.
"""

import json
from pathlib import Path
from typing import Any, Union

from caiman_asr_train.core.errors import CheckpointError
from caiman_asr_train.utils.atomic import atomic_write_bytes
from caiman_asr_train.utils.digest import sha256_file

PathLike = Union[str, Path]

BUNDLE_FORMAT = "caiman-asr-onnxruntime-bundle"
BUNDLE_VERSION = "1.0.0"
BUNDLE_JSON = "bundle.json"
GRAPHS = ("features", "encoder", "predictor", "joint")
TOKENIZER_FILE = "tokenizer.model"
NGRAM_FILE = "ngram.binary"
SECTIONS = ("source", "model", "features", "chunk_frames", "text", "files")
_EXPORT_HINT = (
    "export it again with python -m caiman_asr_train.export.inference --target onnxruntime --overwrite"
)


def bundle_description(directory: PathLike, **sections: Any) -> dict:
    """The ``bundle.json`` dict for the files now in ``directory`` (their sha256) and ``sections``.

    ``sections`` gives ``source``, ``model``, ``features``, ``chunk_frames``,
    ``text``, and optionally ``quantize_type`` and ``wer``.
    """
    directory = Path(directory)
    files = {
        p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != BUNDLE_JSON
    }
    return {
        "format": BUNDLE_FORMAT,
        "layout_version": BUNDLE_VERSION,
        "quantize_type": None,
        "wer": None,
        **sections,
        "files": files,
    }


def is_bundle(path: PathLike) -> bool:
    """True when ``path`` is a directory holding a bundle.json (what ``val.py --ckpt`` dispatches on)."""
    return (Path(path) / BUNDLE_JSON).is_file()


def write_bundle_json(info: dict, directory: PathLike) -> None:
    """Write ``info`` as ``directory/bundle.json`` atomically (last, as the bundle's completion marker)."""
    atomic_write_bytes(Path(directory) / BUNDLE_JSON, (json.dumps(info, indent=2) + "\n").encode("utf-8"))


def read_bundle(directory: PathLike, verify_files: bool = True) -> dict:
    """Read and check ``<directory>/bundle.json``; with ``verify_files`` every listed file's sha256 too.

    Raises:
        CheckpointError: one line naming the directory or file: not a directory,
            no or unreadable bundle.json (e.g. a sherpa-onnx bundle or another
            tool's directory), a newer layout, a missing graph or tokenizer, or
            a file whose contents changed since export.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(
            f"ONNX Runtime bundle {directory} is not a directory; pass the --output_dir of an export"
        )
    path = directory / BUNDLE_JSON
    if not path.is_file():
        hint = " (it looks like a sherpa-onnx bundle)" if (directory / "tokens.txt").is_file() else ""
        raise CheckpointError(
            f"{directory} is not an ONNX Runtime bundle: no {BUNDLE_JSON}{hint}; {_EXPORT_HINT}"
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupt); {_EXPORT_HINT}") from None
    if not isinstance(info, dict) or info.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(
            f"{path} does not describe an ONNX Runtime bundle (format is not {BUNDLE_FORMAT!r})"
        )
    version = str(info.get("layout_version", ""))
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        raise CheckpointError(
            f"{path}: layout_version {version!r} is not MAJOR.MINOR.PATCH; {_EXPORT_HINT}"
        ) from None
    ours = tuple(int(part) for part in BUNDLE_VERSION.split(".")[:2])
    if (major, minor) > ours:
        raise CheckpointError(
            f"{path}: layout version {version} is newer than this reader ({BUNDLE_VERSION}); upgrade caiman_asr_train"
        )
    missing = [key for key in SECTIONS if key not in info]
    if missing:
        raise CheckpointError(f"{path}: key '{missing[0]}' is missing; {_EXPORT_HINT}")
    required = [f"{name}.onnx" for name in GRAPHS] + [TOKENIZER_FILE]
    for name in required:
        if name not in info["files"] or not (directory / name).is_file():
            raise CheckpointError(f"ONNX Runtime bundle {directory}: {name} is missing; {_EXPORT_HINT}")
    if verify_files:
        for name, expected in info["files"].items():
            file = directory / name
            if not file.is_file():
                raise CheckpointError(f"ONNX Runtime bundle {directory}: {name} is missing; {_EXPORT_HINT}")
            if sha256_file(file) != expected:
                raise CheckpointError(
                    f"ONNX Runtime bundle {directory}: {name} changed since export (sha256 mismatch: corrupt or "
                    f"edited); {_EXPORT_HINT}"
                )
    return info
