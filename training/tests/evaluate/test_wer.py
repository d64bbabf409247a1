"""word_error_rate and edit_distance: docs/formats.md section 10."""

import math
import random
import time

import pytest

from caiman_asr_train.core.errors import ConfigError
from caiman_asr_train.evaluate.wer import edit_distance, word_error_rate


@pytest.mark.parametrize(
    "hyp, ref, expected",
    [
        ("the cat sat", "the cat sat", 0),
        ("the dog sat", "the cat sat", 1),  # substitution
        ("the big cat sat", "the cat sat", 1),  # insertion
        ("the sat", "the cat sat", 1),  # deletion
        ("", "the cat sat", 3),
        ("a b c", "", 3),
        ("sat cat the", "the cat sat", 2),
        ("kitten", "sitting", 3),  # classic character example, as a sequence
    ],
)
def test_edit_distance_known_values(hyp, ref, expected):
    h = hyp.split() if " " in hyp or " " in ref else list(hyp)
    r = ref.split() if " " in hyp or " " in ref else list(ref)
    assert edit_distance(h, r) == expected
    # Levenshtein distance is symmetric.
    assert edit_distance(r, h) == expected


def test_edit_distance_matches_brute_force_recursion():
    def slow(a, b):
        if not a or not b:
            return len(a) + len(b)
        return min(slow(a[1:], b) + 1, slow(a, b[1:]) + 1, slow(a[1:], b[1:]) + (a[0] != b[0]))

    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 6))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 6))]
        assert edit_distance(a, b) == slow(a, b), (a, b)


def test_sub_ins_del_each_count_one_word():
    rate, errors, words = word_error_rate(
        ["the dog sat on mat", "a big red car"],
        ["the cat sat on the mat", "a red car"],
        standardize=False,
    )
    # Utterance 1: one substitution + one deletion; utterance 2: one insertion.
    assert (errors, words) == (3, 9)
    assert rate == pytest.approx(3 / 9)


def test_totals_are_summed_not_averaged_over_utterances():
    # Per-utterance rates are 1/1 and 0/9: their mean would be 0.55.
    rate, errors, words = word_error_rate(
        ["wrong", "one two three four five six seven eight nine"],
        ["right", "one two three four five six seven eight nine"],
        standardize=False,
    )
    assert (errors, words) == (1, 10)
    assert rate == pytest.approx(0.1)


def test_rate_is_a_fraction_and_can_exceed_one():
    rate, errors, words = word_error_rate(["a b c d"], ["x"], standardize=False)
    assert (errors, words) == (4, 1)
    assert rate == 4.0


def test_without_standardize_case_and_punctuation_count():
    _, errors, _ = word_error_rate(["Hello, World"], ["hello world"], standardize=False)
    assert errors == 2
    assert word_error_rate(["Hello, World"], ["hello world"])[1] == 0


def test_whitespace_runs_do_not_create_words():
    assert word_error_rate(["  the   cat "], ["the cat"], standardize=False) == (0.0, 0, 2)


def test_char_mode_counts_characters_and_single_spaces():
    # "the cat" has 7 characters including the one space between words.
    rate, errors, chars = word_error_rate(["the bat"], ["the cat"], standardize=False, error_rate="char")
    assert (errors, chars) == (1, 7)
    assert rate == pytest.approx(1 / 7)
    # A lost word break is one character error; extra spacing is none.
    assert word_error_rate(["thecat"], ["the cat"], False, "char")[1] == 1
    assert word_error_rate(["the    cat "], ["the cat"], False, "char")[1] == 0


def test_char_mode_is_gentler_than_word_mode_on_near_misses():
    hyps, refs = ["recognise speech"], ["recognize speech"]
    assert word_error_rate(hyps, refs, False, "word")[0] == pytest.approx(0.5)
    assert word_error_rate(hyps, refs, False, "char")[0] == pytest.approx(1 / 16)


@pytest.mark.parametrize(
    "hyp, ref",
    [
        ("Don't go", "do not go"),
        ("I'm here", "i am here"),
        ("twenty five apples", "25 apples"),
        ("one hundred and one", "101"),
        ("Mr. Smith", "mister smith"),
        ("the colour", "the color"),
        ("um the cat", "the cat"),  # hesitations are dropped
    ],
)
def test_standardize_maps_equivalent_spellings(hyp, ref):
    assert word_error_rate([hyp], [ref], standardize=True)[1] == 0
    assert word_error_rate([hyp], [ref], standardize=False)[1] > 0


def test_standardize_counts_reference_words_after_normalisation():
    # "do not" is two words once "don't" is expanded.
    assert word_error_rate(["don't"], ["don't"]) == (0.0, 0, 2)


def test_empty_inputs():
    assert word_error_rate([], []) == (0.0, 0, 0)
    assert word_error_rate([""], [""]) == (0.0, 0, 0)
    # No reference words but some hypothesis words: an unbounded rate.
    rate, errors, words = word_error_rate(["hello there"], [""])
    assert (errors, words) == (2, 0)
    assert math.isinf(rate)
    assert word_error_rate([""], ["hello there"]) == (1.0, 2, 2)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        word_error_rate(["a", "b"], ["a"])


def test_unknown_error_rate_names_the_key():
    with pytest.raises(ConfigError, match="error_rate"):
        word_error_rate(["a"], ["a"], error_rate="phoneme")


def test_fast_enough_for_a_dev_set():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(50)]
    refs = [" ".join(rng.choices(vocab, k=20)) for _ in range(1000)]
    hyps = [" ".join(rng.choices(vocab, k=20)) for _ in range(1000)]
    start = time.perf_counter()
    _, errors, words = word_error_rate(hyps, refs, standardize=False)
    assert time.perf_counter() - start < 1.0
    assert words == 20_000 and 0 < errors <= 20_000
