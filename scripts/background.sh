#!/usr/bin/env bash
# Source this file (do not execute it). Helpers for set-up work that runs in
# the background of a script (scripts/build_kenlm.sh while pip installs or the
# demo corpus is synthesised):
#   caiman_background CMD...   start CMD in its own process group
#   caiman_background_wait     wait for all of them; non-zero if any failed
# An interrupted or failing script stops its background work (whole process
# groups, so a compiler started by CMD goes too) instead of leaving it running.

_caiman_background_pids=()

_caiman_background_stop() {
    local pid
    for pid in ${_caiman_background_pids[@]+"${_caiman_background_pids[@]}"}; do
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
}

caiman_background() {
    if command -v setsid >/dev/null 2>&1; then
        setsid "$@" &
    else
        "$@" &
    fi
    _caiman_background_pids+=("$!")
    trap '_caiman_background_stop' EXIT
    trap '_caiman_background_stop; exit 130' INT
    trap '_caiman_background_stop; exit 143' TERM
}

caiman_background_wait() {
    local pid status=0
    for pid in ${_caiman_background_pids[@]+"${_caiman_background_pids[@]}"}; do
        wait "$pid" || status=$?
    done
    _caiman_background_pids=()
    trap - EXIT INT TERM
    return "$status"
}
