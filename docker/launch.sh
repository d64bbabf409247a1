#!/usr/bin/env bash
# Start a container of the training image with the run's directories mounted,
# as CAIMAN-ASR's launch script does:
#
#   ./docker/launch.sh DATASETS CHECKPOINTS RESULTS [COMMAND ...]
#
#   DATASETS     -> /datasets      (read-only: manifests and audio)
#   CHECKPOINTS  -> /checkpoints   (checkpoints to start from or to convert)
#   RESULTS      -> /results       (training --output_dir, converter output)
#   this checkout -> /workspace/caiman-asr-train (configs, scripts)
#
# COMMAND defaults to an interactive shell. Environment: IMAGE (default
# caiman-asr-train:gpu when nvidia-smi works here, else caiman-asr-train:cpu).
set -euo pipefail

if [ "$#" -lt 3 ]; then
    echo "usage: $0 DATASETS CHECKPOINTS RESULTS [COMMAND ...]" >&2
    exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mounts=()
for pair in "$1:/datasets:ro" "$2:/checkpoints" "$3:/results"; do
    host="${pair%%:*}"
    if [ ! -d "$host" ]; then
        echo "error: $host is not a directory; create it or pass another path" >&2
        exit 2
    fi
    mounts+=(-v "$(cd "$host" && pwd):${pair#*:}")
done
shift 3

gpu_args=()
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    image="${IMAGE:-caiman-asr-train:gpu}"
    gpu_args=(--gpus all)
else
    image="${IMAGE:-caiman-asr-train:cpu}"
fi
tty_args=()
if [ -t 0 ] && [ -t 1 ]; then
    tty_args=(-it)
fi

# DataLoader workers share batches through /dev/shm: give it the host's IPC
# namespace and lift the locked-memory limit NCCL needs.
exec docker run --rm "${tty_args[@]}" "${gpu_args[@]}" \
    --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
    "${mounts[@]}" -v "$root:/workspace/caiman-asr-train" \
    -w /workspace/caiman-asr-train "$image" "${@:-bash}"
