"""Real tiny artefacts for the export tests: eSpeak NG speech, a SentencePiece model, mel statistics
measured on that speech, a seeded model and the hardware checkpoint made from them.

tests/runtime/conftest.py re-exports these fixtures.
"""

import warnings
from types import SimpleNamespace

import pytest
import sentencepiece as spm
import soundfile
import torch
import yaml

from caiman_asr_train.core.load_hw import load_hw_checkpoint
from caiman_asr_train.data.features import FilterbankFeatures
from caiman_asr_train.data.manifest import manifest_entry, write_manifest
from caiman_asr_train.data.spm.spm_from_json import train_sentencepiece
from caiman_asr_train.export.checkpointer import Checkpointer
from caiman_asr_train.export.hardware_ckpt import create_hardware_ckpt, save_hardware_ckpt
from caiman_asr_train.recipes.demo_corpus.espeak import speaker_settings, synthesize
from caiman_asr_train.rnnt import config
from caiman_asr_train.rnnt.model import RNNT as TrainingRNNT

N_FILT = 20
SAMPLE_RATE = 16000
SENTENCES = [
    "the cat sat on the mat",
    "a dog ran after the red ball",
    "she sells sea shells by the shore",
    "we went to the market to buy bread",
]
FEATURES = {
    "normalize": "per_feature",
    "sample_rate": SAMPLE_RATE,
    "window_size": 0.025,
    "window_stride": 0.01,
    "window": "hann",
    "n_fft": 512,
    "n_filt": N_FILT,
    "dither": 0.0,
}
MODEL = {
    "in_feats": 3 * N_FILT,
    "enc_n_hid": 24,
    "enc_pre_rnn_layers": 2,
    "enc_post_rnn_layers": 1,
    "enc_stack_time_factor": 2,
    "pred_n_hid": 16,
    "pred_rnn_layers": 2,
    "joint_n_hid": 20,
    # larger than default weights, so that the seeded model emits many symbols
    "weights_init_scale": 2.0,
}


def _config() -> dict:
    """A small valid config; paths are relative to the YAML file (spm/, stats/)."""
    return {
        "tokenizer": {
            "sentpiece_model": "spm/tiny.model",
            "labels": [" ", *"abcdefghijklmnopqrstuvwxyz", "'"],
            "sampling": 0.0,
        },
        "input_val": {
            "audio_dataset": {
                "sample_rate": SAMPLE_RATE,
                "trim_silence": False,
                "normalize_transcripts": "lowercase",
                "standardize_wer": True,
                "replacements": None,
                "remove_tags": True,
                "error_rate": "word",
            },
            "filterbank_features": {**FEATURES, "stats_path": "stats"},
            "frame_splicing": {"frame_stacking": 3, "frame_subsampling": 3},
        },
        "rnnt": MODEL,
    }


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> SimpleNamespace:
    """The SENTENCES spoken by eSpeak NG, as FLAC files with a manifest (dev.json) and as arrays."""
    directory = tmp_path_factory.mktemp("speech")
    audio, entries = [], []
    for index, text in enumerate(SENTENCES):
        samples = synthesize(text, speaker_settings(7, "dev", index))
        fname = f"audio/dev_{index}.flac"
        (directory / "audio").mkdir(exist_ok=True)
        soundfile.write(directory / fname, samples, SAMPLE_RATE, subtype="PCM_16")
        # what a reader of the FLAC gets back
        audio.append(soundfile.read(directory / fname, dtype="float32")[0])
        entries.append(manifest_entry(text, fname, len(samples)))
    write_manifest(entries, directory / "dev.json")
    return SimpleNamespace(dir=directory, manifest=directory / "dev.json", audio=audio, texts=SENTENCES)


@pytest.fixture(scope="session")
def tiny_hw(tmp_path_factory, speech) -> SimpleNamespace:
    """A seeded model's training checkpoint (written by ``Checkpointer``) and the hardware checkpoint
    ``create_hardware_ckpt`` makes of it (dict and file), with mel statistics measured on ``speech``.
    ``model`` is the core model ``load_hw_checkpoint`` rebuilds.
    """
    run = tmp_path_factory.mktemp("run")
    (run / "spm").mkdir()
    model = train_sentencepiece(SENTENCES * 8, run / "spm" / "tiny", vocab_size=30)
    n_classes = spm.SentencePieceProcessor(model_file=str(model)).get_piece_size() + 1

    front_end = FilterbankFeatures(**FEATURES)
    logmels = [
        front_end(torch.from_numpy(a)[None], torch.tensor([len(a)]))[0][0].double() for a in speech.audio
    ]
    frames = torch.cat(logmels, dim=1)
    (run / "stats").mkdir()
    torch.save(frames.mean(1).float(), run / "stats/melmeans.pt")
    torch.save(frames.var(1, unbiased=False).float(), run / "stats/melvars.pt")
    torch.save(torch.tensor([float(frames.shape[1])]), run / "stats/meln.pt")

    (run / "config.yaml").write_text(yaml.safe_dump(_config()))
    cfg = config.load(run / "config.yaml")
    torch.manual_seed(0)
    trained = TrainingRNNT(n_classes, **config.rnnt(cfg))
    training_path = Checkpointer(run / "results").save(
        trained,
        trained,
        None,
        epoch=1,
        step=42,
        best_wer=0.5,
        tokenizer_kw={
            "sentpiece_model": str(run / "spm/tiny.model"),
            "labels": [" "],
            "sampling": 0.0,
            "unk": "fail",
        },
        logmel_norm_weight=1.0,
        config_path=run / "config.yaml",
        filepath=run / "step42.pt",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "software use only": not an FPGA variant
        hw = create_hardware_ckpt(
            training_path, run / "config.yaml", skip_ngram=True, skip_state_dict_check=True
        )
    hw_path = run / "tiny.hw.pt"
    save_hardware_ckpt(hw, hw_path)
    model = load_hw_checkpoint(hw_path).model
    return SimpleNamespace(
        hw=hw,
        weights={name: tensor.numpy() for name, tensor in hw["state_dict"].items()},
        features=FEATURES,
        model=model,
        hw_path=hw_path,
        training_path=training_path,
        config_path=run / "config.yaml",
    )
