#!/usr/bin/env bash
# Run the test suite. Bootstraps the environment (virtualenv, packages, KenLM
# tools) on first use; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
caiman_bootstrap
scripts/build_kenlm.sh
export PATH="$PWD/tools/kenlm/bin:$PATH"
cd training
exec "$PY" -m pytest -q "$@"
