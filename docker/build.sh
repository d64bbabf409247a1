#!/usr/bin/env bash
# Build the project's images from the repository root (any working directory will do):
#
#   ./docker/build.sh            all three images
#   ./docker/build.sh gpu        caiman-asr-train:gpu      training on NVIDIA GPUs (PyTorch container with apex)
#   ./docker/build.sh cpu        caiman-asr-train:cpu      training, validation and export on CPU
#   ./docker/build.sh convert    caiman-asr-train:convert  the batch converter (entrypoint caiman-convert)
#
# Environment: IMAGE (repository name, default caiman-asr-train; set it to your
# registry path, e.g. gcr.io/PROJECT/caiman-asr-train, before pushing).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
image="${IMAGE:-caiman-asr-train}"

build() {
    local dockerfile="$1" target="$2"
    echo "[build] $image:$target from docker/$dockerfile" >&2
    docker build -f "$root/docker/$dockerfile" --target "$target" -t "$image:$target" "$root"
}

case "${1:-all}" in
    gpu) build Dockerfile.gpu gpu ;;
    cpu) build Dockerfile.cpu cpu ;;
    convert) build Dockerfile.cpu convert ;;
    all)
        build Dockerfile.gpu gpu
        build Dockerfile.cpu cpu
        build Dockerfile.cpu convert
        ;;
    *)
        echo "error: unknown image '$1'; choose gpu, cpu, convert or all" >&2
        exit 2
        ;;
esac
