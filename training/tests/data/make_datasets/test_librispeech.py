import os
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from caiman_asr_train.core.errors import DataError
from caiman_asr_train.data.audio import load_audio
from caiman_asr_train.data.make_datasets.librispeech import (
    convert_librispeech,
    librispeech_manifest,
    main,
)
from caiman_asr_train.data.manifest import read_manifest, read_manifests

# speaker, chapter, utterance -> (transcript, number of samples)
UTTERANCES = {
    ("19", "198", "0000"): ("NORTHANGER ABBEY", 4000),
    ("19", "198", "0001"): ("THIS LITTLE WORK WAS FINISHED IN THE YEAR EIGHTEEN O THREE", 8000),
    ("19", "227", "0000"): ("IT'S NOT MY FAULT", 1600),
    ("84", "121123", "0002"): ("GO DO YOU HEAR", 12345),
}


@pytest.fixture
def librispeech(tmp_path):
    """LibriSpeech/dev-clean with real 16 kHz FLACs and transcripts, as the corpus lays them out."""
    split = tmp_path / "LibriSpeech" / "dev-clean"
    rng = np.random.default_rng(0)
    transcripts = {}
    for (speaker, chapter, utt), (text, frames) in UTTERANCES.items():
        chapter_dir = split / speaker / chapter
        chapter_dir.mkdir(parents=True, exist_ok=True)
        audio = (0.1 * rng.standard_normal(frames)).astype(np.float32)
        soundfile.write(chapter_dir / f"{speaker}-{chapter}-{utt}.flac", audio, 16000)
        transcripts.setdefault(chapter_dir / f"{speaker}-{chapter}.trans.txt", []).append(
            f"{speaker}-{chapter}-{utt} {text}"
        )
    for path, lines in transcripts.items():
        # Reverse the order: the converter must not depend on it.
        path.write_text("\n".join(reversed(lines)) + "\n")
    return split


def _expected():
    entries = []
    for (speaker, chapter, utt), (text, frames) in sorted(UTTERANCES.items()):
        fname = f"dev-clean/{speaker}/{chapter}/{speaker}-{chapter}-{utt}.flac"
        entries.append(
            {
                "transcript": text,
                "files": [
                    {
                        "fname": fname,
                        "channels": 1,
                        "sample_rate": 16000,
                        "duration": frames / 16000,
                        "num_samples": frames,
                    }
                ],
                "original_duration": frames / 16000,
                "original_num_samples": frames,
            }
        )
    return entries


def test_conversion_is_exact(librispeech):
    output = convert_librispeech(librispeech)
    assert output == librispeech.parent / "librispeech-dev-clean.json"
    assert read_manifest(output) == _expected()
    # The manifest works with the rest of the pipeline: files resolve and decode.
    entries = read_manifests([output.name], librispeech.parent)
    first = entries[0]["files"][0]
    assert len(load_audio(librispeech.parent / first["fname"], 16000)) == first["num_samples"]


def test_fnames_relative_to_a_chosen_dataset_dir(librispeech, tmp_path):
    entries = librispeech_manifest(librispeech, tmp_path)
    assert entries[0]["files"][0]["fname"] == "LibriSpeech/dev-clean/19/198/19-198-0000.flac"
    with pytest.raises(DataError, match="is not inside dataset directory"):
        librispeech_manifest(librispeech, tmp_path / "elsewhere")


def test_command_line(librispeech, tmp_path, capsys):
    output = tmp_path / "out" / "dev.json"
    main(["--split_dir", str(librispeech), "--output", str(output)])
    assert read_manifest(output) == _expected()
    assert str(output) in capsys.readouterr().out


def test_runs_as_a_script_and_prints_errors_in_one_line(tmp_path):
    import caiman_asr_train.data.make_datasets.librispeech as module

    result = subprocess.run(
        [sys.executable, module.__file__, "--split_dir", str(tmp_path / "absent")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: LibriSpeech split directory not found")
    assert result.stderr.count("\n") == 1


def test_missing_transcript_line_names_the_audio(librispeech):
    trans = librispeech / "19" / "198" / "19-198.trans.txt"
    trans.write_text("19-198-0000 NORTHANGER ABBEY\n")
    flac = librispeech / "19" / "198" / "19-198-0001.flac"
    with pytest.raises(DataError, match=re.escape(f"no transcript for {flac} in {trans}")):
        librispeech_manifest(librispeech, librispeech.parent)


def test_missing_audio_is_named_with_its_full_path(librispeech):
    flac = librispeech / "84" / "121123" / "84-121123-0002.flac"
    flac.unlink()
    with pytest.raises(DataError, match=re.escape(f"audio file not found: {os.path.abspath(flac)}")):
        librispeech_manifest(librispeech, librispeech.parent)


def test_missing_transcript_file_is_named(librispeech):
    trans = librispeech / "19" / "227" / "19-227.trans.txt"
    trans.unlink()
    with pytest.raises(DataError, match=re.escape(f"transcript file not found: {os.path.abspath(trans)}")):
        librispeech_manifest(librispeech, librispeech.parent)


def test_malformed_transcript_line(librispeech):
    trans = librispeech / "19" / "227" / "19-227.trans.txt"
    trans.write_text("19-227-0000\n")
    with pytest.raises(DataError, match=re.escape(f"{trans} line 1: expected 'UTTERANCE-ID TRANSCRIPT'")):
        librispeech_manifest(librispeech, librispeech.parent)


def test_corrupt_audio_is_named(librispeech):
    flac = librispeech / "19" / "227" / "19-227-0000.flac"
    flac.write_bytes(b"junk" * 10)
    with pytest.raises(DataError, match=re.escape(f"cannot read audio file {os.path.abspath(flac)}")):
        librispeech_manifest(librispeech, librispeech.parent)


def test_empty_directory(tmp_path):
    with pytest.raises(DataError, match="no SPEAKER/CHAPTER/\\*.flac files under"):
        librispeech_manifest(tmp_path, tmp_path)
