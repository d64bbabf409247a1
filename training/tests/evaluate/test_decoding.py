"""evaluate.decoding: the decoding flags, the decoder factory and the n-gram each kind of checkpoint uses.

Real tiny artefacts (tests/export/conftest.py): a SentencePiece model, a KenLM
n-gram built with lmplz, a training checkpoint and its hardware checkpoint.
"""

import argparse
import math
import shutil

import kenlm
import pytest
import torch

from caiman_asr_train.core.errors import CheckpointError, DataError, UserError
from caiman_asr_train.core.load_hw import load_hw_checkpoint
from caiman_asr_train.data.tokenizer import Tokenizer
from caiman_asr_train.evaluate.decoding import Decoder, add_decoder_args, build_decoder, result_line
from caiman_asr_train.export.hardware_ckpt import create_hardware_ckpt, save_hardware_ckpt
from caiman_asr_train.rnnt import config

pytestmark = pytest.mark.filterwarnings("ignore:the EMA weights match no FPGA")

FLAGS = (
    "--decoder",
    "--beam_width",
    "--temperature",
    "--beam_prune_topk_thresh",
    "--beam_prune_score_thresh",
    "--beam_final_emission_thresh",
    "--keyword_boost_path",
    "--skip_ngram",
    "--override_ngram_path",
    "--ngram_scale_factor",
    "--beam_decoder_procs",
)


def parse(*argv: str) -> argparse.Namespace:
    return add_decoder_args(argparse.ArgumentParser()).parse_args(list(argv))


@pytest.fixture
def hw_path(export_env, tmp_path):
    path = tmp_path / "model.hw.pt"
    save_hardware_ckpt(
        create_hardware_ckpt(export_env.ckpt_path, export_env.config_path, skip_state_dict_check=True), path
    )
    return path


