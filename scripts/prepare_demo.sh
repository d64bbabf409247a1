#!/usr/bin/env bash
# Make everything the built-in demo needs: the eSpeak NG speech corpus, its mel
# statistics, the SentencePiece model and the KenLM n-gram, under datasets/demo
# (paths as in training/configs/demo.yaml). Each step is skipped when its
# outputs are up to date, so a re-run takes a few seconds.
# Extra arguments go to the Python command (python -m caiman_asr_train.recipes.prepare_demo --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
source "$root/scripts/background.sh"
caiman_bootstrap lm
export PATH="$root/tools/kenlm/bin:$PATH"
# KenLM's tools are needed only by the last phase (the n-gram): compile them in
# the background while the corpus is synthesised. The n-gram phase runs
# build_kenlm.sh itself, which waits for this build (a lock) and then finds
# the tools; a quiet no-op when they are already built.
caiman_background "$root/scripts/build_kenlm.sh"
"$PY" -m caiman_asr_train.recipes.prepare_demo "$@"
caiman_background_wait
