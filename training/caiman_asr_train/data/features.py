"""Training-time features: the normalisation ramp and augmentation (docs/formats.md section 6).

The inference front end (filterbank, dataset normalisation, frame splicing,
final padding, mel statistics) lives in ``caiman_asr_train.core.features`` and
is re-exported here, so training code keeps one import path. This module adds
what only training does:

    waveform -> SpeedPerturbation (per utterance, before batching)
      -> FilterbankFeatures
      -> normalize            weight from ``norm_weight`` (the ramp from
                              per-utterance to dataset statistics)
      -> SpecAugment          frequency and time masks
      -> splice_frames -> time-major

``FeaturePipeline`` is ``core.features.InferenceFrontEnd`` with SpecAugment.
"""

from typing import Optional

import numpy as np
import soxr
import torch
from torch import nn

from caiman_asr_train.core.errors import ConfigError
from caiman_asr_train.core.features import (  # noqa: F401  (re-exported front end)
    FRONT_END_VERSION,
    LOG_FLOOR,
    PREEMPHASIS,
    STATS_COUNT_FILE,
    STATS_FILES,
    UTTERANCE_STD_EPS,
    FilterbankFeatures,
    InferenceFrontEnd,
    dali_hann_window,
    frame_count,
    load_mel_stats,
    mel_filterbank,
    normalize,
    pad_audio,
    splice_frames,
)


def norm_weight(step: int, start: int, end: int) -> float:
    """Weight w of dataset normalisation at optimizer ``step`` (the norm ramp).

    0 before ``start``, 1 from ``end`` on, linear in between:
    ``w = (step - start) / (end - start)``.
    """
    if step >= end:
        return 1.0
    if step <= start:
        return 0.0
    return (step - start) / (end - start)


