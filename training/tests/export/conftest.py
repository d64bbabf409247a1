"""Real tiny artefacts for the checkpoint tests: SentencePiece model, KenLM n-gram, mel statistics,
YAML config and a training checkpoint with Adam state, all written under tmp paths.

tests/core/conftest.py re-exports these fixtures for test_load_hw.py.
"""

import io
import shutil
import subprocess
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece as spm
import torch

from caiman_asr_train.data.spm.spm_from_json import train_sentencepiece
from caiman_asr_train.data.tokenizer import Tokenizer
from caiman_asr_train.export.checkpointer import Checkpointer
from caiman_asr_train.rnnt import config
from caiman_asr_train.rnnt.model import RNNT

REPO_ROOT = Path(__file__).resolve().parents[3]
N_FILT = 8

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran after the cat",
    "the quick brown fox jumps over the lazy dog",
    "she sells sea shells by the sea shore",
    "we went to the market to buy some bread",
    "it was a bright cold day in april",
    "the clocks were striking thirteen",
    "all happy families are alike",
]


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory) -> Path:
    """A real unigram SentencePiece model trained on SENTENCES (unk_id 0, no BOS/EOS)."""
    return train_sentencepiece(SENTENCES * 4, tmp_path_factory.mktemp("spm") / "tiny", vocab_size=40)


@pytest.fixture(scope="session")
def other_size_spm_bytes() -> bytes:
    """A 12-piece character SentencePiece model: another vocabulary size than ``spm_model``'s."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["abc def ghi"] * 10),
        model_writer=buffer,
        vocab_size=12,
        model_type="char",
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        minloglevel=2,
    )
    return buffer.getvalue()


@pytest.fixture(scope="session")
def kenlm_files(tmp_path_factory, spm_model) -> SimpleNamespace:
    """A real KenLM model over the sentences' pieces: ``.arpa`` and ``.binary`` paths."""
    # Quiet no-op when lmplz/build_binary exist; builds them otherwise (never skipped).
    subprocess.run([str(REPO_ROOT / "scripts/build_kenlm.sh")], check=True)
    directory = tmp_path_factory.mktemp("kenlm")
    tokenizer = Tokenizer(spm_model)
    text = directory / "pieces.txt"
    text.write_text("".join(" ".join(tokenizer.pieces(s)) + "\n" for s in SENTENCES))
    arpa, binary = directory / "ngram.arpa", directory / "ngram.binary"
    subprocess.run(
        [str(REPO_ROOT / "scripts/generate_ngram.sh"), "3", str(text), str(arpa), str(binary)],
        check=True,
        capture_output=True,
    )
    return SimpleNamespace(arpa=arpa, binary=binary)


@pytest.fixture(scope="session")
def mel_stats(tmp_path_factory) -> SimpleNamespace:
    """melmeans/melvars/meln.pt for N_FILT bins (variances > 0)."""
    directory = tmp_path_factory.mktemp("stats")
    generator = torch.Generator().manual_seed(0)
    melmeans = torch.randn(N_FILT, generator=generator)
    melvars = torch.rand(N_FILT, generator=generator) + 0.5
    torch.save(melmeans, directory / "melmeans.pt")
    torch.save(melvars, directory / "melvars.pt")
    torch.save(torch.tensor([1234.0]), directory / "meln.pt")
    return SimpleNamespace(dir=directory, melmeans=melmeans, melvars=melvars)


def config_text(prefix_token_map: str = "{}") -> str:
    """A small valid YAML config; paths are relative to the YAML file (spm/, stats/, ngram/)."""
    return textwrap.dedent(
        f"""\
        tokenizer:
          sentpiece_model: spm/tiny.model
          labels: [" ", "a", "b", "c"]
          sampling: 0.0
        input_val:
          audio_dataset:
            sample_rate: 16000
            trim_silence: false
            normalize_transcripts: lowercase
            standardize_wer: true
            replacements: null
            remove_tags: true
            error_rate: word
          filterbank_features:
            normalize: per_feature
            sample_rate: 16000
            window_size: 0.02
            window_stride: 0.01
            window: hann
            n_fft: 512
            n_filt: {N_FILT}
            dither: 0.00001
            stats_path: stats
          frame_splicing:
            frame_stacking: 3
            frame_subsampling: 3
        rnnt:
          in_feats: {3 * N_FILT}
          enc_n_hid: 16
          enc_pre_rnn_layers: 1
          enc_post_rnn_layers: 1
          enc_stack_time_factor: 2
          enc_dropout: 0.1
          pred_n_hid: 12
          pred_rnn_layers: 1
          pred_dropout: 0.1
          joint_n_hid: 10
          joint_dropout: 0.1
          prefix_token_map: {prefix_token_map}
        ngram:
          ngram_path: ngram
          scale_factor: 0.05
        """
    )


def build_models(cfg: dict, seed: int = 0) -> tuple[RNNT, RNNT]:
    """(model, ema_model): training RNNTs for ``cfg`` whose weights differ."""
    n_classes = Tokenizer(cfg["tokenizer"]["sentpiece_model"]).num_labels + 1
    torch.manual_seed(seed)
    model = RNNT(n_classes, **config.rnnt(cfg))
    ema = RNNT(n_classes, **config.rnnt(cfg))
    return model, ema


@pytest.fixture
def export_env(tmp_path, spm_model, kenlm_files, mel_stats) -> SimpleNamespace:
    """A run directory with config.yaml, its spm/, stats/, ngram/ and a step-10 training checkpoint.

    The EMA weights differ from the raw weights, the optimizer is Adam after one
    step, and ``logmel_norm_weight`` is 1.0. ``save(**changes)`` writes another
    checkpoint of the same models with keys changed.
    """
    (tmp_path / "spm").mkdir()
    shutil.copy(spm_model, tmp_path / "spm/tiny.model")
    shutil.copytree(mel_stats.dir, tmp_path / "stats")
    (tmp_path / "ngram").mkdir()
    shutil.copy(kenlm_files.binary, tmp_path / "ngram/ngram.binary")
    shutil.copy(kenlm_files.arpa, tmp_path / "ngram/ngram.arpa")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(config_text(prefix_token_map="{domain: [1, 2]}"))
    cfg = config.load(config_path)
    model, ema = build_models(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    checkpointer = Checkpointer(tmp_path / "results")
    tokenizer_kw = {
        "sentpiece_model": str(tmp_path / "spm/tiny.model"),
        "labels": [" ", "a"],
        "sampling": 0.0,
        "unk": "fail",
    }

    def save(path: Path = None, **changes) -> Path:
        kwargs = dict(
            epoch=3,
            step=10,
            best_wer=0.25,
            tokenizer_kw=tokenizer_kw,
            logmel_norm_weight=1.0,
            config_path=config_path,
        )
        kwargs.update(changes)
        return checkpointer.save(model, ema, optimizer, filepath=path, **kwargs)

    return SimpleNamespace(
        dir=tmp_path,
        config_path=config_path,
        cfg=cfg,
        model=model,
        ema=ema,
        optimizer=optimizer,
        checkpointer=checkpointer,
        save=save,
        fresh_models=lambda: build_models(cfg, seed=1),
        ckpt_path=save(),
        spm_path=tmp_path / "spm/tiny.model",
        stats_dir=tmp_path / "stats",
        ngram_dir=tmp_path / "ngram",
        kenlm=kenlm_files,
    )
