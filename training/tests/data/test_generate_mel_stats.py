"""Dataset mel statistics: float64 accumulation, file format, refusals (docs/formats.md section 6)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from caiman_asr_train.core.errors import DataError
from caiman_asr_train.core.features import FilterbankFeatures, load_mel_stats
from caiman_asr_train.data.generate_mel_stats import compute_mel_stats, main, save_mel_stats

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

FEATURES = {
    "normalize": "per_feature",
    "sample_rate": 16000,
    "window_size": 0.02,
    "window_stride": 0.01,
    "window": "hann",
    "n_fft": 512,
    "n_filt": 80,
    "dither": 0.00001,  # must be turned off for statistics
    "stats_path": "unused",
}


def _entry(fname: str, num_samples: int, sample_rate: int) -> dict:
    duration = num_samples / sample_rate
    return {
        "transcript": "test",
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


def _write_corpus(root: Path, waves: list) -> list[dict]:
    """Write (name, samples, rate) clips as audio files plus train.json; return the entries."""
    (root / "audio").mkdir(parents=True, exist_ok=True)
    entries = []
    for name, samples, rate in waves:
        soundfile.write(root / "audio" / name, samples, rate)
        entries.append(_entry(f"audio/{name}", len(samples), rate))
    (root / "train.json").write_text(json.dumps(entries))
    return entries


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    speechy = (0.3 * np.sin(2 * np.pi * 300 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    waves = [
        ("a.flac", speechy, 16000),
        ("b.wav", (0.1 * rng.standard_normal(9000)).astype(np.float32), 16000),
        # stored at 8 kHz: read back resampled to the features' 16 kHz
        ("c.flac", (0.2 * np.sign(np.sin(2 * np.pi * 150 * t[:6000]))).astype(np.float32), 8000),
    ]
    root = tmp_path / "dataset"
    return root, _write_corpus(root, waves)


def _direct_stats(root: Path, entries: list[dict]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every frame of every file in one float64 tensor, then mean and population variance."""
    from caiman_asr_train.data.audio import load_audio

    fb = FilterbankFeatures(**{**FEATURES, "dither": 0.0})
    frames = []
    for entry in entries:
        audio = torch.from_numpy(load_audio(root / entry["files"][0]["fname"], 16000))
        logmel, lens = fb(audio[None], torch.tensor([audio.numel()]))
        frames.append(logmel[0, :, : int(lens[0])])
    allframes = torch.cat(frames, dim=1).to(torch.float64)
    return allframes.mean(dim=1), allframes.var(dim=1, unbiased=False), allframes.shape[1]


def test_stats_of_tiny_manifest_equal_direct_float64_computation(corpus):
    root, entries = corpus
    means, variances, n = compute_mel_stats(entries, root, FEATURES, progress=False)
    expected_means, expected_vars, expected_n = _direct_stats(root, entries)
    assert means.dtype == variances.dtype == torch.float64
    assert n == expected_n == 100 + 56 + 75  # len // hop frames with a 0.02 s window
    assert torch.allclose(means, expected_means, rtol=1e-10, atol=1e-10)
    assert torch.allclose(variances, expected_vars, rtol=1e-9, atol=1e-10)


def test_stats_from_a_worker_pool_equal_one_process_bit_for_bit(tmp_path, monkeypatch):
    """Chunks are merged in manifest order, so the workers' count cannot change a bit."""
    import caiman_asr_train.data.generate_mel_stats as stats_module

    monkeypatch.setattr(stats_module, "_CHUNK", 2)  # 7 entries: 4 chunks, the last one short
    rng = np.random.default_rng(1)
    waves = [
        (f"u{i}.wav", (0.1 * rng.standard_normal(4000 + 900 * i)).astype(np.float32), 16000) for i in range(7)
    ]
    root = tmp_path / "dataset"
    entries = _write_corpus(root, waves)
    one = compute_mel_stats(entries, root, FEATURES, progress=False, workers=1)
    pooled = compute_mel_stats(entries, root, FEATURES, progress=False, workers=2)
    expected_means, expected_vars, expected_n = _direct_stats(root, entries)
    assert one[2] == pooled[2] == expected_n
    assert torch.equal(one[0], pooled[0]) and torch.equal(one[1], pooled[1])
    assert torch.allclose(pooled[0], expected_means, rtol=1e-10, atol=1e-10)
    assert torch.allclose(pooled[1], expected_vars, rtol=1e-9, atol=1e-10)


