"""The inference front end: waveform -> encoder input, as docs/formats.md section 6 and the server.

Every step here is the inference server's step, in the server's order:

    waveform [B, N] (+ val-time final padding, see ``pad_audio``)
      -> FilterbankFeatures   initial padding, dither, pre-emphasis, power STFT with
                              DALI's Hann window, Slaney mel filterbank, natural log
                                                                   -> [B, n_filt, T]
      -> normalize            dataset statistics (``load_mel_stats``), optionally
                              blended with per-utterance ones
      -> splice_frames        stack and subsample frames          -> [B, n_filt*stacking, T']
      -> time-major           [T', B, n_filt*stacking], what ``RNNT.encode`` takes

``InferenceFrontEnd`` chains these for decoding a hardware checkpoint. Training
adds augmentation on top (``caiman_asr_train.data.features``). Torch and the
standard library only, so an inference user needs nothing of the training stack;
everything runs on whatever device the audio is on.

Batching never changes values: each utterance's frame count comes from its own
length, its frames read only its own samples, and every frame past its length
is exactly zero at every stage, so an utterance gives the same features alone
or padded in a batch (dither aside, which is random).
"""

import math
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from caiman_asr_train.core.errors import ConfigError, DataError

# Bump when any step above changes the features a given waveform gets, so that
# statistics and models computed with the old front end are recognisably stale
# (the demo recipe's fingerprint includes it). 2: DALI's Hann window.
FRONT_END_VERSION = 2

PREEMPHASIS = 0.97
LOG_FLOOR = 1e-20
# Added to the per-utterance standard deviation so a constant bin (or a
# one-frame utterance) divides by a small number, not by zero.
UTTERANCE_STD_EPS = 1e-5
# meln.pt (the frame count) is written for provenance but not needed to
# normalise: upstream statistics directories may hold only the first two.
STATS_FILES = ("melmeans.pt", "melvars.pt")
STATS_COUNT_FILE = "meln.pt"
_STATS_HINT = "make them with python -m caiman_asr_train.data.generate_mel_stats"


def _samples(seconds: float, sample_rate: int) -> int:
    # round, not int(): 0.025 * 16000 must be 400 samples even if the float
    # product lands a hair below 400.
    return int(round(seconds * sample_rate))


# Slaney's Auditory Toolbox mel scale: linear below 1 kHz, logarithmic above.
_MEL_LINEAR_HZ = 200.0 / 3  # Hz per mel below the break
_MEL_BREAK_HZ = 1000.0
_MEL_BREAK = _MEL_BREAK_HZ / _MEL_LINEAR_HZ
_MEL_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    log_part = _MEL_BREAK + torch.log(torch.clamp(hz, min=_MEL_BREAK_HZ) / _MEL_BREAK_HZ) / _MEL_LOG_STEP
    return torch.where(hz >= _MEL_BREAK_HZ, log_part, hz / _MEL_LINEAR_HZ)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    log_part = _MEL_BREAK_HZ * torch.exp(_MEL_LOG_STEP * (mel - _MEL_BREAK))
    return torch.where(mel >= _MEL_BREAK, log_part, mel * _MEL_LINEAR_HZ)


def mel_filterbank(sample_rate: int, n_fft: int, n_filt: int) -> torch.Tensor:
    """Slaney-scale triangular mel filters with Slaney ('area') normalisation.

    ``n_filt`` triangles evenly spaced on the Slaney mel scale over
    0 .. sample_rate/2 Hz; each is scaled by 2 / (its bandwidth in Hz) so all
    have the same area. Computed in float64, returned as float32.

    Returns:
        Tensor [n_filt, n_fft // 2 + 1]: weight of each rFFT bin in each mel bin.
    """
    f64 = torch.float64
    fft_freqs = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=f64)
    top_mel = _hz_to_mel(torch.tensor(sample_rate / 2, dtype=f64))
    hz_edges = _mel_to_hz(torch.linspace(0.0, float(top_mel), n_filt + 2, dtype=f64))
    widths = torch.diff(hz_edges)
    # distance from every edge to every FFT bin: [n_filt + 2, n_bins]
    ramps = hz_edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    weights = weights * (2.0 / (hz_edges[2:] - hz_edges[:-2]))[:, None]
    return weights.to(torch.float32)


