"""load_hw_checkpoint: a hardware checkpoint alone rebuilds the exact model, and bad files are refused."""

import warnings
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from caiman_asr_train.core.decoder import greedy_decode
from caiman_asr_train.core.errors import CheckpointError
from caiman_asr_train.core.load_hw import HW_CKPT_UPSTREAM_KEYS, Checkpoint, load_hw_checkpoint
from caiman_asr_train.core.model import RNNT, TorchConfig
from caiman_asr_train.export.hardware_ckpt import create_hardware_ckpt, save_hardware_ckpt

pytestmark = pytest.mark.filterwarnings("ignore:the EMA weights match no FPGA")


@pytest.fixture
def hw(export_env) -> dict:
    """The hardware-checkpoint dict of export_env's training checkpoint (with n-gram and prefix map)."""
    return create_hardware_ckpt(export_env.ckpt_path, export_env.config_path, skip_state_dict_check=True)


def write(hw: dict, path: Path) -> Path:
    """Save without validation, as another (or a broken) writer would."""
    torch.save(hw, path, pickle_protocol=2)
    return path


def features(seed: int = 0, frames: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Spliced features x[T, 3, 24] and lengths[3] in frames."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(frames, 3, 24, generator=generator), torch.tensor([frames, frames // 2, 3])


def decode(model: RNNT, x: torch.Tensor, lens: torch.Tensor) -> list[list[int]]:
    # Untrained models rarely pick blank; a small symbol cap keeps decoding quick.
    return greedy_decode(model, x, lens, max_symbols_per_step=2)


def reference_model(export_env) -> RNNT:
    """A core RNNT holding the training checkpoint's EMA weights."""
    model = RNNT(export_env.ema.config)
    model.load_state_dict(export_env.ema.state_dict())
    return model.eval()


def test_round_trip_rebuilds_the_ema_model_exactly(export_env, hw, tmp_path):
    path = tmp_path / "model.hw.pt"
    save_hardware_ckpt(hw, path)
    ckpt = load_hw_checkpoint(path)
    assert isinstance(ckpt, Checkpoint)
    model = ckpt.model
    assert type(model) is RNNT and not model.training and model.config.lstm == TorchConfig()
    vocab_size = spm.SentencePieceProcessor(model_file=str(export_env.spm_path)).get_piece_size()
    assert model.config.n_classes == vocab_size + 1
    assert next(model.parameters()).device == torch.device("cpu")

    reference = reference_model(export_env)
    x, lens = features()
    with torch.no_grad():
        f, f_lens, _ = model.encode(x, lens)
        f_ref, f_lens_ref, _ = reference.encode(x, lens)
        y = torch.tensor([[1, 2, 3], [4, 5, 0], [6, 0, 0]])  # label ids, padded with 0
        g, _ = model.predict(y)
        g_ref, _ = reference.predict(y)
        assert torch.equal(f, f_ref) and torch.equal(f_lens, f_lens_ref) and torch.equal(g, g_ref)
        assert torch.equal(model.joint(f, g), reference.joint(f_ref, g_ref))
    hyps = decode(model, x, lens)
    assert hyps == decode(reference, x, lens) and any(hyps)

    features_cfg = export_env.cfg["input_val"]["filterbank_features"]
    assert ckpt.data_config["filterbank_features"] == {
        k: v for k, v in features_cfg.items() if k != "stats_path"
    }
    assert ckpt.data_config["frame_splicing"] == {"frame_stacking": 3, "frame_subsampling": 3}
    assert torch.equal(ckpt.data_config["melmeans"], torch.load(export_env.stats_dir / "melmeans.pt"))
    assert torch.equal(ckpt.data_config["melvars"], torch.load(export_env.stats_dir / "melvars.pt"))
    assert ckpt.data_config["melalpha"] == 0.0
    assert ckpt.data_config["labels"] == [" ", "a", "b", "c"]
    assert ckpt.sentpiece_model_binary == export_env.spm_path.read_bytes()
    assert ckpt.ngram == {"binary": export_env.kenlm.binary.read_bytes(), "scale_factor": 0.05}
    assert ckpt.version == "1.15.0" and ckpt.rnnt_config == hw["rnnt_config"]
    assert ckpt.prefix_token_map == {"domain": [1, 2]} == model.config.prefix_token_map
    assert (ckpt.epoch, ckpt.step, ckpt.best_wer) == (3, 10, 0.25)


@pytest.mark.parametrize("version", ["1.10.0", "1.14.0"])
def test_upstream_layout_loads_and_decodes(export_env, hw, tmp_path, version):
    """Upstream 1.10-1.14: 11 keys, no raw_prefix_token_map, a SentencePiece path from another machine."""
    del hw["raw_prefix_token_map"]
    hw["version"] = version
    hw["rnnt_config"]["tokenizer"]["sentpiece_model"] = "/results/upstream/librispeech29.model"
    assert sorted(hw) == sorted(HW_CKPT_UPSTREAM_KEYS) and len(hw) == 11
    ckpt = load_hw_checkpoint(write(hw, tmp_path / "upstream.hw.pt"))
    assert ckpt.version == version and ckpt.prefix_token_map == {}
    x, lens = features(seed=1)
    hyps = decode(ckpt.model, x, lens)
    assert hyps == decode(reference_model(export_env), x, lens) and any(hyps)
    tokenizer = spm.SentencePieceProcessor(model_proto=ckpt.sentpiece_model_binary)
    assert all(isinstance(tokenizer.decode(ids), str) for ids in hyps)


@pytest.mark.parametrize(
    "version, words",
    [
        ("1.15.1", "newer than this reader.*upgrade caiman_asr_train to 1.15.1 or later"),
        ("1.16.0", "newer than this reader.*upgrade caiman_asr_train to 1.16.0"),
        ("2.0.0", "newer than this reader.*upgrade caiman_asr_train to 2.0.0"),
        ("9.3.1", "newer than this reader.*upgrade caiman_asr_train to 9.3.1"),
        ("latest", "not MAJOR.MINOR.PATCH"),
    ],
)
def test_other_versions_are_refused(hw, tmp_path, version, words):
    hw["version"] = version
    with pytest.raises(CheckpointError, match=words):
        load_hw_checkpoint(write(hw, tmp_path / "x.hw.pt"))


@pytest.mark.parametrize("version", ["1.9.0", "0.9.0"])
def test_an_unknown_older_layout_loads_with_a_one_line_warning(hw, tmp_path, version):
    hw["version"] = version
    with pytest.warns(
        UserWarning, match=f"layout version {version} is older than the layouts this reader knows"
    ):
        ckpt = load_hw_checkpoint(write(hw, tmp_path / "old.hw.pt"))
    assert ckpt.version == version


def test_known_layouts_load_without_a_warning(hw, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_hw_checkpoint(write(hw, tmp_path / "ours.hw.pt")).version == "1.15.0"


@pytest.mark.parametrize(
    "key", ["state_dict", "melmeans", "sentpiece_model", "rnnt_config", "raw_prefix_token_map"]
)
def test_a_missing_key_is_named(hw, tmp_path, key):
    del hw[key]
    with pytest.raises(CheckpointError, match=f"key '{key}' is missing"):
        load_hw_checkpoint(write(hw, tmp_path / "x.hw.pt"))


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda hw: hw.update(sentpiece_model="/some/path/tiny.model"), "key 'sentpiece_model' must be"),
        (lambda hw: hw.update(epoch=3.0), "key 'epoch' must be an int"),
        (lambda hw: hw.update(ngram={"binary": None}), "key 'ngram' must hold exactly"),
        (lambda hw: hw.update(melvars=torch.ones(5)), r"key 'melvars' must be a float tensor of shape \[8\]"),
        (lambda hw: hw.update(raw_prefix_token_map={"domain": "1 2"}), "raw_prefix_token_map"),
        (lambda hw: hw["rnnt_config"]["rnnt"].pop("joint_n_hid"), "rnnt_config.rnnt.joint_n_hid"),
        (
            lambda hw: hw["rnnt_config"]["rnnt"].update(enc_n_hid=32),
            "state_dict does not fit its rnnt_config",
        ),
        (lambda hw: hw.update(sentpiece_model=b"garbage"), "not a valid SentencePiece model"),
    ],
)
def test_wrong_types_and_inconsistent_content_are_refused(hw, tmp_path, change, words):
    change(hw)
    with pytest.raises(CheckpointError, match=words):
        load_hw_checkpoint(write(hw, tmp_path / "x.hw.pt"))