def test_stats_files_load_with_weights_only(corpus, tmp_path):
    root, entries = corpus
    means, variances, n = compute_mel_stats(entries, root, FEATURES, progress=False)
    stats = tmp_path / "stats"
    save_mel_stats(stats, means, variances, n)
    assert sorted(p.name for p in stats.iterdir()) == ["melmeans.pt", "meln.pt", "melvars.pt"]
    loaded = {
        name: torch.load(stats / f"{name}.pt", weights_only=True) for name in ("melmeans", "melvars", "meln")
    }
    assert all(tensor.dtype == torch.float32 for tensor in loaded.values())
    assert loaded["melmeans"].shape == loaded["melvars"].shape == (80,)
    assert loaded["meln"].tolist() == [float(n)]
    assert torch.equal(loaded["melmeans"], means.float())

    melmeans, melvars, meln = load_mel_stats(stats, n_filt=80)
    assert torch.equal(melmeans, loaded["melmeans"]) and torch.equal(melvars, loaded["melvars"])
    assert meln.tolist() == [float(n)]


def test_zero_variance_is_refused_and_nothing_written(tmp_path):
    root = tmp_path / "dataset"
    silent = np.zeros(8000, dtype=np.float32)
    entries = _write_corpus(root, [("s1.flac", silent, 16000), ("s2.wav", silent, 16000)])
    with pytest.raises(DataError, match="variance is not > 0"):
        compute_mel_stats(entries, root, FEATURES, progress=False)
    with pytest.raises(DataError, match="variance is not > 0"):
        save_mel_stats(tmp_path / "stats", torch.zeros(80), torch.zeros(80), 10)
    assert not (tmp_path / "stats").exists()


def test_load_mel_stats_names_the_missing_or_mismatched_file(corpus, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_mel_stats(tmp_path / "nowhere")
    stats = tmp_path / "stats"
    save_mel_stats(stats, torch.zeros(80), torch.ones(80), 5)
    with pytest.raises(DataError, match="80 bins but the config's n_filt is 40"):
        load_mel_stats(stats, n_filt=40)
    (stats / "meln.pt").unlink()
    assert load_mel_stats(stats)[2] is None  # optional: upstream directories may lack it
    (stats / "melmeans.pt").rename(stats / "elsewhere.pt")
    with pytest.raises(DataError, match="melmeans.pt is missing"):
        load_mel_stats(stats)
    (stats / "elsewhere.pt").rename(stats / "melmeans.pt")
    (stats / "melvars.pt").write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="cannot read .*melvars.pt") as error:
        load_mel_stats(stats)
    assert "\n" not in str(error.value)


def _config(tmp_path: Path) -> Path:
    """The upstream test config with stats_path relative to the copy in tmp_path."""
    text = (CONFIGS / "testing-1023sp.yaml").read_text()
    text = text.replace("../../datasets/stats/STATS_SUBDIR", "stats_from_config")
    path = tmp_path / "model.yaml"
    path.write_text(text)
    return path


def test_command_writes_to_the_configs_stats_path(corpus, tmp_path):
    root, entries = corpus
    main(
        [
            "--model_config", str(_config(tmp_path)),
            "--dataset_dir", str(root),
            "--train_manifests", "train.json",
            "--max_files", "2",
        ]
    )  # fmt: skip
    melmeans, melvars, meln = load_mel_stats(tmp_path / "stats_from_config", n_filt=80)
    expected_means, expected_vars, expected_n = _direct_stats(root, entries[:2])
    assert meln.tolist() == [float(expected_n)]
    assert torch.allclose(melmeans, expected_means.float())
    assert torch.allclose(melvars, expected_vars.float())


def test_command_reports_a_missing_manifest_in_one_line(corpus, tmp_path):
    root, _ = corpus
    result = subprocess.run(
        [
            sys.executable, "-m", "caiman_asr_train.data.generate_mel_stats",
            "--model_config", str(_config(tmp_path)),
            "--dataset_dir", str(root),
            "--train_manifests", "missing.json",
            "--output_dir", str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "missing.json" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
