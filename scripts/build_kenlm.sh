#!/usr/bin/env bash
# Build KenLM's `lmplz` and `build_binary` into tools/kenlm/bin (git-ignored)
# when they are missing. Quiet and immediate when they are already there (or
# already on PATH, as in a Docker image that ships KenLM).
#
# The C++ source comes from the `kenlm` source distribution on PyPI, which holds
# the full KenLM tree; only that is compiled (its build requirements are never
# built). The Python `kenlm` module is not built here: it comes prebuilt from
# the `ufal-kenlm` wheel (training's `lm` extra, part of `dev`). Needs cmake, a C++ compiler and the Boost/zlib/bzip2/lzma
# development packages; as root they are installed with apt-get, otherwise the
# script names them and stops.
#
# Environment: PY (Python whose pip downloads the source; default python3),
# KENLM_VERSION (the PyPI kenlm release; default 0.3.0), KENLM_JOBS (parallel
# compile jobs; default 2), KENLM_CXXFLAGS (compiler flags; default -O1 -DNDEBUG).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KENLM_VERSION="${KENLM_VERSION:-0.3.0}"
bin_dir="$root/tools/kenlm/bin"
targets=(lmplz build_binary)

have_tools() {
    local t
    for t in "${targets[@]}"; do
        [ -x "$bin_dir/$t" ] || return 1
    done
}

on_path() {
    local t
    for t in "${targets[@]}"; do
        command -v "$t" >/dev/null 2>&1 || return 1
    done
}

if have_tools || on_path; then
    exit 0
fi

mkdir -p "$root/tools/kenlm"
# Two callers at once (test.sh and prepare_demo.sh) must not build into the
# same place; the second waits and then finds the tools built.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$root/tools/kenlm/.build.lock"
    flock 9
    if have_tools; then
        exit 0
    fi
fi

log() { echo "[build_kenlm] $*" >&2; }

# Debian package -> a file or command that shows it is installed. Checked by
# file rather than with dpkg so that non-Debian systems with the same files pass.
missing_packages() {
    local missing=()
    command -v cmake >/dev/null 2>&1 || missing+=(cmake)
    command -v make >/dev/null 2>&1 || missing+=(make)
    command -v c++ >/dev/null 2>&1 || missing+=(g++)
    local pkg header
    while read -r pkg header; do
        if ! compgen -G "/usr/include/$header" >/dev/null \
            && ! compgen -G "/usr/local/include/$header" >/dev/null; then
            missing+=("$pkg")
        fi
    done <<'EOF'
libboost-program-options-dev boost/program_options.hpp
libboost-system-dev boost/system/error_code.hpp
libboost-thread-dev boost/thread.hpp
libboost-test-dev boost/test/unit_test.hpp
zlib1g-dev zlib.h
libbz2-dev bzlib.h
liblzma-dev lzma.h
EOF
    # Headers alone are not enough for Boost: the shared libraries must link.
    if ! compgen -G "/usr/lib/*/libboost_program_options.so" >/dev/null \
        && ! compgen -G "/usr/lib/libboost_program_options.so" >/dev/null \
        && ! compgen -G "/usr/local/lib/libboost_program_options.so" >/dev/null; then
        case " ${missing[*]-} " in *" libboost-program-options-dev "*) ;; *) missing+=(libboost-program-options-dev) ;; esac
    fi
    echo "${missing[*]-}"
}

missing="$(missing_packages)"
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing build packages: $missing"
        export DEBIAN_FRONTEND=noninteractive
        # shellcheck disable=SC2086
        if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing; } >/dev/null; then
            echo "error: apt-get could not install: $missing" >&2
            exit 1
        fi
    else
        echo "error: building KenLM needs these packages: $missing" >&2
        echo "       install them (e.g. sudo apt-get install $missing) and re-run $0" >&2
        exit 1
    fi
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/caiman_kenlm.XXXXXX")"
trap 'rm -rf "$work"' EXIT
build_log="$work/build.log"

fail() {
    echo "error: $1 (last lines of the build log follow)" >&2
    tail -n 30 "$build_log" >&2 || true
    exit 1
}

