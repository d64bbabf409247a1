"""Read, validate and write JSON manifests (docs/formats.md section 11).

A manifest is a JSON list with one entry per utterance::

    {"transcript": "the cat sat",
     "files": [{"fname": "audio/train/000001.flac", "channels": 1,
                "sample_rate": 16000, "duration": 1.25, "num_samples": 20000}],
     "original_duration": 1.25, "original_num_samples": 20000}

``fname`` is relative to the dataset directory (``--dataset_dir``); durations
are in seconds. Extra keys are kept and ignored. Validation errors are one
line naming the manifest, the entry index and the field at fault.
"""

import json
import os
from pathlib import Path
from typing import Any, Iterable, Union

from caiman_asr_train.core.errors import DataError
from caiman_asr_train.utils.atomic import atomic_write_bytes

PathLike = Union[str, os.PathLike]

_FIX = "regenerate the manifest or fix it by hand (format: docs/formats.md section 11)"


def manifest_entry(transcript: str, fname: str, num_samples: int, sample_rate: int = 16000) -> dict:
    """Build one manifest entry for a mono audio file of ``num_samples`` samples.

    ``fname`` is relative to the dataset directory; durations are
    ``num_samples / sample_rate`` seconds.
    """
    duration = num_samples / sample_rate
    return {
        "transcript": transcript,
        "files": [
            {
                "fname": fname,
                "channels": 1,
                "sample_rate": sample_rate,
                "duration": duration,
                "num_samples": num_samples,
            }
        ],
        "original_duration": duration,
        "original_num_samples": num_samples,
    }


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but `true` is never a valid sample count.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


# Field name -> (check, description used in the error message).
_FILE_FIELDS = {
    "fname": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "channels": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "sample_rate": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "duration": (lambda v: _is_number(v) and v >= 0, "a number of seconds >= 0"),
    "num_samples": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
}
_ENTRY_FIELDS = {
    "transcript": (lambda v: isinstance(v, str), "a string"),
    "files": (lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list"),
    "original_duration": (lambda v: _is_number(v) and v >= 0, "a number of seconds >= 0"),
    "original_num_samples": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
}


def _check_fields(obj: Any, fields: dict, where: str, source: str) -> None:
    if not isinstance(obj, dict):
        raise DataError(f"{source}: {where} must be a JSON object, got {type(obj).__name__}; {_FIX}")
    for name, (check, wanted) in fields.items():
        if name not in obj:
            raise DataError(f"{source}: {where} is missing field '{name}'; {_FIX}")
        if not check(obj[name]):
            raise DataError(f"{source}: {where} field '{name}' must be {wanted}, got {obj[name]!r}; {_FIX}")


def validate_manifest(entries: Any, source: str) -> list[dict]:
    """Check ``entries`` against docs/formats.md section 11 and return them.

    ``source`` names the manifest in error messages. Raises ``DataError`` at the
    first problem, naming the entry index and field.
    """
    if not isinstance(entries, list):
        raise DataError(
            f"{source}: a manifest must be a JSON list of entries, got {type(entries).__name__}; {_FIX}"
        )
    for index, entry in enumerate(entries):
        _check_fields(entry, _ENTRY_FIELDS, f"entry {index}", source)
        for file_index, file_info in enumerate(entry["files"]):
            _check_fields(file_info, _FILE_FIELDS, f"entry {index} files[{file_index}]", source)
    return entries


def read_manifest(path: PathLike) -> list[dict]:
    """Read and validate one manifest file; raises ``DataError`` naming the file and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"manifest not found: {path}; check the path or create it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from None
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"manifest {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); {_FIX}"
        ) from None
    return validate_manifest(entries, str(path))


def audio_path(entry: dict, dataset_dir: PathLike, file_index: int = 0) -> Path:
    """Path of an entry's audio file: ``dataset_dir / files[file_index].fname``."""
    return Path(dataset_dir) / entry["files"][file_index]["fname"]


def _resolve_manifest(path: PathLike, dataset_dir: PathLike) -> Path:
    """Manifest paths are relative to ``dataset_dir`` (as in ``--dataset_dir``).

    A path that only exists relative to the current directory is accepted too,
    so that both ``--train_manifests train.json`` and shell-completed
    ``datasets/demo/train.json`` work.
    """
    joined = Path(dataset_dir) / path
    if joined.exists() or not Path(path).exists():
        return joined
    return Path(path)


def read_manifests(paths: Iterable[PathLike], dataset_dir: PathLike, check_files: bool = True) -> list[dict]:
    """Read, validate and concatenate manifests, in order.

    Each path is taken relative to ``dataset_dir`` (absolute paths are used as
    they are). With ``check_files`` every audio file must exist, else a
    ``DataError`` gives its full path.
    """
    entries: list[dict] = []
    for path in paths:
        manifest_path = _resolve_manifest(path, dataset_dir)
        manifest = read_manifest(manifest_path)
        if check_files:
            for index, entry in enumerate(manifest):
                for file_index in range(len(entry["files"])):
                    audio = audio_path(entry, dataset_dir, file_index)
                    if not audio.is_file():
                        raise DataError(
                            f"audio file not found: {os.path.abspath(audio)} "
                            f"(entry {index} of {manifest_path}); check --dataset_dir "
                            "or regenerate the dataset"
                        )
        entries.extend(manifest)
    return entries


def write_manifest(entries: list[dict], path: PathLike) -> None:
    """Validate ``entries`` and write them to ``path`` as JSON, atomically."""
    validate_manifest(entries, str(path))
    data = json.dumps(entries, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, data.encode("utf-8"))