class SpecAugment(nn.Module):
    """Frequency and time masks (SpecAugment), applied in training mode only.

    Each utterance gets ``freq_masks`` bands of width uniform in
    [min_freq, max_freq] bins and ``time_masks`` spans of width uniform in
    [min_time, max_time] frames, at uniform positions, set to 0 (the dataset
    mean after normalisation). When ``max_time`` is below 1, ``min_time`` and
    ``max_time`` are fractions of the utterance's own frame count (the shipped
    configs use 0 and 0.03), so long utterances get proportionally longer
    masks. Time masks stay inside each utterance's valid frames. In eval mode
    the input is returned unchanged.

    Randomness comes from torch (an optional ``generator`` makes it reproducible).
    """

    def __init__(
        self,
        freq_masks: int = 0,
        min_freq: int = 0,
        max_freq: int = 0,
        time_masks: int = 0,
        min_time: float = 0,
        max_time: float = 0,
    ) -> None:
        super().__init__()
        if not 0 <= min_freq <= max_freq or not 0 <= min_time <= max_time:
            raise ConfigError(
                "spec_augment: need 0 <= min_freq <= max_freq and 0 <= min_time <= max_time; "
                f"got freq [{min_freq}, {max_freq}], time [{min_time}, {max_time}]"
            )
        if freq_masks < 0 or time_masks < 0:
            raise ConfigError("spec_augment: freq_masks and time_masks must be >= 0")
        self.freq_masks = int(freq_masks)
        self.min_freq = int(min_freq)
        self.max_freq = int(max_freq)
        self.time_masks = int(time_masks)
        self.min_time = min_time
        self.max_time = max_time

    @staticmethod
    def _spans(
        n_masks: int,
        low: torch.Tensor,
        high: torch.Tensor,
        extent: torch.Tensor,
        size: int,
        generator: Optional[torch.Generator],
    ) -> torch.Tensor:
        """Boolean [B, size]: n_masks spans per row, widths in [low, high], inside [0, extent)."""
        batch = extent.shape[0]
        device = extent.device
        steps = torch.arange(size, device=device)
        mask = torch.zeros(batch, size, dtype=torch.bool, device=device)
        for _ in range(n_masks):
            u = torch.rand(batch, generator=generator, device=device)
            width = low + (u * (high - low + 1)).floor().to(torch.int64)
            width = torch.minimum(width, extent)
            u = torch.rand(batch, generator=generator, device=device)
            start = (u * (extent - width + 1)).floor().to(torch.int64)
            mask |= (steps[None, :] >= start[:, None]) & (steps[None, :] < (start + width)[:, None])
        return mask

    def forward(
        self, x: torch.Tensor, lens: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Mask x [B, F, T] (valid frames per utterance in lens [B]); returns [B, F, T]."""
        if not self.training:
            return x
        batch, n_bins, n_frames = x.shape
        device = x.device
        lens = lens.to(device=device, dtype=torch.int64)
        full = torch.full((batch,), n_bins, dtype=torch.int64, device=device)
        freq = self._spans(
            self.freq_masks,
            torch.full_like(full, self.min_freq),
            torch.full_like(full, self.max_freq),
            full,
            n_bins,
            generator,
        )
        if self.max_time < 1:
            frames = lens.to(torch.float64)
            high = (frames * self.max_time).floor().to(torch.int64)
            low = (frames * self.min_time).floor().to(torch.int64)
        else:
            high = torch.full_like(lens, int(self.max_time))
            low = torch.full_like(lens, int(self.min_time))
        time = self._spans(self.time_masks, low, high, lens, n_frames, generator)
        keep = ~(freq[:, :, None] | time[:, None, :])
        return x * keep.to(x.dtype)


class SpeedPerturbation:
    """Random tempo-and-pitch change of a waveform by resampling (training only).

    With probability ``p`` a rate r is drawn uniformly from [min_rate, max_rate]
    and the waveform is resampled with soxr by 1/r: r > 1 plays faster, so the
    result is shorter (about N / r samples); r < 1 is slower and longer.

    Args:
        min_rate, max_rate: bounds of r, 0 < min_rate <= max_rate.
        p: probability of perturbing a given call.
        seed: seeds the numpy Generator used when ``__call__`` gets none.
    """

    def __init__(self, min_rate: float, max_rate: float, p: float = 1.0, seed: Optional[int] = None) -> None:
        if not 0 < min_rate <= max_rate:
            raise ConfigError(
                f"speed_perturbation: need 0 < min_rate <= max_rate, got {min_rate}, {max_rate}"
            )
        if not 0 <= p <= 1:
            raise ConfigError(f"speed_perturbation: p must be in [0, 1], got {p}")
        self.min_rate = float(min_rate)
        self.max_rate = float(max_rate)
        self.p = float(p)
        self.rng = np.random.default_rng(seed)

    def sample_rate_factor(self, rng: Optional[np.random.Generator] = None) -> float:
        """Draw the rate r for one utterance (1.0 when not perturbed)."""
        rng = rng or self.rng
        if rng.random() >= self.p:
            return 1.0
        return float(rng.uniform(self.min_rate, self.max_rate))

    def __call__(self, audio: np.ndarray, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """Perturb a mono waveform [N]: float32 [about N / r], or ``audio`` itself if r = 1."""
        rate = self.sample_rate_factor(rng)
        if rate == 1.0:
            return audio
        # Only the ratio matters to soxr: treat the input as recorded at r times
        # the output rate.
        return soxr.resample(np.asarray(audio, dtype=np.float32), 1000.0 * rate, 1000.0)


class FeaturePipeline(InferenceFrontEnd):
    """Waveforms -> encoder input: filterbank, normalisation, SpecAugment, splicing.

    ``InferenceFrontEnd`` plus SpecAugment, which runs only in training mode and
    only when ``spec_augment`` is given; it masks mel bins before splicing, so a
    frequency mask hides the same bins in every stacked frame. Pass the ramp's
    ``norm_weight(step, ...)`` to ``forward`` while training.

    Args:
        filterbank_features, frame_splicing, melmeans, melvars: as for ``InferenceFrontEnd``.
        spec_augment: the config's ``spec_augment`` block, or None.
        compute_dtype: the filterbank's arithmetic (float32 for training).
    """

    def __init__(
        self,
        filterbank_features: dict,
        frame_splicing: dict,
        melmeans: torch.Tensor,
        melvars: torch.Tensor,
        spec_augment: Optional[dict] = None,
        compute_dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__(filterbank_features, frame_splicing, melmeans, melvars, compute_dtype)
        self.spec_augment = SpecAugment(**spec_augment) if spec_augment else None

    def _augment(
        self, x: torch.Tensor, lens: torch.Tensor, generator: Optional[torch.Generator]
    ) -> torch.Tensor:
        if self.spec_augment is None:
            return x
        # a child module: .train()/.eval() on the pipeline switch it on and off
        return self.spec_augment(x, lens, generator=generator)
