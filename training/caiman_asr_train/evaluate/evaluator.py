"""Decode batches and score them: the one evaluation loop of val.py and training.

Per batch: append the validation-time final padding to each waveform
(``pad_audio``), featurise with dataset normalisation (``FeaturePipeline`` in
eval mode, norm weight 1.0), decode (greedy by default, or the ``Decoder``
given: ``evaluate.decoding``, e.g. beam search with the n-gram),
detokenize, and score every hypothesis against its normalised reference
(``evaluate.wer.word_error_rate``, docs/formats.md section 10).
"""

from typing import Iterable, Optional, Union

import torch
from tqdm import tqdm

from caiman_asr_train.core.model import RNNT
from caiman_asr_train.data.dataset import Batch
from caiman_asr_train.data.features import FeaturePipeline, pad_audio
from caiman_asr_train.data.tokenizer import Tokenizer
from caiman_asr_train.evaluate.decoding import Decoder
from caiman_asr_train.evaluate.wer import EvalResult, score_predictions


def featurize(
    batch: Batch,
    pipeline: FeaturePipeline,
    sample_rate: int,
    final_padding_secs: float,
    device: torch.device,
    generator: Optional[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation features of a batch: final padding, then the pipeline (eval mode) with dataset statistics.

    Returns x[T, B, in_feats] spliced features and x_lens[B] frames, on ``device``.
    """
    audio, audio_lens = pad_audio(
        batch.audio.to(device), batch.audio_lens.to(device), final_padding_secs, sample_rate
    )
    return pipeline(audio, audio_lens, norm_weight=1.0, generator=generator)


@torch.no_grad()
def evaluate(
    model: RNNT,
    batches: Iterable[Batch],
    pipeline: FeaturePipeline,
    tokenizer: Tokenizer,
    *,
    sample_rate: int,
    final_padding_secs: float = 0.24,
    max_symbols_per_step: int = 8,
    standardize: bool = True,
    error_rate: str = "word",
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
    generator: Optional[torch.Generator] = None,
    decoder: Optional[Decoder] = None,
) -> EvalResult:
    """Decode every batch with ``model`` and compute the corpus error rate.

    Args:
        model: RNN-T (core or training); run in eval mode, its previous mode
            is restored afterwards.
        batches: ``Batch`` objects (e.g. a DataLoader with ``collate``).
        pipeline: features with the dataset statistics; run in eval mode (no
            SpecAugment) with norm weight 1.0, its previous mode restored.
        tokenizer: turns decoded ids into text.
        sample_rate: Hz of the batches' audio.
        final_padding_secs: seconds of silence appended to each utterance, as
            the inference server does at the end of a stream.
        max_symbols_per_step: per encoder frame, the most symbols emitted
            before moving to the next frame (greedy default decoder only).
        standardize: Whisper-style normalisation of both sides before scoring.
        error_rate: "word" or "char".
        device: where to compute; None means the model's device. The model
            must already be there; batches and the pipeline are moved.
        progress: show a tqdm bar (stderr).
        generator: torch.Generator on ``device`` for the dither noise; the
            same generator state gives the same predictions.
        decoder: how to decode (``evaluate.decoding.build_decoder``); None is
            greedy decoding with ``max_symbols_per_step``.

    Returns:
        EvalResult with the rate as a fraction and per-utterance predictions.
    """
    if decoder is None:
        decoder = Decoder("greedy", pieces=[], max_symbols_per_step=max_symbols_per_step)
    model_device = next(model.parameters()).device
    device = model_device if device is None else torch.device(device)
    if device != model_device and not (device.type == model_device.type and device.index is None):
        raise ValueError(f"evaluate: model is on {model_device} but device={device}; move the model first")
    was_training = model.training, pipeline.training
    model.eval()
    pipeline.eval().to(device)
    hyps: list[str] = []
    refs: list[str] = []
    fnames: list[str] = []
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, total=total, desc="validation", unit="batch", disable=not progress):
            x, x_lens = featurize(batch, pipeline, sample_rate, final_padding_secs, device, generator)
            for ids in decoder(model, x, x_lens):
                hyps.append(tokenizer.detokenize(ids))
            refs.extend(batch.transcripts)
            fnames.extend(batch.fnames)
    finally:
        model.train(was_training[0])
        pipeline.train(was_training[1])
    return score_predictions(hyps, refs, fnames, standardize=standardize, error_rate=error_rate)