def dali_hann_window(length: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """NVIDIA DALI's Hann window: ``w[n] = 0.5 * (1 - cos(2*pi*(n + 0.5) / N))``, n = 0..N-1.

    CAIMAN-ASR's training front end is DALI's ``Spectrogram`` with its default
    window, and the inference server featurises as that front end does, so a
    model only sees the features it was trained on if we use the same formula.
    It is neither torch's periodic (``2*pi*n / N``) nor symmetric
    (``2*pi*n / (N - 1)``) Hann window: the half-sample shift makes it symmetric
    about (N - 1) / 2 with no zero endpoints. Using the symmetric window instead
    moves raw log-mels by about 3e-3.

    Computed in float64 and then cast, so a float32 window is the correctly
    rounded value of the formula.

    Returns:
        Tensor [length] of ``dtype``.
    """
    n = torch.arange(length, dtype=torch.float64)
    return (0.5 * (1.0 - torch.cos(2.0 * math.pi * (n + 0.5) / length))).to(dtype)


def frame_count(num_samples: torch.Tensor, win_length: int, hop_length: int) -> torch.Tensor:
    """Frames of an un-centred STFT: ``1 + (N - win) // hop``, 0 when N < win.

    Args:
        num_samples: int tensor [B], signal lengths in samples (after padding).
    Returns:
        int64 tensor [B], frames per signal.
    """
    num_samples = num_samples.to(torch.int64)
    frames = 1 + torch.div(num_samples - win_length, hop_length, rounding_mode="floor")
    return torch.where(num_samples >= win_length, frames, torch.zeros_like(frames))


def _zero_past_length(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Zero every frame t >= lens[b] of x [B, F, T]."""
    steps = torch.arange(x.shape[-1], device=x.device)
    valid = steps[None, :] < lens.to(x.device)[:, None]
    return x * valid[:, None, :].to(x.dtype)


class FilterbankFeatures(nn.Module):
    """Waveform -> natural-log mel power spectrogram, exactly as docs/formats.md section 6.

    Per utterance: prepend ``int(sample_rate * (window_size - window_stride))``
    zeros (the server's initial padding; ``initial_padding=False`` skips it, to
    compare with front ends that do not pad, such as DALI on its own); add Gaussian dither of std ``dither`` when
    ``dither > 0``; pre-emphasis ``y[n] = x[n] - 0.97 x[n-1]`` (``y[0] = x[0]``);
    frame t covers padded samples ``[t*hop, t*hop + win)`` with no centring, so
    ``frames = 1 + (N - win) // hop`` for a padded length N; multiply by DALI's
    Hann window of ``win`` samples (``dali_hann_window``: CAIMAN-ASR's front end
    is DALI's ``Spectrogram``); power of the ``n_fft``-point rFFT (the windowed
    frame zero-padded at the end; where the padding goes only changes each
    bin's phase, not its power); Slaney mel filterbank; ``ln(max(x, 1e-20))``.

    Pre-emphasis, spectrum, mel projection and log are computed in float64 (unless
    ``compute_dtype`` says float32) and the result returned in the audio's dtype:
    the log turns tiny absolute rounding errors in low-energy bins (after
    pre-emphasis, the lowest mel bins of speech) into large ones, and float32
    there drifts ~2e-4 from the exact value. The extra cost is small next to the
    acoustic model.

    Args:
        sample_rate: Hz.
        window_size: analysis window in seconds (win = window_size * sample_rate samples).
        window_stride: hop in seconds (hop = window_stride * sample_rate samples).
        window: must be "hann".
        n_fft: FFT size, >= win.
        n_filt: mel bins.
        dither: std of Gaussian noise added to the waveform (same units as the
            samples, full scale 1.0); 0 turns it off.
        initial_padding: prepend the server's initial padding (default); off
            only to compare with front ends that do not pad.
        compute_dtype: float64 (default: what inference, validation and export
            use) or float32, which training uses: about half the cost, and a
            ~2e-4 drift in the lowest mel bins is far below the noise that
            training adds anyway.
        **ignored: other keys of the config's ``filterbank_features`` block
            (``normalize``, ``stats_path``), accepted so the block can be passed whole.
    """

    def __init__(
        self,
        sample_rate: int,
        window_size: float,
        window_stride: float,
        window: str,
        n_fft: int,
        n_filt: int,
        dither: float,
        *,
        initial_padding: bool = True,
        compute_dtype: torch.dtype = torch.float64,
        **ignored: Any,
    ) -> None:
        super().__init__()
        if compute_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"compute_dtype must be torch.float64 or torch.float32, got {compute_dtype}")
        self.compute_dtype = compute_dtype
        if window != "hann":
            raise ConfigError(f"filterbank_features.window: {window!r} is not supported; set it to 'hann'")
        self.sample_rate = int(sample_rate)
        self.win_length = _samples(window_size, sample_rate)
        self.hop_length = _samples(window_stride, sample_rate)
        # The server's formula, int() included.
        self.initial_padding = int(sample_rate * (window_size - window_stride)) if initial_padding else 0
        self.n_fft = int(n_fft)
        self.n_filt = int(n_filt)
        self.dither = float(dither)
        if self.hop_length <= 0 or self.win_length <= 0:
            raise ConfigError(
                "filterbank_features: window_size and window_stride must be positive; "
                f"got {window_size} and {window_stride}"
            )
        if self.win_length > self.n_fft:
            raise ConfigError(
                f"filterbank_features: window of {self.win_length} samples is longer than "
                f"n_fft={self.n_fft}; raise n_fft or shorten window_size"
            )
        if self.initial_padding < 0:
            raise ConfigError(
                "filterbank_features: window_stride must not exceed window_size; "
                f"got {window_stride} > {window_size}"
            )
        # Derived from the config, so not part of any state_dict.
        self.register_buffer("window", dali_hann_window(self.win_length, compute_dtype), persistent=False)
        self.register_buffer(
            "fbanks",
            mel_filterbank(self.sample_rate, self.n_fft, self.n_filt).to(compute_dtype),
            persistent=False,
        )

    def get_seq_len(self, audio_lens: torch.Tensor) -> torch.Tensor:
        """Frames per utterance [B] for audio lengths [B] in samples (before padding)."""
        return frame_count(audio_lens + self.initial_padding, self.win_length, self.hop_length)

    @torch.no_grad()
    def forward(
        self,
        audio: torch.Tensor,
        audio_lens: torch.Tensor,
        generator: Optional[torch.Generator] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute log-mel features.

        Args:
            audio: float [B, N] waveforms, full scale 1.0; samples past each
                utterance's length are ignored.
            audio_lens: int [B], samples per utterance.
            generator: optional torch.Generator for reproducible dither.
        Returns:
            logmel: [B, n_filt, T] natural-log mel power in audio's dtype, zero past each
                utterance's frame count; T = frames of the padded batch width.
            lens: int64 [B], frames per utterance.
        """
        if audio.dim() != 2:
            raise ValueError(f"audio must be [B, N], got shape {tuple(audio.shape)}")
        audio_lens = audio_lens.to(device=audio.device, dtype=torch.int64)
        lens = self.get_seq_len(audio_lens)
        x = nn.functional.pad(audio.to(self.compute_dtype), (self.initial_padding, 0))
        if self.dither > 0:
            x = x + self.dither * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = torch.cat((x[:, :1], x[:, 1:] - PREEMPHASIS * x[:, :-1]), dim=1)

        if x.shape[1] < self.win_length:
            return audio.new_zeros(audio.shape[0], self.n_filt, 0), lens
        frames = x.unfold(1, self.win_length, self.hop_length)  # [B, T, win]
        spectrum = torch.fft.rfft(frames * self.window, n=self.n_fft)  # [B, T, n_fft//2 + 1]
        power = spectrum.real.square() + spectrum.imag.square()
        mel = torch.matmul(power, self.fbanks.t())  # [B, T, n_filt]
        logmel = torch.log(torch.clamp(mel, min=LOG_FLOOR)).transpose(1, 2).to(audio.dtype)
        return _zero_past_length(logmel, lens), lens


def pad_audio(
    audio: torch.Tensor, audio_lens: torch.Tensor, seconds: float, sample_rate: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``seconds`` of zeros after each utterance's own end (val-time final padding).

    Args:
        audio: float [B, N]; samples past audio_lens may hold anything.
        audio_lens: int [B], samples per utterance.
        seconds: padding per utterance (``--val_final_padding_secs``, e.g. 0.24).
        sample_rate: Hz.
    Returns:
        audio [B, max(audio_lens) + pad] with zeros from each utterance's end,
        and audio_lens + pad, where pad = round(seconds * sample_rate) samples.
    """
    pad = _samples(seconds, sample_rate)
    if pad < 0:
        raise ValueError(f"final padding must be >= 0 seconds, got {seconds}")
    audio_lens = audio_lens.to(device=audio.device, dtype=torch.int64)
    width = int(audio_lens.max()) if audio_lens.numel() else 0
    # Zero whatever sat past each end so the appended stretch is really silence.
    steps = torch.arange(width, device=audio.device)
    valid = steps[None, :] < audio_lens[:, None]
    trimmed = audio[:, :width] * valid.to(audio.dtype)
    return nn.functional.pad(trimmed, (0, pad)), audio_lens + pad


def _read_stats_tensor(path: Path) -> torch.Tensor:
    """One float tensor from a statistics file, as float32; DataError naming the file otherwise."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own message spans many lines; the type is enough to tell corrupt from foreign
        raise DataError(
            f"cannot read mel statistics file {path} as a tensor ({type(exc).__name__}); {_STATS_HINT}"
        ) from None
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise DataError(f"mel statistics file {path} does not hold a float tensor; {_STATS_HINT}")
    return value.to(torch.float32)


def load_mel_stats(
    stats_path: Union[str, Path], n_filt: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Read dataset mel statistics written by ``generate_mel_stats`` (or upstream CAIMAN-ASR).

    Args:
        stats_path: directory holding melmeans.pt and melvars.pt, and usually meln.pt.
        n_filt: when given, the statistics must have this many bins.
    Returns:
        melmeans float32 [n_filt], melvars float32 [n_filt] (all > 0), and
        meln float32 [1] (frames they were computed over), or None when the
        directory has no meln.pt.
    Raises:
        DataError naming the directory or file when missing, unreadable or invalid.
    """
    stats_dir = Path(stats_path)
    if not stats_dir.is_dir():
        raise DataError(f"mel statistics directory {stats_dir} does not exist; {_STATS_HINT}")
    tensors = []
    for name in STATS_FILES:
        path = stats_dir / name
        if not path.is_file():
            raise DataError(f"mel statistics file {path} is missing; {_STATS_HINT}")
        tensors.append(_read_stats_tensor(path))
    melmeans, melvars = tensors
    count_path = stats_dir / STATS_COUNT_FILE
    meln = _read_stats_tensor(count_path).reshape(-1) if count_path.is_file() else None
    if melmeans.dim() != 1 or melmeans.shape != melvars.shape:
        raise DataError(
            f"mel statistics in {stats_dir}: melmeans {tuple(melmeans.shape)} and melvars "
            f"{tuple(melvars.shape)} must both be [n_filt]; {_STATS_HINT}"
        )
    if n_filt is not None and melmeans.numel() != n_filt:
        raise DataError(
            f"mel statistics in {stats_dir} have {melmeans.numel()} bins but the config's "
            f"n_filt is {n_filt}; regenerate them for this config"
        )
    if not bool(torch.isfinite(melmeans).all()) or not bool((melvars > 0).all()):
        raise DataError(
            f"mel statistics in {stats_dir} have non-finite means or variances <= 0; {_STATS_HINT}"
        )
    return melmeans, melvars, meln


def normalize(
    logmel: torch.Tensor,
    lens: torch.Tensor,
    melmeans: torch.Tensor,
    melvars: torch.Tensor,
    weight: float,
) -> torch.Tensor:
    """Blend dataset and per-utterance normalisation: ``w*dataset + (1-w)*utterance``.

    dataset:   ``(x - melmeans) / sqrt(melvars)`` per bin.
    utterance: ``(x - mean_u) / (std_u + 1e-5)`` per bin, with the mean and
               population std over the utterance's own valid frames.
    With ``weight == 1`` (validation, inference) the per-utterance statistics are
    not computed at all; with ``weight == 0`` the dataset statistics are unused.

    Args:
        logmel: [B, F, T] log-mel features, zero past lens.
        lens: int [B], valid frames per utterance.
        melmeans, melvars: [F] dataset statistics.
        weight: w in [0, 1].
    Returns:
        [B, F, T] normalised features, zero past lens.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"normalisation weight must be in [0, 1], got {weight}")
    lens = lens.to(logmel.device)
    out = torch.zeros_like(logmel)
    if weight > 0:
        means = melmeans.to(logmel)[None, :, None]
        stds = melvars.to(logmel).sqrt()[None, :, None]
        out = out + weight * (logmel - means) / stds
    if weight < 1:
        steps = torch.arange(logmel.shape[-1], device=logmel.device)
        valid = (steps[None, :] < lens[:, None]).to(logmel.dtype)[:, None, :]
        count = lens.clamp(min=1).to(logmel.dtype)[:, None, None]
        mean_u = (logmel * valid).sum(-1, keepdim=True) / count
        var_u = (((logmel - mean_u) * valid).square()).sum(-1, keepdim=True) / count
        out = out + (1 - weight) * (logmel - mean_u) / (var_u.sqrt() + UTTERANCE_STD_EPS)
    return _zero_past_length(out, lens)


def splice_frames(
    x: torch.Tensor, lens: torch.Tensor, stacking: int, subsampling: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack each frame with its next ``stacking - 1`` frames, keep every ``subsampling``-th.

    Output frame t' holds input frames ``s, s+1, .., s+stacking-1`` (s = t' *
    subsampling) along features, ordered frame s's F bins first; frames at or
    past an utterance's length count as zeros.

    Args:
        x: [B, F, T].
        lens: int [B], valid frames.
    Returns:
        [B, F*stacking, ceil(T / subsampling)], and lens ``ceil(lens / subsampling)``.
    """
    if stacking < 1 or subsampling < 1:
        raise ConfigError(
            f"frame_splicing: frame_stacking ({stacking}) and frame_subsampling ({subsampling}) must be >= 1"
        )
    lens = lens.to(device=x.device, dtype=torch.int64)
    x = _zero_past_length(x, lens)
    shifted = [x]
    for n in range(1, stacking):
        shifted.append(nn.functional.pad(x[:, :, n:], (0, min(n, x.shape[-1]))))
    stacked = torch.cat(shifted, dim=1)[:, :, ::subsampling]
    return stacked, torch.div(lens + subsampling - 1, subsampling, rounding_mode="floor")


class InferenceFrontEnd(nn.Module):
    """Waveforms -> encoder input with dataset normalisation: what decoding needs.

    filterbank -> ``normalize`` with dataset statistics (weight 1) ->
    ``splice_frames`` -> time-major. Build it from a loaded hardware checkpoint
    with ``InferenceFrontEnd.from_data_config(ckpt.data_config)``.

    Args:
        filterbank_features: the config's ``filterbank_features`` block.
        frame_splicing: the config's ``frame_splicing`` block
            (``frame_stacking``, ``frame_subsampling``).
        melmeans, melvars: float [n_filt] dataset statistics (``load_mel_stats``).
        compute_dtype: the filterbank's arithmetic (``FilterbankFeatures``);
            float64 unless a caller (training) chooses speed over the last digits.
    """

    def __init__(
        self,
        filterbank_features: dict,
        frame_splicing: dict,
        melmeans: torch.Tensor,
        melvars: torch.Tensor,
        compute_dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        self.filterbank = FilterbankFeatures(**filterbank_features, compute_dtype=compute_dtype)
        if melmeans.shape != (self.filterbank.n_filt,) or melvars.shape != melmeans.shape:
            raise DataError(
                f"mel statistics have shapes {tuple(melmeans.shape)}, {tuple(melvars.shape)} "
                f"but n_filt is {self.filterbank.n_filt}; regenerate them for this config"
            )
        self.stacking = int(frame_splicing["frame_stacking"])
        self.subsampling = int(frame_splicing["frame_subsampling"])
        self.register_buffer("melmeans", melmeans.to(torch.float32).clone(), persistent=False)
        self.register_buffer("melvars", melvars.to(torch.float32).clone(), persistent=False)

    @classmethod
    def from_data_config(cls, data_config: dict) -> "InferenceFrontEnd":
        """The front end a hardware checkpoint describes (``Checkpoint.data_config``)."""
        return cls(
            data_config["filterbank_features"],
            data_config["frame_splicing"],
            data_config["melmeans"],
            data_config["melvars"],
        )

    @property
    def out_features(self) -> int:
        """Features per output frame: n_filt * frame_stacking (the model's in_feats)."""
        return self.filterbank.n_filt * self.stacking

    def _augment(
        self, x: torch.Tensor, lens: torch.Tensor, generator: Optional[torch.Generator]
    ) -> torch.Tensor:
        """Hook between normalisation and splicing: nothing at inference."""
        return x

    @torch.no_grad()
    def forward(
        self,
        audio: torch.Tensor,
        audio_lens: torch.Tensor,
        norm_weight: float = 1.0,
        generator: Optional[torch.Generator] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Featurise a batch.

        Args:
            audio: float [B, N] waveforms at the config's sample rate, full
                scale 1.0 (val-time final padding already applied with ``pad_audio``).
            audio_lens: int [B], samples per utterance.
            norm_weight: dataset-normalisation weight w; 1.0 (the default) at
                validation and inference.
            generator: optional torch.Generator for dither (and augmentation).
        Returns:
            x: [T', B, n_filt * frame_stacking], time-major as ``RNNT.encode`` takes.
            x_lens: int64 [B], valid output frames per utterance.
        """
        x, lens = self.filterbank(audio, audio_lens, generator=generator)
        return self.from_logmel(x, lens, norm_weight, generator)

    @torch.no_grad()
    def from_logmel(
        self,
        x: torch.Tensor,
        lens: torch.Tensor,
        norm_weight: float = 1.0,
        generator: Optional[torch.Generator] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``forward`` does after the filterbank, to log-mels computed before (``data.feature_cache``).

        Args:
            x: float [B, n_filt, T] log-mels, zero past each length.
            lens: int [B], frames per utterance.
            norm_weight, generator: as for ``forward``.
        Returns:
            as ``forward``.
        """
        x = normalize(x, lens, self.melmeans, self.melvars, norm_weight)
        x = self._augment(x, lens, generator)
        x, lens = splice_frames(x, lens, self.stacking, self.subsampling)
        return x.permute(2, 0, 1).contiguous(), lens
