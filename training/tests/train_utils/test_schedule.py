"""Learning-rate and gradient-noise schedules."""

import pytest

from caiman_asr_train.train_utils.schedule import grad_noise_std, learning_rate


def lr(step: int) -> float:
    return learning_rate(step, lr=1e-2, min_lr=1e-3, warmup_steps=4, hold_steps=2, half_life_steps=3)


def test_warmup_is_linear_to_the_peak():
    assert [lr(s) for s in (1, 2, 3, 4)] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])


def test_hold_then_halves_every_half_life_down_to_min_lr():
    assert lr(5) == lr(6) == 1e-2
    assert lr(9) == pytest.approx(5e-3)
    assert lr(12) == pytest.approx(2.5e-3)
    assert lr(7) == pytest.approx(1e-2 * 0.5 ** (1 / 3))
    assert lr(100) == 1e-3


def test_no_warmup_and_no_decay():
    assert learning_rate(1, 1e-2, 0.0, 0, 0, 0) == 1e-2
    assert learning_rate(10_000, 1e-2, 0.0, 0, 5, None) == 1e-2


def test_grad_noise_starts_at_start_step_and_decays():
    assert grad_noise_std(9, 0.1, 0.55, 10) == 0.0
    assert grad_noise_std(10, 0.1, 0.55, 10) == pytest.approx(0.1)
    assert grad_noise_std(13, 0.1, 0.55, 10) == pytest.approx(0.1 / 4**0.55)
    assert grad_noise_std(50, 0.0, 0.55, 10) == 0.0
