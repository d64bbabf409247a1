#!/usr/bin/env bash
# Train an RNN-T and export its hardware checkpoints.
#
# With no arguments: set up the environment (first run only), make the demo
# data (scripts/prepare_demo.sh; a no-op once done), train
# training/configs/demo.yaml into results/ and write
# results/RNN-T_{best,last}_checkpoint.hw.pt, then print the ./val.sh command
# that scores the best one. Every argument goes to caiman_asr_train.train
# (./train.sh --help). Examples:
#   ./train.sh                                # the demo, end to end
#   ./train.sh --resume                       # continue an interrupted run in results/
#   ./train.sh --model_config training/configs/base-8703sp.yaml --dataset_dir /data/LibriSpeech \
#       --train_manifests train.json --val_manifests dev.json --num_gpus 8 --global_batch_size 1024
# Without --model_config the demo data is prepared first, the demo model (not
# an FPGA variant) is exported with --skip_state_dict_check, and on a machine
# without an NVIDIA GPU it trains in two gloo processes (--num_gpus 2), one per
# core of a 2-core CPU: 1.75x the steps per second of one process.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
started=$SECONDS

source "$root/scripts/bootstrap.sh"
caiman_bootstrap
setup_s=$((SECONDS - started))

demo=1
for arg in "$@"; do
    case "$arg" in
        --model_config|--model_config=*) demo=0 ;;
        -h|--help) exec "$PY" -m caiman_asr_train.train --help ;;
    esac
done

data_s=0
extra=()
if [ "$demo" = 1 ]; then
    "$root/scripts/prepare_demo.sh"
    data_s=$((SECONDS - started - setup_s))
    # The demo schedule, tuned to the 2-core CPU budget (~8 minutes of training).
    # Later arguments override these.
    extra=(--skip_state_dict_check --optimizer lamb --lr 1e-2 --min_lr 5e-4
           --warmup_steps 50 --hold_steps 500 --half_life_steps 150 --ema 0.99
           --training_steps 1000 --val_frequency 250 --save_frequency 250)
    if ! command -v nvidia-smi >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
        extra+=(--num_gpus 2)
    fi
fi

# OpenMP threads that busy-wait stall badly when another process shares the
# cores (a DataLoader worker, a second job); passive waiting costs nothing here.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
train_started=$SECONDS
status=0
"$PY" -m caiman_asr_train.train ${extra[@]+"${extra[@]}"} "$@" || status=$?
echo "[train.sh] times: setup ${setup_s} s, demo data ${data_s} s, training and export $((SECONDS - train_started)) s, total $((SECONDS - started)) s"
exit "$status"
