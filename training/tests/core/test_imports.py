"""The layers: core/ runs a model on torch alone, data/ imports nothing above it.

Each rule is checked twice: on the sources (every import statement, lazy ones
in functions included, so an import on a rarely taken path cannot hide) and in
a fresh interpreter, where importing every module of the layer must leave
nothing forbidden in ``sys.modules``.
"""

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import caiman_asr_train

PACKAGE_DIR = Path(caiman_asr_train.__file__).parent
# What core/ may load besides the standard library and itself. numpy is not on
# the list: torch loads it when installed, so the runtime check measures what
# core adds on top of these, and the source check keeps core from naming it.
CORE_THIRD_PARTY = ("torch", "pydantic", "sentencepiece")
# Optional extras core/ imports lazily, only when a caller asks for them (an
# n-gram scorer for beam search): never at import time.
CORE_LAZY_THIRD_PARTY = ("kenlm",)
# The training stack's dependencies that an inference user must not need.
TRAINING_ONLY = ("soxr", "soundfile", "whisper_normalizer", "yaml", "tqdm")
ABOVE_DATA = ("evaluate", "lm", "recipes", "export", "train_utils", "train", "val", "deploy", "runtime")


def _modules(layer: str) -> list[str]:
    """Dotted names of every module under caiman_asr_train/<layer>, sub-packages included."""
    root = PACKAGE_DIR / layer
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
        if parts[-1] == "__main__":
            continue  # running it is the point of importing it
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(("caiman_asr_train", *parts)))
    return names


def _imports_in_source(path: Path) -> set[str]:
    """Absolute module names imported anywhere in a file (relative imports stay inside the layer)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _loaded_after_importing(layer: str, preload: tuple[str, ...]) -> list[str]:
    """Modules a fresh interpreter gains by importing all of ``layer`` after ``preload``."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(preload)!r}: importlib.import_module(name)\n"
        "before = set(sys.modules)\n"
        f"for name in {_modules(layer)!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_core_sources_import_only_stdlib_torch_pydantic_sentencepiece_and_core():
    allowed = set(CORE_THIRD_PARTY) | set(CORE_LAZY_THIRD_PARTY) | set(sys.stdlib_module_names)
    for path in sorted((PACKAGE_DIR / "core").rglob("*.py")):
        for name in _imports_in_source(path):
            top, *rest = name.split(".")
            if top == "caiman_asr_train":
                assert rest[:1] == ["core"], f"core/{path.name} imports {name}"
            else:
                assert top in allowed, f"core/{path.name} imports {name}"


def _distribution_top_levels(names: tuple[str, ...]) -> set[str]:
    """Top-level modules of the distributions providing ``names`` and of all they require."""
    providers = importlib.metadata.packages_distributions()
    wanted = [dist for name in names for dist in providers.get(name, [name])]
    seen: set[str] = set()
    while wanted:
        dist = wanted.pop().lower().replace("_", "-")
        if dist in seen:
            continue
        seen.add(dist)
        for requirement in importlib.metadata.requires(dist) or []:
            if "extra ==" not in requirement:
                wanted.append(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0])
    return {top for top, dists in providers.items() if {d.lower().replace("_", "-") for d in dists} & seen}


def test_importing_core_loads_nothing_beyond_stdlib_torch_pydantic_sentencepiece_and_core():
    # What torch and friends load on their own (torch loads numpy and tqdm) is
    # theirs; what importing core/ adds must be theirs too, or standard library.
    added = _loaded_after_importing("core", CORE_THIRD_PARTY)
    theirs = _distribution_top_levels(CORE_THIRD_PARTY)
    outside = [
        name
        for name in added
        if name.split(".")[0] not in sys.stdlib_module_names
        and name.split(".")[0] not in theirs
        and not name.startswith("_")  # interpreter internals such as _sysconfigdata
        and not name.startswith("caiman_asr_train.core")
        and name != "caiman_asr_train"
    ]
    assert outside == [], f"importing core/ also loads {outside}"
    assert not [name for name in added if name.split(".")[0] in TRAINING_ONLY]


def test_data_sources_import_nothing_above_data():
    for path in sorted((PACKAGE_DIR / "data").rglob("*.py")):
        for name in _imports_in_source(path):
            parts = name.split(".")
            if parts[0] == "caiman_asr_train" and len(parts) > 1:
                assert parts[1] not in ABOVE_DATA, f"{path.relative_to(PACKAGE_DIR)} imports {name}"


def test_importing_data_loads_nothing_above_data():
    loaded = _loaded_after_importing("data", ())
    above = [
        name
        for name in loaded
        if name.split(".")[0] == "caiman_asr_train"
        and len(name.split(".")) > 1
        and name.split(".")[1] in ABOVE_DATA
    ]
    assert above == [], f"importing data/ also loads {above}"
