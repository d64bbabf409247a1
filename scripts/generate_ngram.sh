#!/usr/bin/env bash
# Usage: scripts/generate_ngram.sh ORDER TXT ARPA BINARY
#
# Build a KenLM n-gram of order ORDER from TXT (one sentence a line, e.g. the
# output of caiman_asr_train.lm.prep_kenlm_data) into ARPA and its binary form
# BINARY. lmplz and build_binary are taken from PATH, else from tools/kenlm/bin
# (scripts/build_kenlm.sh builds them there). Tiny corpora make lmplz's
# discount estimation fail; the run is then retried with --discount_fallback.
# Both outputs are written under temporary names and renamed when complete.
# Environment: LMPLZ_MEMORY, lmplz's sort memory (-S; default 10%, i.e. of RAM).
set -euo pipefail

if [ "$#" -ne 4 ]; then
    echo "usage: $0 ORDER TXT ARPA BINARY" >&2
    exit 2
fi
order="$1"
txt="$2"
arpa="$3"
binary="$4"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

case "$order" in
    '' | *[!0-9]*) echo "error: ORDER must be a positive integer, got '$order'" >&2; exit 2 ;;
esac
if [ "$order" -lt 1 ]; then
    echo "error: ORDER must be a positive integer, got '$order'" >&2
    exit 2
fi
if [ ! -s "$txt" ]; then
    echo "error: n-gram text $txt is missing or empty; make it with python -m caiman_asr_train.lm.prep_kenlm_data" >&2
    exit 2
fi

find_tool() {
    if command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
    elif [ -x "$root/tools/kenlm/bin/$1" ]; then
        echo "$root/tools/kenlm/bin/$1"
    else
        echo "error: $1 not found on PATH or in $root/tools/kenlm/bin; run scripts/build_kenlm.sh" >&2
        exit 2
    fi
}
lmplz="$(find_tool lmplz)"
build_binary="$(find_tool build_binary)"

mkdir -p "$(dirname "$arpa")" "$(dirname "$binary")"
arpa_tmp="$(mktemp "$(dirname "$arpa")/.$(basename "$arpa").XXXXXX.tmp")"
binary_tmp="$(mktemp "$(dirname "$binary")/.$(basename "$binary").XXXXXX.tmp")"
work="$(mktemp -d "${TMPDIR:-/tmp}/generate_ngram.XXXXXX")"
log="$work/log"
trap 'rm -rf "$arpa_tmp" "$binary_tmp" "$work"' EXIT

# Runs "$@" with output in $log. The outer 2>/dev/null silences bash's own
# "Aborted" notice: lmplz aborts (SIGABRT) when discount estimation fails.
quietly() {
    { "$@" >"$log" 2>&1; } 2>/dev/null
}

# lmplz's sort buffers default to most of RAM; a small fixed share suits the
# corpora this script is used for and leaves room for other jobs. Its
# temporary files go to $work, which is removed even when it aborts.
lmplz_args=(-o "$order" -S "${LMPLZ_MEMORY:-10%}" -T "$work/" --text "$txt" --arpa "$arpa_tmp")
if ! quietly "$lmplz" "${lmplz_args[@]}"; then
    echo "[generate_ngram] lmplz failed (corpus too small for discount estimation?); retrying with --discount_fallback" >&2
    if ! quietly "$lmplz" "${lmplz_args[@]}" --discount_fallback; then
        echo "error: lmplz -o $order failed on $txt:" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
fi
if ! quietly "$build_binary" "$arpa_tmp" "$binary_tmp"; then
    echo "error: build_binary failed on the ARPA model from $txt:" >&2
    tail -n 20 "$log" >&2
    exit 1
fi
chmod 644 "$arpa_tmp" "$binary_tmp"
# Binary last: its presence means both files are complete.
mv -f "$arpa_tmp" "$arpa"
mv -f "$binary_tmp" "$binary"
