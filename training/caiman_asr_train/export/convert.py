"""Convert a run's checkpoints into inference artefacts for one or more servers, as a batch job.

    python -m caiman_asr_train.export.convert --input_directory results \\
        --inference_server onnxruntime,sherpa-onnx,triton --output_directory gs://bucket/models \\
        --model_name demo --version 3 [--quantize_weights --quantize_type int8_per_channel]

(or the console script ``caiman-convert``). Directories are local paths or
fsspec URLs (``file://``, ``memory://``, ``gs://`` with the ``[gcs]`` extra,
``s3://`` with the ``[s3]`` extra). Output layout, one directory per target:

    <output>/<model_name>/<version>/<server>[-<quantize_type>]/...   the server's files
    <output>/<model_name>/<version>/<server>[-<quantize_type>]/manifest.json

With ``--select all`` the version directory is ``<version>-<label>`` (labels
``best``, ``last``, ``step<N>``) so each checkpoint has its own. The
manifest (``MANIFEST_NAME``) is written last and is the commit marker: a
target directory without one is incomplete and is redone by the next run; a
target whose manifest names the same source sha256 and options, and whose
files are all present at their recorded sizes, is skipped.

Every argument is checked before any conversion starts: a mistake exits 2
with one line. ``--checkpoint_index N`` converts only the N-th selected
checkpoint, so that a Kubernetes Indexed Job can give each completion index
one checkpoint (docker/k8s/convert-job.yaml).
"""

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Optional, Sequence

import fsspec
from fsspec.implementations.local import LocalFileSystem

from caiman_asr_train.core.errors import ExportError
from caiman_asr_train.deploy import DEFAULT_QUANTIZE_TYPE, QUANTIZE_TYPES
from caiman_asr_train.export.checkpointer import Checkpointer
from caiman_asr_train.export.hardware_ckpt import hw_path
from caiman_asr_train.utils.atomic import atomic_write_bytes
from caiman_asr_train.utils.cli import run_cli
from caiman_asr_train.utils.digest import sha256_file

__all__ = [
    "MANIFEST_NAME",
    "SERVERS",
    "Source",
    "build_parser",
    "convert",
    "main",
    "parse_args",
    "select_sources",
    "target_directory",
]

SERVERS = ("myrtle-fpga", "onnxruntime", "sherpa-onnx", "triton")
# The FPGA server takes float32 weights only (docs/formats.md section 13).
QUANTIZABLE = ("onnxruntime", "sherpa-onnx", "triton")
SELECTIONS = ("best", "last", "all")
MANIFEST_NAME = "manifest.json"
# Bump when the manifest's keys change meaning.
MANIFEST_FORMAT = 1
# Object-store protocols and the package extra that provides each filesystem.
_EXTRAS = {"gs": "gcs", "gcs": "gcs", "s3": "s3", "s3a": "s3"}
_CHUNK = 1 << 20


class _Parser(argparse.ArgumentParser):
    # Usage mistakes are one line and exit 2, like every other UserError.
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ExportError(f"{message} (see --help)")


@dataclass(frozen=True)
class Source:
    """One checkpoint to convert.

    Attributes:
        url: the file, as a local path or fsspec URL.
        label: ``best``, ``last``, ``step<N>`` for a run directory; the file
            name without ``.pt`` for ``--ckpt``.
    """

    url: str
    label: str


