import json
import os

import pytest

from caiman_asr_train.core.errors import DataError
from caiman_asr_train.data.manifest import (
    audio_path,
    manifest_entry,
    read_manifest,
    read_manifests,
    write_manifest,
)


def _entries():
    return [
        manifest_entry("hello world", "audio/a.flac", 16000),
        manifest_entry("it's a test", "audio/b.flac", 24000, sample_rate=8000),
    ]


def test_manifest_entry_follows_spec_section_11():
    assert manifest_entry("hi there", "x/y.flac", 20000) == {
        "transcript": "hi there",
        "files": [
            {
                "fname": "x/y.flac",
                "channels": 1,
                "sample_rate": 16000,
                "duration": 1.25,
                "num_samples": 20000,
            }
        ],
        "original_duration": 1.25,
        "original_num_samples": 20000,
    }
    assert manifest_entry("a", "b.wav", 24000, sample_rate=8000)["files"][0]["duration"] == 3.0


def test_write_then_read_round_trips(tmp_path):
    path = tmp_path / "sub" / "train.json"
    write_manifest(_entries(), path)
    assert read_manifest(path) == _entries()
    assert json.loads(path.read_text()) == _entries()
    assert [p.name for p in path.parent.iterdir()] == ["train.json"]  # no temporary left


def test_extra_keys_are_kept(tmp_path):
    entries = _entries()
    entries[0]["speaker"] = "alice"
    write_manifest(entries, tmp_path / "m.json")
    assert read_manifest(tmp_path / "m.json")[0]["speaker"] == "alice"


def _break(mutate):
    entries = _entries()
    mutate(entries)
    return entries


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda e: e[1].pop("transcript"), "entry 1 is missing field 'transcript'"),
        (lambda e: e[1].pop("files"), "entry 1 is missing field 'files'"),
        (lambda e: e[1].pop("original_num_samples"), "entry 1 is missing field 'original_num_samples'"),
        (lambda e: e[1].update(files=[]), "entry 1 field 'files' must be a non-empty list"),
        (lambda e: e[1]["files"][0].pop("fname"), "entry 1 files[0] is missing field 'fname'"),
        (lambda e: e[0]["files"][0].pop("sample_rate"), "entry 0 files[0] is missing field 'sample_rate'"),
        (lambda e: e[0]["files"][0].update(num_samples="10"), "entry 0 files[0] field 'num_samples'"),
        (lambda e: e[0]["files"][0].update(num_samples=True), "entry 0 files[0] field 'num_samples'"),
        (lambda e: e[0]["files"][0].update(duration=-1.0), "entry 0 files[0] field 'duration'"),
        (lambda e: e[0].update(transcript=None), "entry 0 field 'transcript' must be a string"),
        (lambda e: e.__setitem__(1, "not an entry"), "entry 1 must be a JSON object"),
    ],
)
def test_invalid_entries_name_file_entry_and_field(tmp_path, mutate, expected):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_break(mutate)))
    with pytest.raises(DataError) as info:
        read_manifest(path)
    message = str(info.value)
    assert str(path) in message and expected in message
    assert "\n" not in message


def test_write_rejects_invalid_entries_and_writes_nothing(tmp_path):
    path = tmp_path / "out.json"
    with pytest.raises(DataError, match="entry 0 is missing field 'transcript'"):
        write_manifest(_break(lambda e: e[0].pop("transcript")), path)
    assert list(tmp_path.iterdir()) == []


def test_missing_and_malformed_manifest_files(tmp_path):
    with pytest.raises(DataError, match="manifest not found: .*nope.json"):
        read_manifest(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text('[{"transcript": "a",\n')
    with pytest.raises(DataError, match=r"broken.json is not valid JSON \(line 2"):
        read_manifest(tmp_path / "broken.json")
    (tmp_path / "dict.json").write_text('{"transcript": "a"}')
    with pytest.raises(DataError, match="dict.json: a manifest must be a JSON list"):
        read_manifest(tmp_path / "dict.json")


@pytest.fixture
def dataset(tmp_path):
    """A dataset dir with two manifests whose audio files exist (content is irrelevant here)."""
    root = tmp_path / "data"
    first = [manifest_entry("one", "audio/1.flac", 100), manifest_entry("two", "audio/2.flac", 200)]
    second = [manifest_entry("three", "audio/3.flac", 300)]
    write_manifest(first, root / "first.json")
    write_manifest(second, root / "second.json")
    for entry in first + second:
        audio_path(entry, root).parent.mkdir(parents=True, exist_ok=True)
        audio_path(entry, root).write_bytes(b"")
    return root


def test_read_manifests_concatenates_in_order_relative_to_dataset_dir(dataset):
    entries = read_manifests(["second.json", "first.json"], dataset)
    assert [e["transcript"] for e in entries] == ["three", "one", "two"]
    absolute = read_manifests([dataset / "first.json"], dataset)
    assert [e["transcript"] for e in absolute] == ["one", "two"]


def test_read_manifests_accepts_paths_relative_to_cwd(dataset, monkeypatch):
    monkeypatch.chdir(dataset.parent)
    entries = read_manifests(["data/first.json"], "data")
    assert [e["transcript"] for e in entries] == ["one", "two"]


def test_missing_audio_is_named_with_its_full_path(dataset):
    (dataset / "audio" / "2.flac").unlink()
    with pytest.raises(DataError) as info:
        read_manifests(["second.json", "first.json"], dataset)
    message = str(info.value)
    assert f"audio file not found: {os.path.abspath(dataset / 'audio' / '2.flac')}" in message
    assert "entry 1" in message and "first.json" in message
    # Without the file check, reading succeeds.
    assert len(read_manifests(["first.json"], dataset, check_files=False)) == 2


def test_missing_manifest_in_list_is_named(dataset):
    with pytest.raises(DataError, match="manifest not found: .*missing.json"):
        read_manifests(["first.json", "missing.json"], dataset)
