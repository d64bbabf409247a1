"""Training batches bucketed by duration, a pure function of (seed, position).

``BucketingSampler`` numbers the micro-batches of a run 0, 1, 2, ... across
epochs. Micro-batch ``k`` belongs to epoch ``k // batches_per_epoch``; an
epoch's order depends only on ``(seed, epoch)``. So the data position of a run
is one integer, ``consumed`` (micro-batches handed out), and resuming from it
gives exactly the batches an uninterrupted run would have seen, whatever the
DataLoader prefetched or how many workers it used.

Each epoch:
  1. shuffle the utterances, then sort them by duration (stable, so equal
     durations keep their shuffled order);
  2. cut the sorted list into ``num_buckets`` buckets of similar duration and
     shuffle inside each bucket;
  3. cut each bucket into global micro-batches of ``batch_size * world_size``
     utterances (the remainder of each bucket sits out this epoch; it is a
     different remainder next epoch);
  4. shuffle the order of the global micro-batches;
  5. rank ``r`` takes slice ``r`` of each global micro-batch.

Batches of similar duration waste little compute on padding, and every rank
gets utterances of similar length, so no rank waits long for the others.
"""

from typing import Iterator, Sequence

import numpy as np

from caiman_asr_train.core.errors import DataError

SAMPLER_STATE_VERSION = 1


def _seed_sequence(*words: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(w) for w in words])


class BucketingSampler:
    """Micro-batches of utterance indices for one rank.

    Args:
        durations: seconds per utterance (the manifest's, no audio is read).
        batch_size: utterances per micro-batch on this rank.
        seed: fixes every epoch's order.
        num_buckets: duration buckets per epoch; 1 means plain shuffling. Fewer
            are used when the data holds fewer than ``num_buckets`` global
            micro-batches.
        rank, world_size: this process's shard of every global micro-batch.

    Iterating yields ``(epoch, index_list)`` pairs forever, starting at the
    current position; ``state_dict()``/``load_state_dict()`` save and restore
    that position (``consumed``). The training loop advances the position with
    ``advance()`` when it *uses* a batch, not when a DataLoader prefetches it.
    """

    def __init__(
        self,
        durations: Sequence[float],
        batch_size: int,
        seed: int,
        num_buckets: int = 6,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.durations = np.asarray(durations, dtype=np.float64)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.global_batch = self.batch_size * self.world_size
        if len(self.durations) < self.global_batch:
            raise DataError(
                f"the training manifests hold {len(self.durations)} usable utterances, fewer than "
                f"one global micro-batch ({self.global_batch}); lower --global_batch_size or add data"
            )
        # Every bucket must hold a whole global micro-batch, or a small data set
        # would have utterances enough for a batch but zero batches per epoch.
        self.num_buckets = max(1, min(int(num_buckets), len(self.durations) // self.global_batch))
        self.batches_per_epoch = self._count_batches()
        self.consumed = 0
        self._epoch_cache: tuple[int, list[np.ndarray]] = (-1, [])

    def _bucket_bounds(self) -> list[tuple[int, int]]:
        n = len(self.durations)
        edges = np.linspace(0, n, self.num_buckets + 1).round().astype(int)
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]

    def _count_batches(self) -> int:
        return sum((b - a) // self.global_batch for a, b in self._bucket_bounds())

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's micro-batches of ``epoch`` in order, each an int64 index array."""
        if self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = np.random.default_rng(_seed_sequence(self.seed, epoch))
        order = rng.permutation(len(self.durations))
        order = order[np.argsort(self.durations[order], kind="stable")]
        global_batches = []
        for start, end in self._bucket_bounds():
            bucket = order[start:end][rng.permutation(end - start)]
            usable = (len(bucket) // self.global_batch) * self.global_batch
            global_batches.extend(np.split(bucket[:usable], usable // self.global_batch))
        batches = [global_batches[i] for i in rng.permutation(len(global_batches))]
        mine = [b[self.rank * self.batch_size : (self.rank + 1) * self.batch_size] for b in batches]
        self._epoch_cache = (epoch, mine)
        return mine

    def batch_at(self, position: int) -> tuple[int, np.ndarray]:
        """``(epoch, indices)`` of micro-batch number ``position`` of the run."""
        epoch, offset = divmod(position, self.batches_per_epoch)
        return epoch, self.epoch_batches(epoch)[offset]

    @property
    def epoch(self) -> int:
        """Epoch of the next micro-batch."""
        return self.consumed // self.batches_per_epoch

    def iter_from(self, position: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(epoch, indices)`` for micro-batches ``position, position + 1, ...``."""
        while True:
            yield self.batch_at(position)
            position += 1

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        return self.iter_from(self.consumed)

    def advance(self, batches: int = 1) -> None:
        """Record that ``batches`` more micro-batches were used."""
        self.consumed += batches

    def state_dict(self) -> dict:
        """The data position, as plain types (safe for ``torch.load(weights_only=True)``)."""
        return {
            "version": SAMPLER_STATE_VERSION,
            "consumed": self.consumed,
            "seed": self.seed,
            "num_utterances": len(self.durations),
            "global_batch": self.global_batch,
            "batches_per_epoch": self.batches_per_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position.

        Raises:
            DataError: the position was saved for a different data set or batch
                layout, so it cannot mean the same batches here.
        """
        for key in ("num_utterances", "global_batch", "seed"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise DataError(
                    f"cannot resume the data position: the checkpoint was saved with {key}="
                    f"{state.get(key)} but this run has {key}={mine}; resume with the same "
                    "manifests, --global_batch_size, --grad_accumulation_batches, process count "
                    "and --seed, or use --fine_tune to start a fresh schedule"
                )
        self.consumed = int(state["consumed"])
