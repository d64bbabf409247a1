"""Training sets near the size of one global batch: batches when there is data for one, one clear error otherwise."""

import pytest

from caiman_asr_train.core.errors import DataError
from caiman_asr_train.data.sampler import BucketingSampler


def test_data_for_one_batch_but_not_one_per_bucket_still_gives_batches():
    # 40 utterances in 6 buckets are ~7 a bucket, fewer than a batch of 32:
    # without fewer buckets an epoch would hold no batch at all.
    sampler = BucketingSampler([1.0 + i / 40 for i in range(40)], batch_size=16, seed=0, world_size=2)
    assert sampler.batches_per_epoch == 1
    for position in range(3):
        epoch, indices = sampler.batch_at(position)
        assert epoch == position and len(indices) == 16


@pytest.mark.parametrize("rank", [0, 1])
def test_fewer_utterances_than_one_global_batch_is_refused_with_the_count_and_the_fix(rank):
    with pytest.raises(DataError) as error:
        BucketingSampler([1.0] * 16, batch_size=16, seed=0, rank=rank, world_size=2)
    message = str(error.value)
    assert "\n" not in message
    assert "16 usable utterances" in message and "(32)" in message
    assert "lower --global_batch_size" in message
