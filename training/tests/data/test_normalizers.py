"""normalize_transcript (training targets, references) and standardize (scoring)."""

import pytest

from caiman_asr_train.core.errors import ConfigError
from caiman_asr_train.data.normalizers import normalize_transcript, standardize

LABELS = [" ", *"abcdefghijklmnopqrstuvwxyz", "'"]


def test_lowercase_with_labels_keeps_only_label_characters():
    text = "Hello, World! It's 5 o'clock.\tBye"
    expected = "hello world it's o'clock bye"
    assert normalize_transcript(text, "lowercase", labels=LABELS) == expected


def test_lowercase_without_labels_only_lowercases_and_tidies_spaces():
    assert normalize_transcript("  Hello,   World! ") == "hello, world!"


@pytest.mark.parametrize("mode", ["identity", "none"])
def test_identity_keeps_case(mode):
    assert normalize_transcript("Hello  World <EOS>", mode) == "Hello World"


def test_tags_removed_only_when_asked():
    text = "<s> hello <unk> world </s> <EOS>"
    assert normalize_transcript(text) == "hello world"
    assert normalize_transcript(text, remove_tags=False) == text.lower()
    # Removed before label filtering, so no stray "unk" word is left behind.
    assert normalize_transcript("a <unk> b", labels=LABELS) == "a b"
    # A comparison like "a < b" is not a tag.
    assert normalize_transcript("a < b > c") == "a < b > c"


@pytest.mark.parametrize(
    "replacements",
    [
        {"&": " and ", "%": " percent"},
        [["&", " and "], ["%", " percent"]],
        [{"old": "&", "new": " and "}, {"old": "%", "new": " percent"}],
    ],
)
def test_replacements_in_every_yaml_shape(replacements):
    out = normalize_transcript("Salt&Pepper 5%", replacements=replacements, labels=LABELS)
    assert out == "salt and pepper percent"


def test_replacements_see_the_raw_text_and_apply_in_order():
    # Case-sensitive on the raw text: "Dr" is replaced, "dr" is not.
    assert normalize_transcript("Dr dr", replacements=[["Dr", "doctor"]]) == "doctor dr"
    assert normalize_transcript("ab", replacements=[["a", "b"], ["b", "c"]]) == "cc"


@pytest.mark.parametrize("bad", [[["only-old"]], ["ab"], [[1, "x"]], {"": "x"}])
def test_malformed_replacements_name_the_key(bad):
    with pytest.raises(ConfigError, match="replacements"):
        normalize_transcript("text", replacements=bad)


def test_unknown_mode_names_the_key():
    with pytest.raises(ConfigError, match="normalize_transcripts"):
        normalize_transcript("text", mode="uppercase")


def test_standardize_whisper_behaviour():
    assert standardize("Don't say twenty-five, Mr. Jones!") == "do not say 25 mister jones"
    assert standardize("It's the first colour") == "it is the 1st color"
    assert standardize("") == ""
