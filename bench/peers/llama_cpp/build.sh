#!/usr/bin/env bash
# Device machine: build llama.cpp's `llama-bench` with CUDA for the H100/H200 (sm_90) from
# the stripped source that fetch_source.sh packed (scratch/peers/llama.cpp.tar.gz, carried
# with the working tree). Source and build go to $WORK (default /tmp/zmoe-peers), outside
# the repo copy, so carrying scratch/peers again in a later call does not wipe the build;
# they last as long as the machine stays warm. Output: $WORK/llama.cpp-build/bin/llama-bench.
#
#   bench/peers/llama_cpp/build.sh          # ~4 min on 16 cores; a second run is a no-op
#
# Device time is scarce, so a build can travel instead: PACK=FILE writes the built binaries
# (bin/ with its shared libraries, ~41 MiB as .tar.xz) to FILE — bring it back under $OUT in
# 15 MiB parts (`split -b 15M`; $OUT returns files of at most 16 MiB) and keep it here as
# scratch/peers/llama-build.tar.xz (ignored; LLAMA_PREBUILT names another). When that file
# is carried, this script unpacks it into $WORK instead of building, if the binary runs
# (its run paths point into /tmp/zmoe-peers: keep WORK at its default). REBUILD=1 builds anyway
# (e.g. on a host whose CPU lacks an instruction the -march=native CPU backend uses).
#
# LLAMA_CMAKE_ARGS adds cmake options, e.g. "-DGGML_NATIVE=OFF -DGGML_AVX2=ON" if the
# -march=native CPU backend dies with "Illegal instruction" (seen on a dev VM that reports
# AMX/AVX-512 it cannot run; the CUDA run itself needs little from the CPU backend).
set -euo pipefail
cd "$(dirname "$0")/../../.."          # repo root
TAR=scratch/peers/llama.cpp.tar.gz
WORK=${WORK:-/tmp/zmoe-peers}
SRC=$WORK/llama.cpp
BUILD=${LLAMA_BUILD:-$WORK/llama.cpp-build}
BIN=$BUILD/bin/llama-bench

if [ -x "$BIN" ] && [ "${REBUILD:-0}" != 1 ]; then
    echo "llama-bench already built: $BIN (REBUILD=1 to rebuild)"
    exit 0
fi
PREBUILT=${LLAMA_PREBUILT:-scratch/peers/llama-build.tar.xz}
if [ -f "$PREBUILT" ] && [ "${REBUILD:-0}" != 1 ] && [ "$BUILD" = "$WORK/llama.cpp-build" ]; then
    mkdir -p "$WORK"
    tar -xJf "$PREBUILT" -C "$WORK"
    if "$BIN" --help >/dev/null 2>&1; then
        echo "llama-bench unpacked from $PREBUILT: $BIN ($(sed -n 's/^llama.cpp commit: //p' "$SRC/ZMOE_PEER_SOURCE"))"
        exit 0
    fi
    echo "warning: the llama-bench in $PREBUILT does not run here: building from source"
fi
[ -f "$TAR" ] || { echo "error: $TAR not found: run bench/peers/llama_cpp/fetch_source.sh on the dev machine and carry scratch/peers" >&2; exit 1; }
for tool in cmake nvcc; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found on this machine (needed to build llama-bench with CUDA)" >&2; exit 1; }
done
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)

rm -rf "$SRC"
mkdir -p "$WORK"
tar -xzf "$TAR" -C "$WORK"
COMMIT=$(sed -n 's/^llama.cpp commit: //p' "$SRC/ZMOE_PEER_SOURCE")
echo "== llama.cpp $COMMIT: configure (CUDA, sm_90) in $BUILD"
cmake -S "$SRC" -B "$BUILD" "${GEN[@]}" \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=ON \
    -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_COMMIT="$COMMIT" -DLLAMA_BUILD_NUMBER=0 ${LLAMA_CMAKE_ARGS:-} >"$BUILD.configure.log" 2>&1 \
    || { tail -40 "$BUILD.configure.log"; echo "error: cmake configure failed (log: $BUILD.configure.log)" >&2; exit 1; }
echo "== build llama-bench with $(nproc) jobs"
start=$(date +%s)
cmake --build "$BUILD" --target llama-bench -j "$(nproc)" >"$BUILD.build.log" 2>&1 \
    || { tail -40 "$BUILD.build.log"; echo "error: build failed (log: $BUILD.build.log)" >&2; exit 1; }
[ -x "$BIN" ] || { echo "error: build finished but $BIN is missing" >&2; exit 1; }
echo "built $BIN in $(( $(date +%s) - start )) s"
"$BIN" --help >/dev/null 2>&1 || { echo "error: $BIN does not run" >&2; exit 1; }
if [ -n "${PACK:-}" ]; then
    (cd "$WORK" && tar -cf - llama.cpp-build/bin llama.cpp/ZMOE_PEER_SOURCE) | xz -T0 -6 > "$PACK"
    echo "packed the build into $PACK ($(( $(stat -c %s "$PACK") >> 20 )) MiB)"
fi
