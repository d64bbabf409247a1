#!/usr/bin/env bash
# Run the test suite. Bootstraps the environment (virtualenv, packages, KenLM
# tools) on first use; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
caiman_bootstrap
scripts/build_kenlm.sh
export PATH="$PWD/tools/kenlm/bin:$PATH"
# One style for the whole tree (ruff.toml): formatting and lint first, in seconds.
"$PY" -m ruff format --check --quiet . || { echo "error: run '$PY -m ruff format .' to format the tree" >&2; exit 1; }
"$PY" -m ruff check --quiet . || { echo "error: fix the lint findings above (many: '$PY -m ruff check --fix .')" >&2; exit 1; }
cd training
exec "$PY" -m pytest -q "$@"
