"""Build hardware checkpoints (``*.hw.pt``) for the FPGA inference server (SPEC section 9)."""

from pathlib import Path
from typing import Union

from pydantic import ValidationError

from caiman_asr_train.core.errors import ConfigError
from caiman_asr_train.core.export_schema import RNNTInferenceConfigSchema
from caiman_asr_train.rnnt import config


def inference_only_config(cfg_or_path: Union[dict, str, Path]) -> dict:
    """The inference config (the hardware checkpoint's ``rnnt_config``) of a config dict or YAML path."""
    cfg = cfg_or_path if isinstance(cfg_or_path, dict) else config.load(cfg_or_path)
    try:
        return RNNTInferenceConfigSchema.model_validate(cfg).model_dump()
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ConfigError(f"config key '{where}': {error['msg']}") from None
