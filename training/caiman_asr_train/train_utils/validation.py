"""Validation during training: WER of the EMA model (greedy or beam search) on this process's shard of the
dev set."""

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from caiman_asr_train.data.dataset import AudioDataset, collate
from caiman_asr_train.data.features import FeaturePipeline
from caiman_asr_train.data.tokenizer import Tokenizer
from caiman_asr_train.evaluate.decoding import Decoder
from caiman_asr_train.evaluate.evaluator import evaluate
from caiman_asr_train.train_utils import distributed as dist_utils
from caiman_asr_train.train_utils.rng import derive_seed, generator


@dataclass
class Validator:
    """WER of a model decoded with ``decoder`` on this process's shard of the dev manifests, summed over
    processes."""

    dataset: AudioDataset
    pipeline: FeaturePipeline
    tokenizer: Tokenizer
    sample_rate: int
    final_padding_secs: float
    standardize_wer: bool
    error_rate: str
    batch_size: int
    device: torch.device
    dist: dist_utils.DistInfo
    seed: int
    decoder: Decoder

    def __call__(self, model: torch.nn.Module) -> tuple[float, int]:
        """Returns (error rate as a fraction, reference words)."""
        was_training = model.training
        model.eval()
        # In-process loading: a dev set is small next to decoding it, and
        # worker processes here would complicate shutdown on a signal.
        batches = DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=collate)
        result = evaluate(
            model,
            batches,
            self.pipeline,
            self.tokenizer,
            sample_rate=self.sample_rate,
            final_padding_secs=self.final_padding_secs,
            standardize=self.standardize_wer,
            error_rate=self.error_rate,
            device=self.device,
            progress=False,
            generator=generator(derive_seed(self.seed, 0), self.device),
            decoder=self.decoder,
        )
        model.train(was_training)
        errors, words = dist_utils.all_sum([result.errors, result.words], self.dist, self.device)
        return (errors / words if words else float("nan")), int(words)