def test_a_tokenizer_of_another_size_is_refused(hw, tmp_path, other_size_spm_bytes):
    hw["sentpiece_model"] = other_size_spm_bytes
    with pytest.raises(
        CheckpointError, match=r"has \d+ pieces, so joint_net.2.weight needs \d+ rows, found 41"
    ):
        load_hw_checkpoint(write(hw, tmp_path / "x.hw.pt"))


def test_unreadable_files_and_invalid_dicts_are_refused(hw, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_hw_checkpoint(tmp_path / "missing.hw.pt")
    with pytest.raises(CheckpointError, match="not a hardware-checkpoint dict|not a checkpoint dict"):
        load_hw_checkpoint(write([1, 2], tmp_path / "list.hw.pt"))
    hw["version"] = 15
    with pytest.raises(CheckpointError, match="key 'version'"):
        save_hardware_ckpt(hw, tmp_path / "never.hw.pt")
    assert not (tmp_path / "never.hw.pt").exists()


def test_in_feats_must_be_n_filt_times_frame_stacking(hw, tmp_path):
    hw["rnnt_config"]["rnnt"]["in_feats"] += 1
    n_filt = hw["rnnt_config"]["input_val"]["filterbank_features"]["n_filt"]
    stacking = hw["rnnt_config"]["input_val"]["frame_splicing"]["frame_stacking"]
    expected = rf"rnnt.in_feats \({n_filt * stacking + 1}\) must equal .* \({n_filt} \* {stacking} = {n_filt * stacking}\)"
    with pytest.raises(CheckpointError, match=expected):
        load_hw_checkpoint(write(hw, tmp_path / "x.hw.pt"))
