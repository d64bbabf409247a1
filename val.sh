#!/usr/bin/env bash
# Validate a checkpoint (training *.pt, hardware *.hw.pt, or a directory of them)
# and print its word error rate. Bootstraps the environment on first use; every
# argument goes to caiman_asr_train.val (see --help). Example:
#   ./val.sh --ckpt results/RNN-T_best_checkpoint.hw.pt
set -euo pipefail
source "$(dirname "$0")/scripts/bootstrap.sh"
# The KenLM module (beam search with the n-gram) and the ONNX runtimes (inference bundles).
caiman_bootstrap lm,deploy
exec "$PY" -m caiman_asr_train.val "$@"
