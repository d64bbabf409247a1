"""YAML config loading and validation (docs/formats.md section 4)."""

from pathlib import Path

import pytest
import yaml

from caiman_asr_train.core.errors import ConfigError
from caiman_asr_train.core.export_schema import RNNTInferenceConfigSchema
from caiman_asr_train.export.hardware_ckpt import inference_only_config
from caiman_asr_train.rnnt import config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def write_variant(tmp_path: Path, edit) -> Path:
    """Copy testing-1023sp.yaml (anchors resolved) with ``edit(cfg)`` applied."""
    cfg = yaml.safe_load((CONFIG_DIR / "testing-1023sp.yaml").read_text())
    edit(cfg)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {"testing-1023sp.yaml", "base-8703sp.yaml", "large-17407sp.yaml", "demo.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_key_is_in_the_inference_schema_or_ignored(path):
    raw = yaml.safe_load(path.read_text())
    top = RNNTInferenceConfigSchema
    nested = {name: field.annotation for name, field in top.model_fields.items()}
    for section, body in raw.items():
        assert section in top.known_keys(), f"{path.name}: top-level '{section}'"
        if section in top.allow_ignore:
            continue
        schema = nested[section]
        for key, value in body.items():
            assert key in schema.known_keys(), (
                f"{path.name}: '{section}.{key}' is neither in the schema nor ignored"
            )
            sub = schema.model_fields.get(key)
            if sub is not None and isinstance(value, dict) and hasattr(sub.annotation, "known_keys"):
                for subkey in value:
                    assert subkey in sub.annotation.known_keys(), f"{path.name}: '{section}.{key}.{subkey}'"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_inference_only_config_of_each_shipped_config_validates(path):
    inference = inference_only_config(path)
    assert RNNTInferenceConfigSchema.model_validate(inference).model_dump() == inference
    assert set(inference) == {"input_val", "rnnt", "tokenizer"}
    assert "stats_path" not in inference["input_val"]["filterbank_features"]
    assert "sampling" not in inference["tokenizer"]
    assert "joint_net_lr_factor" not in inference["rnnt"]


def test_a_new_unclassified_key_is_rejected_by_the_schema(tmp_path):
    cfg = config.load(CONFIG_DIR / "testing-1023sp.yaml")
    cfg["rnnt"]["brand_new_key"] = 1
    with pytest.raises(ConfigError, match="brand_new_key"):
        inference_only_config(cfg)


def test_values_match_the_spec_for_base_and_large():
    base = config.load(CONFIG_DIR / "base-8703sp.yaml")
    assert base["input_val"]["filterbank_features"]["window_size"] == 0.025
    assert base["rnnt"]["enc_post_rnn_layers"] == 6
    assert base["rnnt"]["joint_n_hid"] == 768
    assert base["rnnt"]["joint_net_lr_factor"] == 0.343
    large = config.load(CONFIG_DIR / "large-17407sp.yaml")
    assert (large["rnnt"]["enc_n_hid"], large["rnnt"]["pred_n_hid"], large["rnnt"]["joint_n_hid"]) == (
        1536,
        768,
        1024,
    )
    assert large["rnnt"]["joint_net_lr_factor"] == 0.243


def test_relative_paths_resolve_against_the_yaml_directory(tmp_path):
    path = write_variant(tmp_path, lambda c: c["tokenizer"].update(sentpiece_model="spm/x.model"))
    cfg = config.load(path)
    assert cfg["tokenizer"]["sentpiece_model"] == str((tmp_path / "spm/x.model").resolve())
    assert Path(cfg["ngram"]["ngram_path"]).is_absolute()
    assert Path(config.input(cfg, "val")["filterbank_features"]["stats_path"]).is_absolute()


def test_anchors_and_merge_keys_give_independent_copies():
    cfg = config.load(CONFIG_DIR / "testing-1023sp.yaml")
    val_features = cfg["input_val"]["filterbank_features"]
    train_features = cfg["input_train"]["filterbank_features"]
    assert val_features == train_features
    val_features["n_fft"] = 1024
    assert train_features["n_fft"] == 512
    cfg["input_val"]["audio_dataset"]["error_rate"] = "char"
    assert cfg["input_train"]["audio_dataset"]["error_rate"] == "word"


def test_aliased_list_is_copied(tmp_path):
    text = (CONFIG_DIR / "testing-1023sp.yaml").read_text()
    text = text.replace("  labels: [", "  labels: &labels [", 1) + "user_tokens:\n  all_labels: *labels\n"
    path = tmp_path / "aliased.yaml"
    path.write_text(text)
    cfg = config.load(path)
    cfg["user_tokens"]["all_labels"].append("extra")
    assert "extra" not in cfg["tokenizer"]["labels"]


def test_toml_is_rejected(tmp_path):
    path = tmp_path / "model.toml"
    path.write_text("[rnnt]\nin_feats = 240\n")
    with pytest.raises(ConfigError, match=r"model\.toml.*TOML.*YAML"):
        config.load(path)


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml.*empty"):
        config.load(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml.*not found"):
        config.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "section, edit",
    [
        ("rnnt", lambda c: c["rnnt"].update(enc_hid=3)),
        ("tokenizer", lambda c: c["tokenizer"].update(vocab=3)),
        ("input_val.filterbank_features", lambda c: c["input_val"]["filterbank_features"].update(nfft=3)),
        ("input_train.spec_augment", lambda c: c["input_train"]["spec_augment"].update(masks=3)),
        ("input_train.audio_dataset", lambda c: c["input_train"]["audio_dataset"].update(max_len=3)),
        ("input_val.audio_dataset", lambda c: c["input_val"]["audio_dataset"].update(max_duration=3)),
        ("ngram", lambda c: c["ngram"].update(order=3)),
        ("top level", lambda c: c.update(optimiser={})),
    ],
)
def test_unknown_keys_name_the_key_and_the_section(tmp_path, section, edit):
    path = write_variant(tmp_path, edit)
    with pytest.raises(ConfigError, match=rf"unknown key '\w+' in section '{section}'"):
        config.load(path)


def test_in_feats_must_equal_n_filt_times_stacking(tmp_path):
    path = write_variant(tmp_path, lambda c: c["rnnt"].update(in_feats=160))
    with pytest.raises(
        ConfigError,
        match=r"rnnt\.in_feats \(160\) must equal .*n_filt \* frame_splicing\.frame_stacking \(80 \* 3 = 240\)",
    ):
        config.load(path)


def test_sample_rates_must_agree(tmp_path):
    path = write_variant(tmp_path, lambda c: c["input_val"]["audio_dataset"].update(sample_rate=8000))
    with pytest.raises(
        ConfigError,
        match=r"audio_dataset\.sample_rate \(8000\) must equal .*filterbank_features\.sample_rate \(16000\)",
    ):
        config.load(path)


def test_stacking_must_equal_subsampling(tmp_path):
    def edit(c):
        c["input_val"]["frame_splicing"].update(frame_subsampling=2)

    path = write_variant(tmp_path, edit)
    with pytest.raises(ConfigError, match="frame_stacking \\(3\\) must equal frame_subsampling \\(2\\)"):
        config.load(path)


def test_wrong_value_type_names_the_key(tmp_path):
    path = write_variant(tmp_path, lambda c: c["rnnt"].update(enc_n_hid="big"))
    with pytest.raises(ConfigError, match=r"rnnt\.enc_n_hid"):
        config.load(path)


def test_missing_required_section(tmp_path):
    path = write_variant(tmp_path, lambda c: c.pop("rnnt"))
    with pytest.raises(ConfigError, match="required section 'rnnt' is missing"):
        config.load(path)


def test_accessors_fill_defaults_and_split_train_only_keys():
    cfg = config.load(CONFIG_DIR / "testing-1023sp.yaml")
    val = config.input(cfg, "val")
    train = config.input(cfg, "train")
    assert val["spec_augment"] is None and val["max_duration"] is None
    assert train["spec_augment"]["freq_masks"] == 2
    assert train["speed_perturbation"] == {"min_rate": 0.85, "max_rate": 1.15, "p": 1.0}
    assert "max_duration" not in train["audio_dataset"]
    with pytest.warns(UserWarning, match="custom_lstm"):
        kwargs = config.rnnt(cfg)
    assert kwargs["hidden_hidden_bias_scale"] == 0.0 and kwargs["enc_lr_factor"] == 1.0
    assert config.tokenizer(cfg)["sampling"] == 0.05
    assert config.ngram(cfg)["scale_factor"] == 0.05
