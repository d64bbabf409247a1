"""Log-mel features, normalisation, splicing and augmentation follow docs/formats.md section 6."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from caiman_asr_train.core.errors import ConfigError
from caiman_asr_train.data.features import (
    FeaturePipeline,
    FilterbankFeatures,
    InferenceFrontEnd,
    SpecAugment,
    SpeedPerturbation,
    dali_hann_window,
    frame_count,
    load_mel_stats,
    mel_filterbank,
    norm_weight,
    normalize,
    pad_audio,
    splice_frames,
)

FIXTURES = Path(__file__).parent / "fixtures"

# The base config's block (docs/formats.md section 4), dither off unless a test turns it on.
BASE = {
    "normalize": "per_feature",
    "sample_rate": 16000,
    "window_size": 0.025,
    "window_stride": 0.01,
    "window": "hann",
    "n_fft": 512,
    "n_filt": 80,
    "dither": 0.0,
    "stats_path": "unused",
}
SPLICING = {"frame_stacking": 3, "frame_subsampling": 3}


@pytest.fixture(scope="module")
def reference():
    return np.load(FIXTURES / "features_reference.npz")


@pytest.fixture(scope="module")
def librosa_mel():
    return np.load(FIXTURES / "mel_filterbank_reference.npz")


def test_window_is_dalis_half_sample_shifted_hann_not_torchs():
    for n in (400, 200, 7):
        index = np.arange(n)
        expected = 0.5 * (1 - np.cos(2 * np.pi * (index + 0.5) / n))
        window = dali_hann_window(n)
        assert window.dtype == torch.float64
        assert np.allclose(window.numpy(), expected, rtol=0, atol=1e-15)
        # no zero endpoints, symmetric about (n - 1) / 2
        assert float(window.min()) > 0
        assert torch.allclose(window, window.flip(0), rtol=0, atol=1e-15)
        assert not torch.allclose(window, torch.hann_window(n, periodic=False, dtype=torch.float64))
        assert not torch.allclose(window, torch.hann_window(n, periodic=True, dtype=torch.float64))
    assert torch.equal(dali_hann_window(400, torch.float32), dali_hann_window(400).to(torch.float32))
    assert torch.equal(FilterbankFeatures(**BASE).window, dali_hann_window(400))


def test_logmel_of_known_signal_matches_independent_reference(reference):
    signal = torch.from_numpy(reference["signal"])
    fb = FilterbankFeatures(**BASE)
    logmel, lens = fb(signal[None], torch.tensor([signal.numel()]))
    expected = torch.from_numpy(reference["logmel"])
    assert logmel.dtype == torch.float32
    assert logmel.shape == (1, 80, expected.shape[1])
    assert lens.tolist() == [expected.shape[1]]
    assert torch.allclose(logmel[0], expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "initial_padding,key",
    [(False, "speech_norm_unpadded"), (True, "speech_norm_padded")],
)
def test_speech_normalised_per_utterance_matches_independent_dali_window_reference(
    reference, initial_padding, key
):
    speech = torch.from_numpy(reference["speech"].astype(np.float32) / 32768)[None]
    fb = FilterbankFeatures(**BASE, initial_padding=initial_padding)
    logmel, lens = fb(speech, torch.tensor([speech.shape[1]]))
    normalised = normalize(logmel, lens, torch.zeros(80), torch.ones(80), weight=0.0)
    expected = torch.from_numpy(reference[key])
    assert normalised.shape == (1, 80, expected.shape[1])
    assert torch.allclose(normalised[0], expected, rtol=0, atol=5e-4)
    # the symmetric Hann window misses this reference by two orders of magnitude more
    fb.window = torch.hann_window(fb.win_length, periodic=False, dtype=torch.float64)
    symmetric = normalize(*fb(speech, torch.tensor([speech.shape[1]])), torch.zeros(80), torch.ones(80), 0.0)
    assert (symmetric[0] - expected).abs().max() > 1e-2


def test_float32_training_front_end_stays_near_the_float64_one(reference):
    """Training computes the filterbank in float32; validation and export keep float64."""
    speech = torch.from_numpy(reference["speech"].astype(np.float32) / 32768)[None]
    lens = torch.tensor([speech.shape[1]])
    exact = FilterbankFeatures(**BASE)
    fast = FilterbankFeatures(**BASE, compute_dtype=torch.float32)
    assert exact.fbanks.dtype == exact.window.dtype == torch.float64
    assert fast.fbanks.dtype == fast.window.dtype == torch.float32
    exact_logmel, exact_lens = exact(speech, lens)
    fast_logmel, fast_lens = fast(speech, lens)
    assert torch.equal(exact_lens, fast_lens) and fast_logmel.dtype == torch.float32
    # float32 rounding only: far below a log-mel's natural variation, but not bit-equal
    difference = (fast_logmel - exact_logmel).abs().max()
    assert 0 < difference < 1e-2
    with pytest.raises(ValueError, match="compute_dtype"):
        FilterbankFeatures(**BASE, compute_dtype=torch.float16)


def test_pipelines_of_a_config_train_in_float32_and_validate_in_float64(tmp_path):
    from caiman_asr_train.data.generate_mel_stats import save_mel_stats
    from caiman_asr_train.rnnt import config
    from caiman_asr_train.train_utils.builders import build_pipeline

    save_mel_stats(tmp_path, torch.zeros(80, dtype=torch.float64), torch.ones(80, dtype=torch.float64), 10)
    cfg = config.load(Path(__file__).parents[2] / "configs" / "demo.yaml")
    for split in ("train", "val"):
        cfg[f"input_{split}"]["filterbank_features"]["stats_path"] = str(tmp_path)
    assert build_pipeline(cfg, "train").filterbank.compute_dtype == torch.float32
    assert build_pipeline(cfg, "val").filterbank.compute_dtype == torch.float64


def test_initial_padding_prepends_the_servers_zeros(reference):
    speech = torch.from_numpy(reference["speech"].astype(np.float32) / 32768)[None]
    lens = torch.tensor([speech.shape[1]])
    padded, padded_lens = FilterbankFeatures(**BASE)(speech, lens)
    by_hand, by_hand_lens = FilterbankFeatures(**BASE, initial_padding=False)(
        torch.nn.functional.pad(speech, (240, 0)), lens + 240
    )
    assert torch.equal(padded_lens, by_hand_lens)
    assert torch.equal(padded, by_hand)


@pytest.mark.parametrize(
    "sample_rate,n_fft,n_filt,key",
    [(16000, 512, 80, "fbank_16k_512_80"), (8000, 256, 40, "fbank_8k_256_40")],
)
def test_mel_filterbank_matches_librosa_slaney(librosa_mel, sample_rate, n_fft, n_filt, key):
    fbank = mel_filterbank(sample_rate, n_fft, n_filt)
    expected = torch.from_numpy(librosa_mel[key])
    assert fbank.shape == (n_filt, n_fft // 2 + 1)
    assert torch.allclose(fbank, expected, rtol=1e-5, atol=1e-9)


def test_frame_count_is_uncentred_formula_after_initial_padding():
    fb = FilterbankFeatures(**BASE)
    win, hop = 400, 160
    assert (fb.win_length, fb.hop_length, fb.initial_padding) == (win, hop, 240)
    for num_samples in [0, 100, 159, 160, 161, 1000, 12345]:
        padded = num_samples + 240
        expected = max(0, 1 + (padded - win) // hop) if padded >= win else 0
        logmel, lens = fb(torch.ones(1, num_samples), torch.tensor([num_samples]))
        assert lens.tolist() == [expected]
        assert logmel.shape == (1, 80, expected)
    assert frame_count(torch.tensor([399, 400, 559, 560]), win, hop).tolist() == [0, 1, 1, 2]


def test_batching_mixed_lengths_gives_the_same_values_as_one_at_a_time():
    gen = torch.Generator().manual_seed(1)
    lengths = [16000, 5003, 9999]
    batch = torch.randn(3, 16000, generator=gen)  # garbage past each end must be ignored
    fb = FilterbankFeatures(**BASE)
    logmel, lens = fb(batch, torch.tensor(lengths))
    for b, n in enumerate(lengths):
        alone, alone_lens = fb(batch[b : b + 1, :n], torch.tensor([n]))
        t = int(alone_lens[0])
        assert int(lens[b]) == t
        assert torch.allclose(logmel[b, :, :t], alone[0], rtol=0, atol=1e-5)
        assert logmel[b, :, t:].abs().sum() == 0

    melmeans = torch.linspace(-5, 5, 80)
    melvars = torch.linspace(0.5, 4, 80)
    pipeline = FeaturePipeline(BASE, SPLICING, melmeans, melvars).eval()
    x, x_lens = pipeline(batch, torch.tensor(lengths), norm_weight=0.4)
    assert x.shape[1:] == (3, 240)
    for b, n in enumerate(lengths):
        alone, alone_lens = pipeline(batch[b : b + 1, :n], torch.tensor([n]), norm_weight=0.4)
        t = int(alone_lens[0])
        assert int(x_lens[b]) == t
        assert torch.allclose(x[:t, b], alone[:, 0], rtol=0, atol=1e-4)
        assert x[t:, b].abs().sum() == 0


def test_dither_is_gaussian_noise_reproducible_with_a_generator():
    silence = torch.zeros(1, 8000)
    lens = torch.tensor([8000])
    quiet, _ = FilterbankFeatures(**BASE)(silence, lens)
    assert torch.all(quiet == math.log(1e-20))

    dithered = FilterbankFeatures(**{**BASE, "dither": 1e-5})
    a, _ = dithered(silence, lens, generator=torch.Generator().manual_seed(3))
    b, _ = dithered(silence, lens, generator=torch.Generator().manual_seed(3))
    c, _ = dithered(silence, lens, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # noise power 1e-10 per sample: log-mels far above the floor, far below speech
    assert -40 < a.mean() < -15


def test_pad_audio_appends_zeros_after_each_utterance_end():
    audio = torch.arange(1, 13, dtype=torch.float32).reshape(2, 6)
    padded, lens = pad_audio(audio, torch.tensor([6, 3]), seconds=0.25, sample_rate=8)
    assert lens.tolist() == [8, 5]
    assert padded.tolist() == [
        [1, 2, 3, 4, 5, 6, 0, 0],
        [7, 8, 9, 0, 0, 0, 0, 0],
    ]


def test_splice_frames_orders_frame_t_then_following_frames_and_subsamples():
    x = torch.arange(2 * 5, dtype=torch.float32).reshape(1, 2, 5) + 1  # bins x frames
    # frame t holds bins [t+1, t+6]
    out, lens = splice_frames(x, torch.tensor([5]), stacking=3, subsampling=3)
    assert out.shape == (1, 6, 2)
    assert lens.tolist() == [2]
    assert out[0, :, 0].tolist() == [1, 6, 2, 7, 3, 8]
    assert out[0, :, 1].tolist() == [4, 9, 5, 10, 0, 0]

    # frames at or past an utterance's own length count as zeros
    short, short_lens = splice_frames(x, torch.tensor([4]), stacking=3, subsampling=3)
    assert short_lens.tolist() == [2]
    assert short[0, :, 1].tolist() == [4, 9, 0, 0, 0, 0]

    stacked, stacked_lens = splice_frames(x, torch.tensor([5]), stacking=2, subsampling=1)
    assert stacked.shape == (1, 4, 5)
    assert stacked_lens.tolist() == [5]
    assert stacked[0, :, 4].tolist() == [5, 10, 0, 0]


def test_splice_lengths_are_ceil_of_len_over_subsampling():
    x = torch.ones(4, 3, 10)
    lens = torch.tensor([10, 9, 7, 1])
    out, out_lens = splice_frames(x, lens, stacking=3, subsampling=3)
    assert out.shape == (4, 9, 4)
    assert out_lens.tolist() == [4, 3, 3, 1]


def test_norm_weight_ramp_endpoints():
    assert norm_weight(0, 100, 200) == 0.0
    assert norm_weight(100, 100, 200) == 0.0
    assert norm_weight(150, 100, 200) == 0.5
    assert norm_weight(175, 100, 200) == 0.75
    assert norm_weight(200, 100, 200) == 1.0
    assert norm_weight(10_000, 100, 200) == 1.0
    assert norm_weight(5, 0, 0) == 1.0


def _features(lengths, n_bins=4, frames=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), n_bins, frames, generator=gen) * 3 + 2
    lens = torch.tensor(lengths)
    steps = torch.arange(frames)
    return x * (steps[None, None, :] < lens[:, None, None]), lens


def test_dataset_normalisation_uses_the_statistics():
    x, lens = _features([12, 7])
    means = torch.tensor([1.0, -2.0, 0.5, 3.0])
    variances = torch.tensor([4.0, 1.0, 0.25, 9.0])
    out = normalize(x, lens, means, variances, weight=1.0)
    expected = (x - means[None, :, None]) / variances.sqrt()[None, :, None]
    assert torch.allclose(out[0], expected[0])
    assert torch.allclose(out[1, :, :7], expected[1, :, :7])
    assert out[1, :, 7:].abs().sum() == 0


def test_utterance_normalisation_uses_only_valid_frames():
    x, lens = _features([12, 7])
    out = normalize(x, lens, torch.zeros(4), torch.ones(4), weight=0.0)
    valid = out[1, :, :7]
    assert torch.allclose(valid.mean(dim=1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(valid.std(dim=1, unbiased=False), torch.ones(4), atol=1e-4)
    assert out[1, :, 7:].abs().sum() == 0
    # the same utterance without padding frames gives the same values
    alone = normalize(x[1:, :, :7], lens[1:], torch.zeros(4), torch.ones(4), weight=0.0)
    assert torch.allclose(alone[0], valid, atol=1e-6)


def test_normalisation_blend_is_weighted_sum():
    x, lens = _features([12, 9])
    means, variances = torch.randn(4), torch.rand(4) + 0.5
    dataset = normalize(x, lens, means, variances, weight=1.0)
    utterance = normalize(x, lens, means, variances, weight=0.0)
    blended = normalize(x, lens, means, variances, weight=0.3)
    assert torch.allclose(blended, 0.3 * dataset + 0.7 * utterance, atol=1e-6)


def test_specaugment_masks_only_in_train_mode():
    x = torch.ones(2, 80, 100)
    lens = torch.tensor([100, 60])
    augment = SpecAugment(freq_masks=2, min_freq=5, max_freq=10, time_masks=0)
    augment.eval()
    assert torch.equal(augment(x, lens), x)

    augment.train()
    out = augment(x, lens, generator=torch.Generator().manual_seed(0))
    for b in range(2):
        masked_bins = (out[b] == 0).all(dim=1)
        assert 5 <= int(masked_bins.sum()) <= 20
        # a frequency mask hides whole bins, nothing else
        assert torch.all(out[b][~masked_bins] == 1)


def test_specaugment_time_masks_stay_inside_each_utterance():
    x = torch.ones(3, 8, 200)
    lens = torch.tensor([200, 50, 120])
    augment = SpecAugment(time_masks=10, min_time=0, max_time=0.05).train()
    out = augment(x, lens, generator=torch.Generator().manual_seed(1))
    for b, n in enumerate(lens.tolist()):
        masked_frames = (out[b] == 0).all(dim=0)
        assert not masked_frames[n:].any()
        # 10 masks of at most 5% of the utterance each
        assert 0 < int(masked_frames.sum()) <= 10 * int(0.05 * n)

    frames = SpecAugment(time_masks=1, min_time=7, max_time=7).train()
    gen = torch.Generator().manual_seed(2)
    out = frames(torch.ones(1, 8, 40), torch.tensor([40]), generator=gen)
    assert int((out[0] == 0).all(dim=0).sum()) == 7


def test_pipeline_applies_specaugment_only_in_train_mode():
    audio = torch.randn(2, 8000, generator=torch.Generator().manual_seed(5))
    lens = torch.tensor([8000, 6000])
    stats = (torch.zeros(80), torch.ones(80))
    plain = FeaturePipeline(BASE, SPLICING, *stats)
    augmented = FeaturePipeline(
        BASE, SPLICING, *stats, spec_augment={"freq_masks": 2, "min_freq": 10, "max_freq": 20}
    )
    expected, expected_lens = plain.eval()(audio, lens)
    got, got_lens = augmented.eval()(audio, lens)
    assert torch.equal(got, expected) and torch.equal(got_lens, expected_lens)
    trained, _ = augmented.train()(audio, lens, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(trained, expected)
    assert plain.out_features == 240
    assert expected.shape == (math.ceil(50 / 3), 2, 240)
    assert expected_lens.tolist() == [17, 13]


@pytest.mark.parametrize("rate", [0.8, 1.25])
def test_speed_perturbation_changes_length_and_pitch_by_the_rate(rate):
    sample_rate = 16000
    t = np.arange(sample_rate) / sample_rate
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    out = SpeedPerturbation(min_rate=rate, max_rate=rate, p=1.0)(tone)
    assert out.dtype == np.float32
    assert abs(len(out) - len(tone) / rate) <= 2
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    peak_hz = np.argmax(spectrum) * sample_rate / len(out)
    assert abs(peak_hz - 1000 * rate) < 5


def test_speed_perturbation_probability_and_range():
    audio = np.zeros(1000, dtype=np.float32)
    never = SpeedPerturbation(min_rate=0.5, max_rate=2.0, p=0.0)
    assert never(audio) is audio
    sometimes = SpeedPerturbation(min_rate=0.9, max_rate=1.1, p=1.0, seed=0)
    rates = [sometimes.sample_rate_factor() for _ in range(200)]
    assert all(0.9 <= r <= 1.1 for r in rates)
    assert len(set(rates)) > 100


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="window"):
        FilterbankFeatures(**{**BASE, "window": "hamming"})
    with pytest.raises(ConfigError, match="n_fft"):
        FilterbankFeatures(**{**BASE, "n_fft": 256})
    with pytest.raises(ConfigError, match="speed_perturbation"):
        SpeedPerturbation(min_rate=1.2, max_rate=0.8)
    with pytest.raises(ConfigError, match="spec_augment"):
        SpecAugment(freq_masks=1, min_freq=10, max_freq=5)


def test_inference_front_end_is_the_eval_pipeline_and_builds_from_a_data_config(reference):
    speech = torch.from_numpy(reference["speech"].astype(np.float32) / 32768)[None]
    lens = torch.tensor([speech.shape[1]])
    melmeans, melvars = torch.linspace(-12, -4, 80), torch.linspace(2, 9, 80)
    data_config = {
        "filterbank_features": BASE,
        "frame_splicing": SPLICING,
        "melmeans": melmeans,
        "melvars": melvars,
    }
    front_end = InferenceFrontEnd.from_data_config(data_config)
    x, x_lens = front_end(speech, lens)
    assert front_end.out_features == 240 and x.shape == (int(x_lens[0]), 1, 240)
    spec_augment = {"freq_masks": 2, "max_freq": 20, "time_masks": 2, "max_time": 0.05}
    pipeline = FeaturePipeline(BASE, SPLICING, melmeans, melvars, spec_augment).eval()
    expected, expected_lens = pipeline(speech, lens)
    assert torch.equal(x, expected) and torch.equal(x_lens, expected_lens)
    # by hand: dataset normalisation, then splicing, time-major
    logmel, frames = FilterbankFeatures(**BASE)(speech, lens)
    spliced, _ = splice_frames(normalize(logmel, frames, melmeans, melvars, 1.0), frames, 3, 3)
    assert torch.equal(x, spliced.permute(2, 0, 1))


def test_training_imports_of_the_front_end_are_the_core_objects():
    import caiman_asr_train.core.features as core
    import caiman_asr_train.data.features as data

    for name in (
        "FilterbankFeatures",
        "InferenceFrontEnd",
        "load_mel_stats",
        "normalize",
        "splice_frames",
        "pad_audio",
        "mel_filterbank",
        "frame_count",
    ):
        assert getattr(data, name) is getattr(core, name)


def test_mel_stats_without_meln_load_as_upstream_directories_have_them(tmp_path):
    torch.save(torch.linspace(-10, -2, 80), tmp_path / "melmeans.pt")
    torch.save(torch.linspace(1, 5, 80), tmp_path / "melvars.pt")
    melmeans, melvars, meln = load_mel_stats(tmp_path, n_filt=80)
    assert meln is None
    assert torch.equal(melmeans, torch.linspace(-10, -2, 80))
    assert torch.equal(melvars, torch.linspace(1, 5, 80))
    torch.save(torch.tensor([1234.0]), tmp_path / "meln.pt")
    assert load_mel_stats(tmp_path)[2].tolist() == [1234.0]
