"""Fixtures for the scale-factor sweep tests: the real tiny checkpoint artefacts of tests/export/conftest.py.

Loaded by path, as tests/core/conftest.py does (pytest's importlib mode gives
test folders no package to import from).
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_export_checkpoint_fixtures_for_lm", Path(__file__).resolve().parents[1] / "export" / "conftest.py"
)
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

spm_model = _fixtures.spm_model
kenlm_files = _fixtures.kenlm_files
mel_stats = _fixtures.mel_stats
export_env = _fixtures.export_env
