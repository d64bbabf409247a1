"""core/ is the dependency-light inference side: it must not import training code."""

import ast
import subprocess
import sys
from pathlib import Path

import caiman_asr_train.core

CORE_DIR = Path(caiman_asr_train.core.__file__).parent
FORBIDDEN = ("rnnt", "data", "export", "train", "val", "evaluate", "lm", "utils", "train_utils")
ALLOWED_THIRD_PARTY = {"torch", "pydantic", "sentencepiece"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_sources_import_only_core_torch_pydantic_sentencepiece_and_stdlib():
    for path in sorted(CORE_DIR.glob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top == "caiman_asr_train":
                assert name.split(".")[1] == "core", f"{path.name} imports {name}"
            else:
                assert top in ALLOWED_THIRD_PARTY or top in sys.stdlib_module_names, f"{path.name} imports {name}"


def test_importing_core_loads_no_training_module():
    modules = [f"caiman_asr_train.core.{p.stem}" for p in sorted(CORE_DIR.glob("*.py")) if p.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] == 'caiman_asr_train' and len(m.split('.')) > 1 and m.split('.')[1] in {FORBIDDEN!r}]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
