#!/usr/bin/env bash
# Source this file (do not execute it): it sets PY to a Python interpreter that
# imports caiman_asr_train from THIS checkout, creating .venv at the repository
# root and installing the package when no such interpreter exists yet.
# Idempotent: a second run only checks and is quiet.

_caiman_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

_caiman_has_package() {
    # True when "$1" imports caiman_asr_train from this checkout's training/.
    "$1" - "$_caiman_root/training" <<'PYEOF' >/dev/null 2>&1
import os, sys
import caiman_asr_train
want = os.path.realpath(sys.argv[1])
got = os.path.realpath(os.path.dirname(os.path.dirname(caiman_asr_train.__file__)))
sys.exit(0 if got == want else 1)
PYEOF
}

caiman_bootstrap() {
    local candidate
    for candidate in "${CAIMAN_PYTHON:-}" "$_caiman_root/.venv/bin/python" "$(command -v python3 || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && _caiman_has_package "$candidate"; then
            PY="$candidate"
            export PY
            return 0
        fi
    done

    echo "[bootstrap] setting up $_caiman_root/.venv (first run only)" >&2
    local base_python
    base_python="$(command -v python3)" || { echo "error: python3 not found; install Python >= 3.10" >&2; return 1; }
    if [ ! -x "$_caiman_root/.venv/bin/python" ]; then
        "$base_python" -m venv "$_caiman_root/.venv" || { echo "error: could not create $_caiman_root/.venv (on Debian: apt-get install python3-venv)" >&2; return 1; }
    fi
    PY="$_caiman_root/.venv/bin/python"
    export PY
    "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
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
    echo "[bootstrap] installing ${requirements[*]:+${requirements[*]} and }caiman_asr_train (editable) with its dependencies" >&2
    "$PY" -m pip install -q --prefer-binary ${requirements[@]+"${requirements[@]}"} -e "$_caiman_root/training[dev]" \
        || { echo "error: pip install ${requirements[*]:+${requirements[*]} }-e training[dev] failed" >&2; return 1; }
    _caiman_has_package "$PY" || { echo "error: caiman_asr_train still not importable from $PY" >&2; return 1; }
}
