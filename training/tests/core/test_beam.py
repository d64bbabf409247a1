"""Beam search (core.beam): agreement with greedy, finding better paths, merging, keywords, processes.

Models are real core RNNTs: a tiny one trained here until greedy decoding is
right, and hand-set ones whose next-token probabilities are a chosen table
(tests/core/beam_models.py), so the expected outputs follow from the numbers.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from caiman_asr_train.core.beam import BeamOptions, BeamSearch, user_token_ids
from caiman_asr_train.core.decoder import greedy_decode
from caiman_asr_train.core.errors import DataError
from caiman_asr_train.core.keywords import Keywords, load_keywords
from caiman_asr_train.core.model import RNNT, ConfigRNNT
from caiman_asr_train.rnnt.loss import rnnt_loss

_spec = importlib.util.spec_from_file_location("beam_models", Path(__file__).with_name("beam_models.py"))
beam_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(beam_models)
table_model, silence = beam_models.table_model, beam_models.silence

NO_PRUNING = dict(prune_topk_thresh=-1, prune_score_thresh=-1, final_emission_thresh=-1)
X, Y, Z = 0, 1, 2
BLANK3 = 3


@pytest.fixture(scope="module")
def trained() -> tuple[RNNT, torch.Tensor, torch.Tensor, list[list[int]]]:
    """A tiny RNNT trained (to a loss near 0) on eight random utterances, and those utterances."""
    torch.manual_seed(0)
    vocab, feats, batch = 5, 6, 8
    x = torch.randn(20, batch, feats)
    lens = torch.tensor([20, 18, 16, 20, 12, 15, 19, 20])
    targets = torch.randint(0, vocab, (batch, 4))
    target_lens = torch.tensor([4, 3, 4, 2, 3, 4, 4, 1])
    model = RNNT(
        ConfigRNNT(
            n_classes=vocab + 1,
            in_feats=feats,
            enc_n_hid=24,
            enc_pre_rnn_layers=1,
            enc_post_rnn_layers=1,
            enc_stack_time_factor=2,
            pred_n_hid=16,
            pred_rnn_layers=1,
            joint_n_hid=24,
        )
    )
    optimizer = torch.optim.Adam(model.parameters(), 2e-2)
    for _ in range(90):
        logits, logit_lens = model(x, lens, targets)
        loss = rnnt_loss(logits, logit_lens, targets, target_lens, vocab)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    references = [targets[b, : target_lens[b]].tolist() for b in range(batch)]
    return model, x, lens, references


PIECES5 = ["\u2581a", "\u2581b", "\u2581c", "\u2581d", "\u2581e"]


def test_width_one_without_pruning_gives_the_greedy_transcript(trained):
    model, x, lens, references = trained
    greedy = greedy_decode(model, x, lens)
    assert greedy == references, "the tiny model should have learned its utterances"
    beam = BeamSearch(model, PIECES5, BeamOptions(beam_width=1, **NO_PRUNING))(x, lens)
    assert beam == greedy


def test_default_beam_on_the_trained_model_is_right_too(trained):
    model, x, lens, references = trained
    assert BeamSearch(model, PIECES5, BeamOptions())(x, lens) == references


def test_two_processes_give_the_same_transcripts_as_one(trained):
    model, x, lens, _ = trained
    noisy = x + 0.8 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    one = BeamSearch(model, PIECES5, BeamOptions(), procs=1)(noisy, lens)
    two = BeamSearch(model, PIECES5, BeamOptions(), procs=2)(noisy, lens)
    assert one == two


def test_batching_does_not_change_the_result(trained):
    model, x, lens, _ = trained
    noisy = x + 0.8 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    search = BeamSearch(model, PIECES5, BeamOptions())
    together = search(noisy, lens)
    alone = [search(noisy[:, b : b + 1], lens[b : b + 1])[0] for b in range(len(lens))]
    assert together == alone


# x is likelier than y at the start, but after x the model is unsure; after y it is sure.
GARDEN_PATH = {
    None: {X: 0.45, Y: 0.40, BLANK3: 0.15},
    X: {BLANK3: 0.5, X: 0.2, Y: 0.15, Z: 0.15},
    Y: {BLANK3: 0.99},
}


def test_width_two_finds_the_likelier_transcript_greedy_misses():
    model = table_model(3, GARDEN_PATH)
    x, lens = silence(2)
    pieces = ["\u2581x", "\u2581y", "\u2581z"]
    assert greedy_decode(model, x, lens) == [[X]]
    assert BeamSearch(model, pieces, BeamOptions(beam_width=1, temperature=1.0))(x, lens) == [[X]]
    assert BeamSearch(model, pieces, BeamOptions(beam_width=2, temperature=1.0))(x, lens) == [[Y]]


def test_hypotheses_that_spell_the_same_text_are_merged():
    # "▁ab" in one piece (0.3) or as "▁a" then "b" (0.18 * 0.99): apart each loses to "▁z" (0.35),
    # merged they win. Token 3 ("b") is only likely after "▁a". (The final choice is by score per
    # token, so "▁a b" is compared with 3 "tokens" and the others with 2.)
    ab, a, z, b, blank = 0, 1, 2, 3, 4
    table = {
        None: {ab: 0.3, a: 0.18, z: 0.35, b: 0.0, blank: 0.17},
        ab: {blank: 1.0},
        a: {b: 0.99, blank: 0.01},
        z: {blank: 1.0},
        b: {blank: 1.0},
    }
    model = table_model(4, table)
    x, lens = silence(1)
    options = BeamOptions(beam_width=4, temperature=1.0, **NO_PRUNING)
    merged = BeamSearch(model, ["\u2581ab", "\u2581a", "\u2581z", "b"], options)(x, lens)
    assert merged[0] in ([ab], [a, b])
    # The same model with "b" spelling something else: nothing merges and "▁z" wins.
    apart = BeamSearch(model, ["\u2581ab", "\u2581a", "\u2581z", "c"], options)(x, lens)
    assert apart == [[z]]


def test_keyword_boosting_makes_an_absent_word_appear(tmp_path):
    model = table_model(3, {None: {X: 0.5, Y: 0.3, BLANK3: 0.2}, X: {BLANK3: 1.0}, Y: {BLANK3: 1.0}})
    x, lens = silence(1)
    pieces = ["\u2581cat", "\u2581cap", "\u2581dog"]
    plain = BeamSearch(model, pieces, BeamOptions(temperature=1.0))(x, lens)
    assert plain == [[X]]
    path = tmp_path / "keywords.json"
    path.write_text(json.dumps({"keywords": {"cap": 0.5}}))
    boosted = BeamSearch(model, pieces, BeamOptions(temperature=1.0), keywords=load_keywords(path))(x, lens)
    assert boosted == [[Y]]


def test_keyword_bonus_is_provisional_until_the_word_is_complete():
    keywords = Keywords({"cat": 1.0})
    state = keywords.begin_state()
    bonus, partial = keywords.step(state, "\u2581ca")
    assert bonus == pytest.approx(3.0)  # "▁", "c", "a"
    taken_back, _ = keywords.step(partial, "p")
    assert taken_back == pytest.approx(-3.0)
    kept, done = keywords.step(partial, "t")
    assert kept == pytest.approx(1.0)
    after, _ = keywords.step(done, "\u2581dog")
    assert after == pytest.approx(0.0)
    # Inside a word is not a match: keywords start at a word boundary.
    assert keywords.step(state, "\u2581scat")[0] == pytest.approx(0.0)


@pytest.mark.parametrize(
    "content, message",
    [(None, "not found"), ("{", "not readable JSON"), ('{"keywords": {"cat": "x"}}', "must hold")],
)
def test_bad_keyword_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "keywords.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        load_keywords(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_forced_finals_keep_the_best_reading_once_the_emission_threshold_passes():
    # "▁x" leads at first, "▁y" overtakes after about four frames (its blank is surer). Forcing a
    # final after 0.1 s (two 60 ms frames) keeps the leader of that moment; without it "▁y" wins.
    table = {None: {X: 0.42, Y: 0.38, BLANK3: 0.20}, X: {BLANK3: 0.97}, Y: {BLANK3: 0.995}}
    model = table_model(3, table)
    x, lens = silence(20)
    pieces = ["\u2581x", "\u2581y", "\u2581z"]

    def decode(threshold: float) -> list[list[int]]:
        options = BeamOptions(temperature=1.0, prune_score_thresh=-1, final_emission_thresh=threshold)
        return BeamSearch(model, pieces, options, frame_seconds=0.06)(x, lens)

    assert decode(-1) == [[Y]]
    assert decode(0.1) == [[X]]
    assert decode(2.0) == [[Y]]


def test_user_tokens_are_pieces_in_angle_brackets():
    assert user_token_ids(["<unk>", "\u2581a", "<EOS>", "<", "b>"]) == [2]


def test_empty_utterances_decode_to_nothing(trained):
    model, x, _, _ = trained
    assert BeamSearch(model, PIECES5, BeamOptions())(x[:, :2], torch.tensor([0, 4]))[0] == []
