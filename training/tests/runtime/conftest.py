"""Fixtures for the runtime tests: the real tiny artefacts of tests/deploy/conftest.py and a bundle exported from them.

They are loaded by path (pytest's importlib mode gives test folders no package to import from).
"""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from caiman_asr_train.export.inference import export_inference

_spec = importlib.util.spec_from_file_location(
    "_deploy_fixtures", Path(__file__).resolve().parents[1] / "deploy" / "conftest.py"
)
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

speech = _fixtures.speech
tiny_hw = _fixtures.tiny_hw


@pytest.fixture(scope="session")
def bundle(tmp_path_factory, tiny_hw) -> SimpleNamespace:
    """An ONNX Runtime bundle exported from the tiny hardware checkpoint (no verification)."""
    directory = tmp_path_factory.mktemp("bundle") / "onnxruntime"
    summary = export_inference(tiny_hw.hw_path, "onnxruntime", directory)
    return SimpleNamespace(dir=directory, hw_path=tiny_hw.hw_path, summary=summary)
