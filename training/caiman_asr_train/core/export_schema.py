"""The inference config schema: what the inference server reads from a hardware checkpoint.

Each model forbids unknown keys. ``allow_ignore`` lists training-only keys that
are dropped before validation. A new YAML key must be added either to a schema
(the server needs it) or to an ``allow_ignore`` set (training only); the config
loader derives its known-key sets from these classes, and a test guards it.
"""

from typing import Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, model_validator


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")
    allow_ignore: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _drop_training_only_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in cls.allow_ignore}
        return data

    @classmethod
    def known_keys(cls) -> frozenset[str]:
        """Every key a YAML section may hold: schema fields and ignored keys."""
        return frozenset(cls.model_fields) | cls.allow_ignore


class FilterbankFeaturesSchema(_Schema):
    allow_ignore: ClassVar[frozenset[str]] = frozenset({"stats_path"})
    dither: float
    n_fft: int
    n_filt: int
    normalize: str
    sample_rate: int
    window: str
    window_size: float
    window_stride: float


class FrameSplicingSchema(_Schema):
    frame_stacking: int
    frame_subsampling: int


LR_FACTOR_KEYS = frozenset(
    {
        "enc_lr_factor",
        "pred_lr_factor",
        "joint_enc_lr_factor",
        "joint_pred_lr_factor",
        "joint_net_lr_factor",
    }
)


class ModelSchema(_Schema):
    allow_ignore: ClassVar[frozenset[str]] = (
        frozenset(
            {
                "custom_lstm",
                "enc_batch_norm",
                "enc_dropout",
                "enc_freeze",
                "enc_rw_dropout",
                "forget_gate_bias",
                "hidden_hidden_bias_scale",
                "weights_init_scale",
                "joint_apex_relu_dropout",
                "joint_apex_transducer",
                "joint_dropout",
                "pred_batch_norm",
                "pred_dropout",
                "pred_rw_dropout",
                "quantize",
                "gpu_unavailable",
                "hard_activation_functions",
                "prefix_token_map",
            }
        )
        | LR_FACTOR_KEYS
    )
    enc_n_hid: int
    enc_post_rnn_layers: int
    enc_pre_rnn_layers: int
    enc_stack_time_factor: int
    in_feats: int
    joint_n_hid: int
    pred_n_hid: int
    pred_rnn_layers: int


class TokenizerSchema(_Schema):
    allow_ignore: ClassVar[frozenset[str]] = frozenset({"sampling"})
    labels: list
    sentpiece_model: str


class InputValSchema(_Schema):
    allow_ignore: ClassVar[frozenset[str]] = frozenset({"audio_dataset"})
    filterbank_features: FilterbankFeaturesSchema
    frame_splicing: FrameSplicingSchema


class RNNTInferenceConfigSchema(_Schema):
    allow_ignore: ClassVar[frozenset[str]] = frozenset(
        {"input_train", "grad_noise_scheduler", "ngram", "user_tokens"}
    )
    input_val: InputValSchema
    rnnt: ModelSchema
    tokenizer: TokenizerSchema


def in_feats_mismatch(in_feats: Any, n_filt: Any, frame_stacking: Any) -> Optional[str]:
    """Why ``rnnt.in_feats`` does not fit the features, or None when it does.

    The encoder reads ``frame_stacking`` spliced mel frames of ``n_filt`` bins
    each, so ``in_feats`` must be ``n_filt * frame_stacking``. The one
    statement of this rule: config loading, hardware-checkpoint building and
    reading all call it.
    """
    if isinstance(n_filt, int) and isinstance(frame_stacking, int) and in_feats == n_filt * frame_stacking:
        return None
    return (
        f"rnnt.in_feats ({in_feats}) must equal filterbank_features.n_filt * frame_splicing.frame_stacking "
        f"({n_filt} * {frame_stacking}"
        + (
            f" = {n_filt * frame_stacking})"
            if isinstance(n_filt, int) and isinstance(frame_stacking, int)
            else ")"
        )
    )
