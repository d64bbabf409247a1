"""The real tiny checkpoint artefacts of tests/export/conftest.py (SentencePiece model, KenLM
n-gram, mel statistics, export environment) for every test folder.

Defined once, next to the export tests that build hardware checkpoints, and
loaded here by path (pytest's importlib mode gives test folders no package to
import from).
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_export_checkpoint_fixtures", Path(__file__).resolve().parent / "export" / "conftest.py"
)
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

spm_model = _fixtures.spm_model
other_size_spm_bytes = _fixtures.other_size_spm_bytes
kenlm_files = _fixtures.kenlm_files
mel_stats = _fixtures.mel_stats
export_env = _fixtures.export_env
