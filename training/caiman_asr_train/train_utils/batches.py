"""Training batches: manifests to filtered entries, and micro-batches whose randomness is seeded per step.

``TrainBatches`` turns ``BucketingSampler`` positions into padded ``Batch``es
through a DataLoader. Every utterance is fetched with a key ``(index, seed)``
whose seed depends only on (run seed, micro-batch position, rank, slot), so
speed perturbation and subword sampling are the same whichever process loads
the utterance and wherever a run was resumed.
"""

import atexit
import signal
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from caiman_asr_train.data.dataset import AudioDataset, Batch, collate
from caiman_asr_train.data.feature_cache import FeatureCache
from caiman_asr_train.data.features import SpeedPerturbation
from caiman_asr_train.data.manifest import read_manifests
from caiman_asr_train.data.normalizers import standardize
from caiman_asr_train.data.sampler import BucketingSampler
from caiman_asr_train.train_utils.rng import Purpose, derive_seed, seed_item_rngs


def read_entries(manifests: Sequence[str], dataset_dir: str) -> list[dict]:
    """Entries of ``manifests`` (paths relative to ``dataset_dir``); every audio file must exist."""
    return read_manifests(manifests, dataset_dir, check_files=True)


def filter_train_entries(entries: list[dict], inp: dict) -> list[dict]:
    """Drop utterances outside ``min_duration``/``max_duration`` or with transcripts longer than
    ``max_transcript_len`` characters (an upper bound on their token count)."""
    lo, hi, max_len = inp["min_duration"], inp["max_duration"], inp["max_transcript_len"]
    kept = []
    for entry in entries:
        duration = float(entry["files"][0]["duration"])
        if (lo is not None and duration < lo) or (hi is not None and duration > hi):
            continue
        if max_len is not None and len(entry["transcript"]) > max_len:
            continue
        kept.append(entry)
    if inp["standardize_text"]:
        kept = [{**entry, "transcript": standardize(entry["transcript"])} for entry in kept]
    return kept


class TrainItems(Dataset):
    """Training utterances keyed by ``(index, seed)``: per-utterance randomness comes from the seed.

    Speed perturbation and subword sampling draw from generators seeded with
    the key's seed in whichever process loads the item, so the batches of a
    step do not depend on DataLoader workers or on where a run resumed.

    With a ``feature_cache`` the items hold the cached log-mels (``logmel``,
    ``samples``) instead of audio, which is never read.
    """

    def __init__(
        self,
        dataset: AudioDataset,
        speed_perturbation: Optional[SpeedPerturbation],
        feature_cache: Optional[FeatureCache] = None,
    ) -> None:
        if feature_cache is not None and speed_perturbation is not None:
            raise ValueError("a feature cache holds unperturbed log-mels: no speed perturbation with it")
        self.dataset = dataset
        self.speed_perturbation = speed_perturbation
        self.feature_cache = feature_cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        rng = seed_item_rngs(seed)
        if self.feature_cache is not None:
            item = self.dataset.text_item(index)
            item["logmel"], item["samples"] = self.feature_cache.logmel(item["fname"])
            item["duration"] = item["samples"] / self.dataset.sample_rate
            return item
        item = self.dataset[index]
        if self.speed_perturbation is not None:
            item["audio"] = self.speed_perturbation(item["audio"], rng)
            item["duration"] = item["audio"].shape[0] / self.dataset.sample_rate
        return item


def _quiet_worker(_: int) -> None:
    # Stop requests are the main process's business; a terminal's Ctrl-C also
    # reaches the workers, which would otherwise report it twice.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


class TrainBatches:
    """Micro-batches from sampler position ``start`` on, forever (``sampler.advance`` is the caller's job).

    Workers ignore SIGINT/SIGTERM: stopping is the main process's decision, and
    a worker killed mid-step by a signal sent to the whole process group would
    make the DataLoader raise in the middle of saving the last checkpoint. So
    ``close()`` (the ``with`` block, or at the latest interpreter exit, before
    multiprocessing would wait for them) shuts the workers down.
    """

    def __init__(
        self,
        items: "TrainItems",
        sampler: BucketingSampler,
        start: int,
        seed: int,
        rank: int,
        num_workers: int,
    ) -> None:
        def keys() -> Iterator[list[tuple[int, int]]]:
            for position, (_, indices) in enumerate(sampler.iter_from(start), start):
                yield [
                    (int(i), derive_seed(seed, Purpose.ITEM, position, rank, j))
                    for j, i in enumerate(indices)
                ]

        loader = DataLoader(
            items,
            batch_sampler=keys(),
            collate_fn=collate,
            num_workers=num_workers,
            worker_init_fn=_quiet_worker if num_workers else None,
            # a private generator: the loader's base seed must not draw from the global one
            generator=torch.Generator().manual_seed(seed),
            prefetch_factor=4 if num_workers else None,
        )
        self._iterator = iter(loader)
        atexit.register(self.close)

    def __next__(self) -> Batch:
        return next(self._iterator)

    def close(self) -> None:
        atexit.unregister(self.close)
        # the only public way to stop a DataLoader's workers is to drop its
        # iterator; _shutdown_workers does it now rather than at garbage collection
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> "TrainBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
