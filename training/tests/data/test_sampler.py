"""BucketingSampler: duration buckets, determinism, rank shards and the resumable position."""

import numpy as np
import pytest

from caiman_asr_train.core.errors import DataError
from caiman_asr_train.data.sampler import BucketingSampler

DURATIONS = np.random.default_rng(0).uniform(0.5, 10.0, size=103).tolist()


def test_epoch_is_a_permutation_of_full_batches_with_similar_durations():
    sampler = BucketingSampler(DURATIONS, batch_size=4, seed=1, num_buckets=5)
    batches = sampler.epoch_batches(0)
    used = np.concatenate(batches)
    assert len(set(used.tolist())) == len(used)  # no utterance twice in an epoch
    assert all(len(b) == 4 for b in batches) and len(batches) == sampler.batches_per_epoch
    # each batch comes from one duration bucket: its spread is far below the corpus'
    spread = np.mean([np.ptp(np.asarray(DURATIONS)[b]) for b in batches])
    assert spread < 0.35 * np.ptp(DURATIONS)


def test_order_depends_only_on_seed_and_epoch():
    a = BucketingSampler(DURATIONS, 4, seed=1)
    b = BucketingSampler(DURATIONS, 4, seed=1)
    c = BucketingSampler(DURATIONS, 4, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a.epoch_batches(3), b.epoch_batches(3)))
    assert not all(np.array_equal(x, y) for x, y in zip(a.epoch_batches(0), a.epoch_batches(1)))
    assert not all(np.array_equal(x, y) for x, y in zip(a.epoch_batches(0), c.epoch_batches(0)))


def test_ranks_split_each_global_batch_without_overlap():
    shards = [BucketingSampler(DURATIONS, 3, seed=5, rank=r, world_size=2) for r in range(2)]
    assert shards[0].batches_per_epoch == shards[1].batches_per_epoch
    for x, y in zip(shards[0].epoch_batches(0), shards[1].epoch_batches(0)):
        assert len(x) == len(y) == 3 and not set(x.tolist()) & set(y.tolist())


def test_state_dict_restores_the_exact_position_across_epochs():
    sampler = BucketingSampler(DURATIONS, 4, seed=7)
    straight = [sampler.batch_at(k) for k in range(2 * sampler.batches_per_epoch + 5)]
    sampler.advance(sampler.batches_per_epoch + 3)
    resumed = BucketingSampler(DURATIONS, 4, seed=7)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.epoch == 1
    for (epoch, batch), (want_epoch, want) in zip(resumed, straight[sampler.consumed :]):
        assert epoch == want_epoch and np.array_equal(batch, want)


def test_position_from_another_layout_is_refused():
    state = BucketingSampler(DURATIONS, 4, seed=7).state_dict()
    with pytest.raises(DataError, match="global_batch"):
        BucketingSampler(DURATIONS, 2, seed=7).load_state_dict(state)
    with pytest.raises(DataError, match="num_utterances"):
        BucketingSampler(DURATIONS[:-1], 4, seed=7).load_state_dict(state)


def test_too_little_data_for_one_batch_is_an_error():
    with pytest.raises(DataError, match="global_batch_size"):
        BucketingSampler([1.0, 2.0], batch_size=2, seed=0, world_size=2)
