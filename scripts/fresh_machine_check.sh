#!/usr/bin/env bash
# Usage: scripts/fresh_machine_check.sh [--with-tests] [--keep] [--commit REV]
#
# Run the demo as a new user would on a fresh machine, and report how long
# each phase took: clone this repository into a temporary directory (no .venv,
# no tools/, no datasets/), then with an empty pip cache (PIP_NO_CACHE_DIR=1)
#   1. ./train.sh            set-up, KenLM, demo data, training and export
#   2. ./val.sh --ckpt results/RNN-T_best_checkpoint.hw.pt   held-out greedy WER
#   3. ./train.sh again      time to the start of training in a finished checkout
#      (stopped there; it must refuse the used results/ or start quickly)
#   4. ./test.sh             with --with-tests
# Logs stay in the clone (printed at the end); the clone is deleted unless
# --keep. For people and releases (the README's demo figures come from it),
# not for the unit-test suite. Nothing outside the clone is written, apart from
# the pip downloads of a fresh virtual environment.
#
# Options:
#   --with-tests  also run ./test.sh in the clone (after the demo, as a user would)
#   --keep        keep the clone (default: delete it when the check passes)
#   --commit REV  check REV instead of HEAD (committed work only: a clone never
#                 sees uncommitted changes)
set -euo pipefail

with_tests=0
keep=0
rev=HEAD
while [ "$#" -gt 0 ]; do
    case "$1" in
        --with-tests) with_tests=1 ;;
        --keep) keep=1 ;;
        --commit)
            [ "$#" -ge 2 ] || { echo "error: --commit needs a revision" >&2; exit 2; }
            rev="$2"
            shift
            ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *) echo "error: unknown argument '$1' (see $0 --help)" >&2; exit 2 ;;
    esac
    shift
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
commit="$(git -C "$root" rev-parse -q --verify "$rev^{commit}")" \
    || { echo "error: $rev is not a commit of $root" >&2; exit 2; }
if [ "$rev" = HEAD ] && [ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]; then
    echo "[fresh_machine_check] note: uncommitted changes in $root are not part of the check" >&2
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/caiman_fresh.XXXXXX")"
clone="$work/caiman_asr_train"
logs="$work/logs"
mkdir -p "$logs"
git clone -q --no-hardlinks "$root" "$clone"
git -C "$clone" checkout -q "$commit"

# A new user's shell: no cached wheels, no interpreter override, no KenLM on
# PATH (so scripts/build_kenlm.sh really builds it).
export PIP_NO_CACHE_DIR=1
unset CAIMAN_PYTHON PY VIRTUAL_ENV
clean_path=""
IFS=: read -r -a path_dirs <<<"$PATH"
for d in "${path_dirs[@]}"; do
    if [ -x "$d/lmplz" ] || [ -x "$d/build_binary" ] || [ -e "$d/activate" ]; then
        continue
    fi
    clean_path="${clean_path:+$clean_path:}$d"
done
export PATH="$clean_path"

report=()
failed=0
# phase NAME LOG CMD...: run CMD in the clone with its output in LOG, and record its time.
phase() {
    local name="$1" log="$2"
    shift 2
    echo "[fresh_machine_check] $name: $*" >&2
    local started=$SECONDS status=0
    (cd "$clone" && "$@") >"$logs/$log" 2>&1 || status=$?
    local secs=$((SECONDS - started))
    last_secs=$secs
    report+=("$(printf '%-28s %5d s  exit %d  (log: %s)' "$name" "$secs" "$status" "$logs/$log")")
    if [ "$status" != 0 ]; then
        failed=1
        echo "[fresh_machine_check] $name failed; last lines of $logs/$log:" >&2
        tail -n 15 "$logs/$log" >&2
    fi
    return "$status"
}

machine="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $(uname -sm)"
cpu="$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
started=$SECONDS
last_secs=0
if phase "train.sh (all phases)" train.log ./train.sh; then
    train_secs=$last_secs
    # train.sh prints its own split of the time before training starts;
    # training and export are the rest of its phase.
    # KenLM compiles in the background, so its line may start in the middle of
    # a progress bar's line of the log.
    split="$(grep -h -o '^\[train.sh\].*\|\[build_kenlm\] built.*\|^\[prepare_demo\] done.*' "$logs/train.log" | sed 's/\r.*//' || true)"
    while IFS= read -r line; do
        [ -n "$line" ] && report+=("  $line")
    done <<<"$split"
    # Training and export: the phase's time less what train.sh spent before training.
    before="$(sed -n 's/^\[train.sh\] set-up \([0-9]*\) s, demo data \([0-9]*\) s.*/\1 \2/p' "$logs/train.log" | tail -n 1)"
    if [ -n "$before" ]; then
        read -r setup_s data_s <<<"$before"
        report+=("  training and export: $((train_secs - setup_s - data_s)) s")
    fi
    phase "val.sh (held-out WER)" val.log ./val.sh --ckpt results/RNN-T_best_checkpoint.hw.pt || true
    # A second ./train.sh in the finished checkout: the time until train.py
    # runs (it then refuses the used results/ directory at once).
    rerun_started=$SECONDS
    (cd "$clone" && ./train.sh) >"$logs/rerun.log" 2>&1 || true
    report+=("$(printf '%-28s %5d s  (exits at the used results/; %s)' "train.sh re-run" \
        "$((SECONDS - rerun_started))" "$(grep -h '^\[train.sh\]' "$logs/rerun.log" | tail -n 1 || true)")")
fi
if [ "$with_tests" = 1 ]; then
    phase "test.sh" test.log ./test.sh || true
fi

wer="$(grep -h '^Word Error Rate:' "$logs/val.log" 2>/dev/null | tail -n 1 || true)"
echo
echo "fresh-machine check of $(git -C "$root" log -1 --format='%h %s' "$commit" | cut -c1-72)"
echo "machine: $cpu, $machine; $(date -u '+%Y-%m-%d %H:%M UTC')"
printf '  %s\n' "${report[@]}"
echo "  held-out greedy WER (val.sh): ${wer:-see $logs/val.log}"
echo "  total: $((SECONDS - started)) s"
if [ "$failed" = 0 ] && [ "$keep" = 0 ]; then
    rm -rf "$clone"
    echo "logs: $logs (clone deleted; --keep keeps it)"
else
    echo "logs: $logs; clone: $clone"
fi
exit "$failed"