def features(frames: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(frames, 3, 24, generator=generator), torch.tensor([frames, frames // 2, 3])


def test_flags_defaults_and_help():
    parser = add_decoder_args(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert (args.decoder, args.beam_width, args.temperature) == ("greedy", 4, 1.4)
    assert (args.beam_prune_topk_thresh, args.beam_prune_score_thresh, args.beam_final_emission_thresh) == (
        1.5,
        0.4,
        1.25,
    )
    assert (args.skip_ngram, args.override_ngram_path, args.ngram_scale_factor, args.beam_decoder_procs) == (
        False,
        None,
        None,
        1,
    )
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    for flag in FLAGS:
        assert helps[flag], f"{flag} has no help"


def test_hardware_checkpoint_decodes_with_its_embedded_ngram_after_the_config_ngram_is_deleted(
    export_env, hw_path
):
    shutil.rmtree(export_env.ngram_dir)
    ckpt = load_hw_checkpoint(hw_path)
    decoder = build_decoder(
        parse("--decoder", "beam"),
        Tokenizer(ckpt.sentpiece_model_binary),
        frame_seconds=0.06,
        source=str(hw_path),
        embedded_ngram=ckpt.ngram,
    )
    assert decoder.ngram is not None and decoder.ngram.scale_factor == 0.05
    # The scores are those of the n-gram the checkpoint was exported with.
    reference = kenlm.Model(str(export_env.kenlm.binary))
    piece = decoder.pieces[5]
    expected = reference.BaseScore(_begin(reference), piece, kenlm.State())
    assert decoder.ngram.score(decoder.ngram.begin_state(), piece)[0] == pytest.approx(
        0.05 * math.log(10) * expected
    )
    x, lens = features()
    hyps = decoder(ckpt.model, x, lens)
    assert len(hyps) == 3 and all(all(0 <= i < len(decoder.pieces) for i in h) for h in hyps)
    assert "n-gram scale 0.05" in decoder.description


def _begin(model: kenlm.Model) -> kenlm.State:
    state = kenlm.State()
    model.BeginSentenceWrite(state)
    return state


def test_training_checkpoint_uses_its_configs_ngram_and_names_it_when_missing(export_env):
    tokenizer = Tokenizer(export_env.spm_path)
    ngram = config.ngram(export_env.cfg)
    decoder = build_decoder(
        parse("--decoder", "beam"), tokenizer, frame_seconds=0.06, source="ckpt.pt", config_ngram=ngram
    )
    assert decoder.ngram is not None and decoder.ngram.scale_factor == 0.05
    shutil.rmtree(export_env.ngram_dir)
    with pytest.raises(DataError, match=str(export_env.ngram_dir)):
        build_decoder(
            parse("--decoder", "beam"), tokenizer, frame_seconds=0.06, source="ckpt.pt", config_ngram=ngram
        )
    # --skip_ngram decodes without it.
    skipped = build_decoder(
        parse("--decoder", "beam", "--skip_ngram"),
        tokenizer,
        frame_seconds=0.06,
        source="ckpt.pt",
        config_ngram=ngram,
    )
    assert skipped.ngram is None and "no n-gram" in skipped.description


def test_override_path_and_scale_factor_replace_the_checkpoints(export_env, hw_path):
    ckpt = load_hw_checkpoint(hw_path)
    decoder = build_decoder(
        parse(
            "--decoder",
            "beam",
            "--override_ngram_path",
            str(export_env.kenlm.arpa),
            "--ngram_scale_factor",
            "0.3",
        ),
        Tokenizer(ckpt.sentpiece_model_binary),
        frame_seconds=0.06,
        source=str(hw_path),
        embedded_ngram=ckpt.ngram,
    )
    assert decoder.ngram.scale_factor == 0.3
    assert decoder.ngram.model.path.endswith(b"ngram.arpa")


def test_corrupt_embedded_ngram_bytes_give_a_one_line_error(export_env, hw_path):
    ckpt = load_hw_checkpoint(hw_path)
    broken = {"binary": ckpt.ngram["binary"][:100], "scale_factor": 0.05}
    with pytest.raises(CheckpointError, match="model.hw.pt") as error:
        build_decoder(
            parse("--decoder", "beam"),
            Tokenizer(ckpt.sentpiece_model_binary),
            frame_seconds=0.06,
            source=str(hw_path),
            embedded_ngram=broken,
        )
    assert "\n" not in str(error.value)


def test_checkpoint_exported_without_ngram_decodes_without_one(export_env):
    tokenizer = Tokenizer(export_env.spm_path)
    decoder = build_decoder(
        parse("--decoder", "beam"),
        tokenizer,
        frame_seconds=0.06,
        source="x.hw.pt",
        embedded_ngram={"binary": None, "scale_factor": None},
    )
    assert decoder.ngram is None


def test_two_decoding_processes_give_the_same_transcripts_as_one(export_env, hw_path):
    ckpt = load_hw_checkpoint(hw_path)
    tokenizer = Tokenizer(ckpt.sentpiece_model_binary)
    x, lens = features(frames=18, seed=3)
    outputs = []
    for procs in ("1", "2"):
        decoder = build_decoder(
            parse("--decoder", "beam", "--beam_decoder_procs", procs),
            tokenizer,
            frame_seconds=0.06,
            source=str(hw_path),
            embedded_ngram=ckpt.ngram,
        )
        outputs.append(decoder(ckpt.model, x, lens))
    assert outputs[0] == outputs[1]


def test_greedy_decoder_is_greedy_decoding(export_env, hw_path):
    ckpt = load_hw_checkpoint(hw_path)
    decoder = build_decoder(parse(), Tokenizer(ckpt.sentpiece_model_binary), frame_seconds=0.06, source="x")
    x, lens = features()
    assert decoder(ckpt.model, x, lens) == Decoder("greedy", pieces=[])(ckpt.model, x, lens)
    assert decoder.ngram is None and decoder.description == "greedy"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--beam_width", "0"], "--beam_width must be >= 1"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--beam_prune_topk_thresh", "0"], "--beam_prune_topk_thresh 0"),
        (["--beam_decoder_procs", "0"], "--beam_decoder_procs must be >= 1"),
        (["--ngram_scale_factor", "-1"], "--ngram_scale_factor must be >= 0"),
        (["--skip_ngram", "--override_ngram_path", "x"], "contradict"),
    ],
)
def test_bad_flag_values_are_one_line_errors(export_env, argv, message):
    with pytest.raises(UserError, match=message):
        build_decoder(
            parse("--decoder", "beam", *argv), Tokenizer(export_env.spm_path), frame_seconds=0.06, source="x"
        )


def test_keyword_boosting_needs_beam_search(export_env, tmp_path):
    with pytest.raises(UserError, match="needs --decoder beam"):
        build_decoder(
            parse("--keyword_boost_path", str(tmp_path / "k.json")),
            Tokenizer(export_env.spm_path),
            frame_seconds=0.06,
            source="x",
        )


def test_result_line_names_the_decoder_and_the_ngram(export_env, hw_path):
    ckpt = load_hw_checkpoint(hw_path)
    tokenizer = Tokenizer(ckpt.sentpiece_model_binary)
    beam = build_decoder(
        parse("--decoder", "beam"), tokenizer, frame_seconds=0.06, source="x", embedded_ngram=ckpt.ngram
    )
    assert result_line(0.12345, "dev.json", beam) == (
        'Word Error Rate: 12.345% on "dev.json" (beam search, width 4, n-gram scale 0.05)'
    )
    greedy = build_decoder(parse(), tokenizer, frame_seconds=0.06, source="x")
    assert result_line(0.5, "a.json b.json", greedy) == 'Word Error Rate: 50.000% on "a.json b.json" (greedy)'