def build_parser() -> argparse.ArgumentParser:
    """The converter's command line (also used to check the Kubernetes Job's arguments)."""
    p = _Parser(
        prog="caiman-convert",
        description="Convert checkpoints into inference artefacts for Myrtle.ai's FPGA server, "
        "ONNX Runtime, sherpa-onnx and Triton, with a manifest per target.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input_directory", help="a training run's output directory (local path or fsspec URL)"
    )
    source.add_argument("--ckpt", help="one training (*.pt) or hardware (*.hw.pt) checkpoint to convert")
    p.add_argument(
        "--inference_server",
        nargs="+",
        required=True,
        help=f"target servers, space- or comma-separated: {', '.join(SERVERS)}",
    )
    p.add_argument(
        "--select",
        choices=SELECTIONS,
        default="best",
        help="which checkpoints of --input_directory to convert (a *.hw.pt is preferred to its *.pt)",
    )
    p.add_argument(
        "--checkpoint_index",
        type=int,
        default=None,
        help="convert only the N-th selected checkpoint (0-based; order best, last, steps ascending), "
        "e.g. a Kubernetes Indexed Job's completion index; an index past the end converts nothing",
    )
    p.add_argument("--output_directory", required=True, help="where to write (local path or fsspec URL)")
    p.add_argument(
        "--model_name", default="caiman-asr", help="first directory level under --output_directory"
    )
    p.add_argument(
        "--version", default="1", help="second directory level (with --select all: <version>-<label>)"
    )
    p.add_argument(
        "--quantize_weights",
        action="store_true",
        help=f"quantize the weights (type --quantize_type, default {DEFAULT_QUANTIZE_TYPE})",
    )
    p.add_argument(
        "--quantize_type",
        default=None,
        help="weight quantization type (implies --quantize_weights): int8_per_channel, int8_blockwise, "
        "int4_per_channel or int4_blockwise",
    )
    p.add_argument("--block_size", type=int, default=128, help="input-axis block size of blockwise types")
    p.add_argument(
        "--verify_manifests",
        nargs="+",
        default=None,
        help="manifest files to decode with each exported model and with its source; a quantized target "
        "whose WER is worse by more than --max_wer_increase is refused",
    )
    p.add_argument(
        "--dataset_dir",
        default=None,
        help="directory the --verify_manifests audio paths are relative to (default: the first manifest's directory)",
    )
    p.add_argument(
        "--max_wer_increase",
        type=float,
        default=1.0,
        help="largest allowed WER increase of an exported model over its source, in percentage points",
    )
    p.add_argument(
        "--config",
        default=None,
        help="YAML config of a training checkpoint (default: the one the checkpoint records)",
    )
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the arguments; ``servers`` is the list of targets, ``quantize_type`` None or a type.

    Raises:
        ExportError: any argument that cannot work, before anything is read or written.
    """
    args = build_parser().parse_args(argv)
    servers = [name for part in args.inference_server for name in part.split(",") if name]
    unknown = sorted(set(servers) - set(SERVERS))
    if unknown or not servers:
        raise ExportError(
            f"--inference_server {' '.join(unknown) or '(empty)'}: unknown server; choose from {', '.join(SERVERS)}"
        )
    args.servers = list(dict.fromkeys(servers))
    if args.quantize_type is None and args.quantize_weights:
        args.quantize_type = DEFAULT_QUANTIZE_TYPE
    if args.quantize_type is not None:
        types = QUANTIZE_TYPES
        if args.quantize_type not in types:
            raise ExportError(
                f"--quantize_type {args.quantize_type}: unknown type; choose from {', '.join(types)}"
            )
        refusing = [s for s in args.servers if s not in QUANTIZABLE]
        if refusing:
            raise ExportError(
                f"--inference_server {', '.join(refusing)} takes float32 weights only; drop --quantize_type "
                "or convert that server in a separate run"
            )
        if args.block_size < 1:
            raise ExportError(f"--block_size {args.block_size}: must be at least 1")
    if args.checkpoint_index is not None and args.checkpoint_index < 0:
        raise ExportError(f"--checkpoint_index {args.checkpoint_index}: must be 0 or more")
    if args.max_wer_increase < 0:
        raise ExportError(
            f"--max_wer_increase {args.max_wer_increase}: must be 0 or more (percentage points)"
        )
    if args.ckpt is not None and args.select != "best":
        raise ExportError("--select applies to --input_directory; --ckpt names one file")
    if args.dataset_dir is not None and args.verify_manifests is None:
        raise ExportError("--dataset_dir is only used with --verify_manifests; add the manifests to check")
    for name in ("model_name", "version"):
        value = getattr(args, name)
        if not value or "/" in value or value in (".", ".."):
            raise ExportError(f"--{name} {value!r}: must be a non-empty name without '/'")
    return args


def filesystem(url: str, flag: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of a local path or URL.

    Raises:
        ExportError: an unknown protocol, or an object store whose
            optional filesystem package is not installed (naming the extra).
    """
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError:
        protocol = url.split("://", 1)[0]
        extra = _EXTRAS.get(protocol)
        hint = (
            f"pip install 'caiman_asr_train[{extra}]'" if extra else "install its fsspec filesystem package"
        )
        raise ExportError(f"{flag} {url}: the {protocol}:// filesystem is not installed; {hint}") from None
    except ValueError as exc:
        raise ExportError(f"{flag} {url}: {exc}") from None
    return fs, path


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path of ``fs`` as a URL that ``filesystem`` maps back to it."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def select_sources(input_directory: str, select: str) -> list[Source]:
    """The checkpoints of a run directory to convert, in the order best, last, steps ascending.

    Names follow ``Checkpointer``; where both ``X.hw.pt`` and ``X.pt`` exist
    the hardware checkpoint is taken (it is what the run exported).

    Raises:
        ExportError: the directory is missing or holds no checkpoint of the selection.
    """
    fs, path = filesystem(input_directory, "--input_directory")
    if not fs.isdir(path):
        raise ExportError(
            f"--input_directory {input_directory} is not a directory; give a training run's --output_dir"
        )
    names = {Path(entry).name for entry in fs.ls(path, detail=False)}
    checkpointer = Checkpointer(Path(path))
    steps = sorted(
        {step for step in map(checkpointer.step_of, map(_training_name, names)) if step is not None}
    )
    wanted = {
        "best": [("best", checkpointer.best_path.name)],
        "last": [("last", checkpointer.last_path.name)],
        "all": [("best", checkpointer.best_path.name), ("last", checkpointer.last_path.name)]
        + [(f"step{step}", checkpointer.step_path(step).name) for step in steps],
    }[select]
    sources = []
    for label, training_name in wanted:
        hw_name = hw_path(training_name).name
        found = next((n for n in (hw_name, training_name) if n in names), None)
        if found is not None:
            sources.append(Source(url=_unstrip(fs, f"{path.rstrip('/')}/{found}"), label=label))
    if not sources:
        example = wanted[0][1]
        raise ExportError(
            f"--input_directory {input_directory} holds no {select} checkpoint (e.g. {example} or its .hw.pt); "
            "check the directory, or pick another --select"
        )
    return sources


