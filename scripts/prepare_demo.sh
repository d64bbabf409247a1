#!/usr/bin/env bash
# Make everything the built-in demo needs: the eSpeak NG speech corpus, its mel
# statistics, the SentencePiece model and the KenLM n-gram, under datasets/demo
# (paths as in training/configs/demo.yaml). Each step is skipped when its
# outputs are up to date, so a re-run takes a few seconds.
# Extra arguments go to the Python command (python -m caiman_asr_train.recipes.prepare_demo --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
caiman_bootstrap
started=$SECONDS
"$root/scripts/build_kenlm.sh"
echo "[prepare_demo] kenlm tools: ready ($((SECONDS - started)) s)"
export PATH="$root/tools/kenlm/bin:$PATH"
exec "$PY" -m caiman_asr_train.recipes.prepare_demo "$@"
