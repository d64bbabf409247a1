"""Regenerate base.json and large.json from the model class and the shipped configs.

    python -m caiman_asr_train.export.model_schema.make_schemas

The vocabulary size is not in the YAML (it comes from the SentencePiece model),
so each variant's is given here.
"""

import argparse
import json
import warnings
from pathlib import Path

import torch

from caiman_asr_train.export.model_schema import SCHEMA_DIR, state_dict_schema
from caiman_asr_train.rnnt import config
from caiman_asr_train.rnnt.model import RNNT
from caiman_asr_train.utils.paths import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "training/configs"
VARIANTS = {"base": ("base-8703sp.yaml", 8703), "large": ("large-17407sp.yaml", 17407)}


def variant_schema(config_path: Path, vocab_size: int) -> dict[str, list[int]]:
    """The state-dict schema of the model a config builds with ``vocab_size`` pieces."""
    cfg = config.load(config_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = config.rnnt(cfg)
    with torch.device("meta"):
        model = RNNT(vocab_size + 1, **kwargs)
    return state_dict_schema(model.state_dict())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", type=Path, default=SCHEMA_DIR, help="where to write the JSON files")
    args = parser.parse_args()
    for name, (yaml_name, vocab_size) in VARIANTS.items():
        schema = variant_schema(CONFIG_DIR / yaml_name, vocab_size)
        out = args.output_dir / f"{name}.json"
        lines = [f"  {json.dumps(key)}: {json.dumps(shape)}" for key, shape in schema.items()]
        out.write_text("{\n" + ",\n".join(lines) + "\n}\n")
        print(f"wrote {out} ({len(schema)} tensors)")


if __name__ == "__main__":
    main()