def _training_name(name: str) -> str:
    """``X.hw.pt`` -> ``X.pt`` (the inverse of ``hw_path``); other names unchanged."""
    return f"{name[: -len('.hw.pt')]}.pt" if name.endswith(".hw.pt") else name


def target_directory(args: argparse.Namespace, source: Source, server: str) -> str:
    """``<model_name>/<version>[-<label>]/<server>[-<quantize_type>]``, relative to --output_directory."""
    version = f"{args.version}-{source.label}" if args.select == "all" and args.ckpt is None else args.version
    leaf = f"{server}-{args.quantize_type}" if args.quantize_type else server
    return f"{args.model_name}/{version}/{leaf}"


def _options(args: argparse.Namespace, server: str) -> dict:
    """What a target's content depends on besides the source (a rerun redoes a target when it changes)."""
    return {
        "server": server,
        "quantize_type": args.quantize_type,
        "block_size": args.block_size if args.quantize_type else None,
        "verify_manifests": args.verify_manifests,
        "max_wer_increase": args.max_wer_increase if args.verify_manifests else None,
    }


def tool_version() -> str:
    try:
        return metadata.version("caiman_asr_train")
    except metadata.PackageNotFoundError:
        return "unknown"


def _fetch(source: Source, scratch: Path) -> tuple[Path, str]:
    """A local copy of the source (the file itself when local) and its sha256."""
    fs, path = filesystem(source.url, "source")
    if isinstance(fs, LocalFileSystem):
        return Path(path), sha256_file(Path(path))
    local = scratch / Path(path).name
    digest = hashlib.sha256()
    with fs.open(path, "rb") as remote, open(local, "wb") as out:
        for chunk in iter(lambda: remote.read(_CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
    return local, digest.hexdigest()


def _up_to_date(fs: fsspec.AbstractFileSystem, target: str, source_sha256: str, options: dict) -> bool:
    manifest_path = f"{target}/{MANIFEST_NAME}"
    if not fs.isfile(manifest_path):
        return False
    try:
        manifest = json.loads(fs.cat_file(manifest_path))
        if manifest["source"]["sha256"] != source_sha256 or manifest["options"] != options:
            return False
        return all(
            fs.isfile(f"{target}/{name}") and fs.size(f"{target}/{name}") == entry["size"]
            for name, entry in manifest["files"].items()
        )
    except (ValueError, KeyError, TypeError):
        return False


def _export(local_source: Path, server: str, out_dir: Path, args: argparse.Namespace) -> dict:
    """Write ``server``'s files for ``local_source`` into the new directory ``out_dir``; return the export summary."""
    from caiman_asr_train.export.inference import export_inference  # the ONNX stack loads only when used

    kwargs = {
        "verify_manifests": args.verify_manifests,
        "dataset_dir": args.dataset_dir,
        "quantize_type": args.quantize_type,
        "block_size": args.block_size,
        "max_wer_increase": args.max_wer_increase,
        "config": args.config,
    }
    if server != "triton":
        return export_inference(local_source, server, out_dir, **kwargs)
    from caiman_asr_train.deploy.triton import write_triton_target

    bundle = out_dir.parent / f"{out_dir.name}.bundle"
    summary = export_inference(local_source, "onnxruntime", bundle, **kwargs)
    write_triton_target(bundle, out_dir)
    shutil.rmtree(bundle)
    return summary


def _describe_files(directory: Path) -> dict:
    return {
        path.relative_to(directory).as_posix(): {"sha256": sha256_file(path), "size": path.stat().st_size}
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _plain(value):
    """The export summary as JSON-ready values (paths as strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _manifest(source: Source, source_sha256: str, options: dict, files: dict, summary: dict) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "tool": {"name": "caiman_asr_train", "version": tool_version()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "url": source.url,
            "label": source.label,
            "sha256": source_sha256,
            "step": summary.get("step"),
        },
        "options": options,
        "wer": _plain(summary.get("wer")),
        "files": files,
    }


def _publish(fs: fsspec.AbstractFileSystem, staged: Path, target: str, manifest: dict) -> None:
    """Put ``staged``'s files at ``target``, replacing an incomplete earlier attempt; the manifest last."""
    if fs.exists(target):
        fs.rm(target, recursive=True)
    if isinstance(fs, LocalFileSystem):
        # Built beside and renamed: the directory appears whole.
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        partial = Path(target).parent / f".{Path(target).name}.{uuid.uuid4().hex}.partial"
        shutil.copytree(staged, partial)
        os.replace(partial, target)
        atomic_write_bytes(Path(target) / MANIFEST_NAME, _json_bytes(manifest))
        return
    for name in manifest["files"]:
        fs.put_file(str(staged / name), f"{target}/{name}")
    fs.pipe_file(f"{target}/{MANIFEST_NAME}", _json_bytes(manifest))


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _clear_partials(fs: fsspec.AbstractFileSystem, target: str) -> None:
    """Remove what a killed local run left beside ``target`` (remote targets have no partial directories)."""
    if isinstance(fs, LocalFileSystem):
        for stale in Path(target).parent.glob(f".{Path(target).name}.*.partial"):
            shutil.rmtree(stale, ignore_errors=True)


def convert(args: argparse.Namespace) -> list[dict]:
    """Convert every selected checkpoint for every server; return one record per target.

    Each record: ``target`` (URL of the directory), ``server``, ``source``
    (URL) and ``status`` (``written`` or ``up to date``).

    Raises:
        ExportError: nothing to convert (before any work).
        UserError: an export refused its input (e.g. a WER gate failed); the
            targets finished before it keep their manifests.
    """
    out_fs, out_root = filesystem(args.output_directory, "--output_directory")
    if args.ckpt:
        fs, path = filesystem(args.ckpt, "--ckpt")
        if not fs.isfile(path):
            raise ExportError(f"--ckpt {args.ckpt} not found; give a training or hardware checkpoint file")
        sources = [Source(args.ckpt, _training_name(Path(path).name).removesuffix(".pt"))]
    else:
        sources = select_sources(args.input_directory, args.select)
    if args.checkpoint_index is not None:
        sources = sources[args.checkpoint_index : args.checkpoint_index + 1]
    records = []
    for source in sources:
        with tempfile.TemporaryDirectory(prefix="caiman-convert-") as scratch:
            local_source, source_sha256 = _fetch(source, Path(scratch))
            for server in args.servers:
                target = f"{out_root.rstrip('/')}/{target_directory(args, source, server)}"
                options = _options(args, server)
                record = {"target": _unstrip(out_fs, target), "server": server, "source": source.url}
                if _up_to_date(out_fs, target, source_sha256, options):
                    records.append({**record, "status": "up to date"})
                    print(f"up to date: {record['target']}", flush=True)
                    continue
                _clear_partials(out_fs, target)
                staged = Path(scratch) / "staged" / server
                staged.parent.mkdir(exist_ok=True)
                summary = _export(local_source, server, staged, args)
                files = _describe_files(staged)
                _publish(out_fs, staged, target, _manifest(source, source_sha256, options, files, summary))
                shutil.rmtree(staged)
                records.append({**record, "status": "written"})
                print(f"written: {record['target']} ({len(files)} files from {source.url})", flush=True)
    if not sources:
        print(
            f"--checkpoint_index {args.checkpoint_index}: past the selected checkpoints; nothing to convert"
        )
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default: the command line), check it, convert; 0 on success."""
    args = parse_args(argv)
    convert(args)
    return 0


def cli() -> None:
    """Console-script entry point (``caiman-convert``)."""
    run_cli(main)


if __name__ == "__main__":
    run_cli(main)