started=$SECONDS
py="${PY:-python3}"
# Only the kenlm sdist is wanted, never a build of it: `--no-binary kenlm`
# (not `:all:`, which would also compile its build requirements, CMake
# included, from source), and pip's metadata step runs in this Python when it
# has setuptools (no isolated build environment to fill); otherwise pip fetches
# those build requirements as wheels.
# That needs setuptools with a bdist_wheel command (setuptools >= 70.1, or the
# wheel package): a new virtual environment's bundled setuptools has none.
download_args=(download -q --no-deps --no-binary kenlm -d "$work/sdist")
if "$py" -c "import setuptools.command.bdist_wheel" >/dev/null 2>&1 \
    || "$py" -c "import setuptools, wheel" >/dev/null 2>&1; then
    download_args+=(--no-build-isolation)
fi
log "downloading the kenlm ${KENLM_VERSION} source distribution with $py -m pip"
"$py" -m pip "${download_args[@]}" "kenlm==${KENLM_VERSION}" >>"$build_log" 2>&1 \
    || fail "pip could not download the kenlm source distribution"
sdist="$(find "$work/sdist" -maxdepth 1 -name 'kenlm-*.tar.gz' | head -n 1)"
[ -n "$sdist" ] || fail "pip downloaded no kenlm-*.tar.gz"
tar -xzf "$sdist" -C "$work"
src="$work/$(basename "$sdist" .tar.gz)"
[ -f "$src/CMakeLists.txt" ] || fail "no CMakeLists.txt in $(basename "$sdist")"

log "compiling lmplz and build_binary from $(basename "$sdist") (about half a minute on 2 cores)"
# Interpolation (Eigen), tests and Python bindings are not needed for the two tools.
# -O1 instead of the Release build's -O3: 22% less compile CPU (92 s against
# 119 s here), and lmplz and build_binary ran as fast (4-grams of 21M words:
# 12.1-13.2 s against 11.9-14.6 s). KENLM_CXXFLAGS overrides it.
flags="${KENLM_CXXFLAGS:--O1 -DNDEBUG}"
configure() { # configure BUILD_DIR [CMAKE_ARGS...]
    local dir="$1"
    shift
    cmake -S "$src" -B "$dir" -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_CXX_FLAGS_RELEASE="$flags" -DCMAKE_C_FLAGS_RELEASE="$flags" \
        -DENABLE_INTERPOLATE=OFF -DCOMPILE_TESTS=OFF -DENABLE_PYTHON=OFF "$@" >>"$build_log" 2>&1
}
# A unity build (CMake >= 3.19 here) compiles each library as a few large
# translation units, so the Boost and KenLM headers are parsed a few times
# instead of once per file: 48 CPU-s instead of 101 here, and the same lmplz
# and build_binary (identical ARPA and binary files from the demo's pieces).
# util/float_to_string.cc defines names that clash with double-conversion's in
# one unit, so it stays a unit of its own. Where that fails (an older CMake, a
# KenLM with another clash) the tools are built file by file.
cat >"$work/unity.cmake" <<'CMAKE'
cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR} CALL _caiman_kenlm_unity)
function(_caiman_kenlm_unity)
  set_source_files_properties(${CMAKE_SOURCE_DIR}/util/float_to_string.cc
    DIRECTORY ${CMAKE_SOURCE_DIR}/util PROPERTIES SKIP_UNITY_BUILD_INCLUSION ON)
endfunction()
CMAKE
build="$work/build-unity"
if ! { configure "$build" -DCMAKE_UNITY_BUILD=ON -DCMAKE_PROJECT_INCLUDE="$work/unity.cmake" \
    && make -C "$build" -j"${KENLM_JOBS:-2}" "${targets[@]}" >>"$build_log" 2>&1; }; then
    log "the unity build failed; compiling file by file"
    build="$work/build"
    configure "$build" || fail "cmake configuration failed"
    make -C "$build" -j"${KENLM_JOBS:-2}" "${targets[@]}" >>"$build_log" 2>&1 || fail "compiling KenLM failed"
fi

mkdir -p "$bin_dir"
for t in "${targets[@]}"; do
    # Copy under a temporary name, then rename: never a half-written tool.
    cp "$build/bin/$t" "$bin_dir/.$t.tmp"
    chmod 755 "$bin_dir/.$t.tmp"
    mv -f "$bin_dir/.$t.tmp" "$bin_dir/$t"
done
log "built $bin_dir/{lmplz,build_binary} in $((SECONDS - started)) s"
