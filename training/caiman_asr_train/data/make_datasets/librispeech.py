"""Convert a LibriSpeech-layout directory into a JSON manifest (docs/formats.md section 11).

LibriSpeech stores each split as ``SPLIT/SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac``
with one ``SPEAKER-CHAPTER.trans.txt`` per chapter, whose lines are
``SPEAKER-CHAPTER-UTT TRANSCRIPT``. Transcripts are copied exactly as written
(LibriSpeech's are uppercase): case and punctuation are the job of the
config's ``normalize_transcripts``, so the manifest stays a faithful copy of the
corpus. Durations and sample counts come from the audio headers.

Usage::

    python -m caiman_asr_train.data.make_datasets.librispeech \\
        --split_dir LibriSpeech/dev-clean
    # -> LibriSpeech/librispeech-dev-clean.json, fnames like dev-clean/1272/128104/...
"""

import argparse
import os
from pathlib import Path
from typing import Optional, Union

import soundfile
from tqdm import tqdm

from caiman_asr_train.core.errors import DataError
from caiman_asr_train.data.manifest import manifest_entry, write_manifest
from caiman_asr_train.utils.cli import run_cli

PathLike = Union[str, os.PathLike]


def _read_transcripts(trans_file: Path) -> dict[str, str]:
    """Utterance id -> transcript for one ``*.trans.txt`` file."""
    transcripts = {}
    for line_number, line in enumerate(trans_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        utt_id, _, transcript = line.strip().partition(" ")
        if not transcript:
            raise DataError(
                f"{trans_file} line {line_number}: expected 'UTTERANCE-ID TRANSCRIPT', "
                f"got {line.strip()!r}; fix the line"
            )
        transcripts[utt_id] = transcript
    return transcripts


def librispeech_manifest(split_dir: PathLike, dataset_dir: PathLike) -> list[dict]:
    """Manifest entries for every ``*.flac`` under ``split_dir``, sorted by path.

    ``fname`` is relative to ``dataset_dir``, which must contain ``split_dir``.
    Raises ``DataError`` for an utterance without a transcript line, a
    transcript line without audio, or unreadable audio.
    """
    split_dir, dataset_dir = Path(split_dir), Path(dataset_dir)
    if not split_dir.is_dir():
        raise DataError(
            f"LibriSpeech split directory not found: {split_dir}; pass the folder holding SPEAKER/CHAPTER/"
        )
    try:
        split_dir.resolve().relative_to(dataset_dir.resolve())
    except ValueError:
        raise DataError(
            f"{split_dir} is not inside dataset directory {dataset_dir}; fnames must be relative to it"
        ) from None

    chapters = sorted(
        {p.parent for p in split_dir.glob("*/*/*.flac")}
        | {p.parent for p in split_dir.glob("*/*/*.trans.txt")}
    )
    if not chapters:
        raise DataError(f"no SPEAKER/CHAPTER/*.flac files under {split_dir}; is it a LibriSpeech split?")
    entries = []
    for chapter in tqdm(chapters, desc=f"LibriSpeech {split_dir.name}", unit="chapter"):
        trans_file = chapter / f"{chapter.parent.name}-{chapter.name}.trans.txt"
        if not trans_file.is_file():
            raise DataError(
                f"transcript file not found: {trans_file.absolute()}; restore it from the LibriSpeech archive"
            )
        transcripts = _read_transcripts(trans_file)
        flacs = {p.name[: -len(".flac")]: p for p in chapter.glob("*.flac")}
        untranscribed = sorted(flacs.keys() - transcripts.keys())
        if untranscribed:
            raise DataError(
                f"no transcript for {flacs[untranscribed[0]]} in {trans_file}; "
                f"add a line '{untranscribed[0]} TRANSCRIPT'"
            )
        missing_audio = sorted(transcripts.keys() - flacs.keys())
        if missing_audio:
            raise DataError(
                f"audio file not found: {chapter.absolute() / (missing_audio[0] + '.flac')} "
                f"(listed in {trans_file}); restore it or remove the line"
            )
        for utt_id in sorted(transcripts):
            flac = flacs[utt_id]
            try:
                info = soundfile.info(str(flac))
            except (soundfile.LibsndfileError, RuntimeError) as exc:
                raise DataError(f"cannot read audio file {flac.absolute()} ({exc}); replace it") from None
            if info.channels != 1:
                raise DataError(f"{flac} has {info.channels} channels; LibriSpeech audio is mono")
            fname = flac.resolve().relative_to(dataset_dir.resolve()).as_posix()
            entries.append(manifest_entry(transcripts[utt_id], fname, info.frames, info.samplerate))
    return entries


def convert_librispeech(
    split_dir: PathLike, output: Optional[PathLike] = None, dataset_dir: Optional[PathLike] = None
) -> Path:
    """Write the manifest of ``split_dir`` and return its path.

    ``dataset_dir`` defaults to the parent of ``split_dir`` (the ``LibriSpeech``
    folder); ``output`` defaults to ``dataset_dir/librispeech-<split>.json``.
    """
    split_dir = Path(split_dir)
    dataset_dir = Path(dataset_dir) if dataset_dir is not None else split_dir.resolve().parent
    if output is None:
        output = dataset_dir / f"librispeech-{split_dir.resolve().name}.json"
    entries = librispeech_manifest(split_dir, dataset_dir)
    write_manifest(entries, output)
    return Path(output)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--split_dir",
        required=True,
        help="LibriSpeech split folder holding SPEAKER/CHAPTER/ (e.g. LibriSpeech/dev-clean)",
    )
    parser.add_argument(
        "--dataset_dir",
        default=None,
        help="folder the manifest's fnames are relative to, later passed as --dataset_dir "
        "(default: parent of --split_dir)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="manifest to write (default: DATASET_DIR/librispeech-SPLIT.json)",
    )
    args = parser.parse_args(argv)
    output = convert_librispeech(args.split_dir, args.output, args.dataset_dir)
    print(f"wrote {output}")


if __name__ == "__main__":
    run_cli(main)
