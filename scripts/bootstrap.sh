#!/usr/bin/env bash
# Source this file (do not execute it): it sets PY to a Python interpreter that
# imports caiman_asr_train from THIS checkout, creating .venv at the repository
# root and installing the package when no such interpreter exists yet.
# Idempotent: a second run only checks and is quiet.

_caiman_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

_caiman_has_package() {
    # True when "$1" imports caiman_asr_train from this checkout's training/ and
    # has every distribution that the extras "$2" (comma-separated, may be
    # empty) of its pyproject.toml ask for. The extras are read from
    # pyproject.toml itself (Python >= 3.11), so that a requirement added since
    # the environment was installed is installed too.
    "$1" - "$_caiman_root/training" "${2:-}" <<'PYEOF' >/dev/null 2>&1
import os, re, sys
from importlib import metadata
import caiman_asr_train
want = os.path.realpath(sys.argv[1])
got = os.path.realpath(os.path.dirname(os.path.dirname(caiman_asr_train.__file__)))
if got != want:
    sys.exit(1)
try:
    import tomllib
    with open(os.path.join(want, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"].get("optional-dependencies", {})
    requires = [f'{req}; extra == "{extra}"' for extra, reqs in extras.items() for req in reqs]
except ModuleNotFoundError:  # Python 3.10: the extras as they were when the package was installed
    requires = metadata.requires("caiman_asr_train") or []
pending, seen = [e for e in sys.argv[2].split(",") if e], set()
while pending:
    extra = pending.pop()
    if extra in seen:
        continue
    seen.add(extra)
    for req in requires:
        if not re.search(r"extra\s*==\s*['\"]%s['\"]" % re.escape(extra), req):
            continue
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
        inner = re.match(r"[A-Za-z0-9._-]+\[([^\]]*)\]", req)
        if name.replace("-", "_").lower() == "caiman_asr_train" and inner:
            pending.extend(e.strip() for e in inner.group(1).split(","))
        else:
            metadata.distribution(name)  # PackageNotFoundError: not installed
PYEOF
}

# caiman_bootstrap [EXTRAS]: EXTRAS are the package's optional dependency groups
# a command needs (comma-separated; default "dev", everything the tests use).
# train.sh asks only for "lm", so a first demo run does not wait for the
# deployment and test tools; a later ./test.sh adds them.
caiman_bootstrap() {
    local extras="${1-dev}"
    local candidate
    for candidate in "${CAIMAN_PYTHON:-}" "$_caiman_root/.venv/bin/python" "$(command -v python3 || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && _caiman_has_package "$candidate" "$extras"; then
            PY="$candidate"
            export PY
            return 0
        fi
    done

    local base_python
    base_python="$(command -v python3)" || { echo "error: python3 not found; install Python >= 3.10" >&2; return 1; }
    if [ ! -x "$_caiman_root/.venv/bin/python" ]; then
        echo "[bootstrap] setting up $_caiman_root/.venv (first run only)" >&2
        "$base_python" -m venv "$_caiman_root/.venv" || { echo "error: could not create $_caiman_root/.venv (on Debian: apt-get install python3-venv)" >&2; return 1; }
    fi
    PY="$_caiman_root/.venv/bin/python"
    export PY
    # A caller may start work that needs only the virtual environment's pip
    # while the packages install (train.sh: the KenLM download and compile).
    if declare -F caiman_on_venv >/dev/null; then
        caiman_on_venv
    fi
    local requirements=()
    if ! "$PY" -c "import torch" >/dev/null 2>&1; then
        # An unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU build
        # this project is tested with. GPU images bring their own torch.
        requirements+=("torch==2.13.0")
    fi
    # One pip run resolves torch and the rest together. --prefer-binary: an
    # older wheel rather than a newer source release, so set-up never compiles
    # what a wheel provides (the KenLM module comes as the ufal-kenlm wheel;
    # only scripts/build_kenlm.sh compiles, and only KenLM's command-line tools).
    # --no-compile: pip would byte-compile every file it installs (torch alone
    # has thousands, most never imported), 30 s of a 2-core machine's first run;
    # the modules the toolkit imports are compiled below instead.
    local target="$_caiman_root/training${extras:+[$extras]}"
    echo "[bootstrap] installing ${requirements[*]:+${requirements[*]} and }caiman_asr_train${extras:+[$extras]} (editable) with its dependencies" >&2
    "$PY" -m pip install -q --no-compile --prefer-binary ${requirements[@]+"${requirements[@]}"} -e "$target" \
        || { echo "error: pip install ${requirements[*]:+${requirements[*]} }-e $target failed" >&2; return 1; }
    # Write the bytecode of what training and validation import (about 5 s), as
    # pip would have, even where PYTHONDONTWRITEBYTECODE is set: otherwise every
    # process that imports torch compiles it again (4 s each). With the dev
    # extra (./test.sh) also torch._dynamo, which torch.optim imports when the
    # first optimizer is built: 8 s to compile once, then 2.4 s instead of 8 s
    # in each of the 14 test processes that train, export or average. The
    # demo's single training process would gain less than the compile costs.
    "$PY" - "$extras" >/dev/null 2>&1 <<'PYEOF' || true
import importlib, sys
sys.dont_write_bytecode = False
names = ["caiman_asr_train.train", "caiman_asr_train.val"]
if "dev" in sys.argv[1].split(","):
    names.append("torch._dynamo")
for name in names:
    try:
        importlib.import_module(name)
    except ImportError:  # val needs the deploy extra's onnxruntime
        pass
PYEOF
    _caiman_has_package "$PY" "$extras" \
        || { echo "error: caiman_asr_train${extras:+[$extras]} still not importable from $PY" >&2; return 1; }
}
