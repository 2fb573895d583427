#!/usr/bin/env bash
# Dev machine (needs PyPI): fetch llama.cpp's source as vendored by the PyPI source
# distribution of llama-cpp-python, strip it to what building `llama-bench` with CUDA
# needs, and pack it into scratch/peers/llama.cpp.tar.gz (ignored; a few MB) to carry to
# the device machine, which cannot download anything.
#
#   bench/peers/llama_cpp/fetch_source.sh            # pinned version below
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 bench/peers/llama_cpp/fetch_source.sh
#
# Why pip and not git: PyPI is the registry reachable from the dev machine, and the sdist
# of llama-cpp-python vendors one exact llama.cpp commit (named in its CHANGELOG).
# `pip download` prepares the sdist's metadata, which runs its build backend
# (scikit-build-core, which insists on finding CMake); to keep pip from compiling CMake from
# source under --no-binary :all:, the backend and a CMake wheel are installed in a
# throwaway venv and the download runs there with --no-build-isolation.
set -euo pipefail
cd "$(dirname "$0")/../../.."          # repo root
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
DEST=scratch/peers
OUT_TAR=$DEST/llama.cpp.tar.gz

command -v python3 >/dev/null || { echo "error: python3 not found" >&2; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/zmoe-llama-src.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "== venv with the sdist's build backend (so pip can prepare its metadata)"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check scikit-build-core cmake

echo "== pip download --no-binary :all: llama-cpp-python==$VERSION"
"$WORK/venv/bin/python" -m pip download -q --disable-pip-version-check \
    --no-binary :all: --no-deps --no-build-isolation \
    "llama-cpp-python==$VERSION" -d "$WORK/dl"
SDIST=$(ls "$WORK"/dl/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)
[ -n "$SDIST" ] || { echo "error: pip did not produce llama_cpp_python-$VERSION.tar.gz in $WORK/dl" >&2; exit 1; }
SDIST_SHA=$(sha256sum "$SDIST" | cut -d' ' -f1)
tar -xzf "$SDIST" -C "$WORK"
PKG="$WORK/llama_cpp_python-$VERSION"
SRC="$PKG/vendor/llama.cpp"
[ -f "$SRC/CMakeLists.txt" ] || { echo "error: $SDIST has no vendor/llama.cpp/CMakeLists.txt" >&2; exit 1; }

# The llama.cpp commit this release vendors: the newest "update llama.cpp to ...@<sha>"
# line of its CHANGELOG (the sdist has no .git).
COMMIT=$(grep -o -m1 'llama\.cpp@[0-9a-f]\{7,40\}' "$PKG/CHANGELOG.md" | cut -d@ -f2 || true)
COMMIT=${COMMIT:-unknown}

echo "== strip to what llama-bench + CUDA needs"
STRIP="$WORK/llama.cpp"
mkdir -p "$STRIP/tools" "$STRIP/ggml/src"
for p in CMakeLists.txt LICENSE cmake include src common vendor licenses; do
    [ -e "$SRC/$p" ] && cp -a "$SRC/$p" "$STRIP/"
done
cp -a "$SRC/tools/llama-bench" "$STRIP/tools/"
# Only llama-bench among the tools (the upstream tools/CMakeLists.txt adds every tool).
cat > "$STRIP/tools/CMakeLists.txt" <<'CMAKE'
# zmoe peer benchmark: stripped llama.cpp, only llama-bench.
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(llama-bench)
CMAKE
cp -a "$SRC/ggml/CMakeLists.txt" "$SRC/ggml/cmake" "$SRC/ggml/include" "$STRIP/ggml/"
# ggml core sources + the CPU and CUDA backends; every other backend directory is dropped
# (ggml/src/CMakeLists.txt only enters a backend's folder when GGML_<BACKEND>=ON).
for f in "$SRC"/ggml/src/*; do
    b=$(basename "$f")
    if [ -d "$f" ] && [ "$b" != ggml-cpu ] && [ "$b" != ggml-cuda ]; then
        continue
    fi
    cp -a "$f" "$STRIP/ggml/src/"
done
# Header-only audio/image decoders are used by mtmd (multimodal), never by llama-bench;
# their CMake targets are INTERFACE libraries, so the folders stay and the headers go.
rm -f "$STRIP/vendor/miniaudio/miniaudio.h" "$STRIP"/vendor/stb/*.h
cat > "$STRIP/ZMOE_PEER_SOURCE" <<INFO
llama.cpp commit: $COMMIT
source: PyPI sdist llama-cpp-python==$VERSION (vendor/llama.cpp), sha256 $SDIST_SHA
stripped by: bench/peers/llama_cpp/fetch_source.sh (llama-bench + ggml CPU/CUDA only)
INFO

mkdir -p "$DEST"
tar -C "$WORK" -czf "$OUT_TAR.tmp" llama.cpp
mv "$OUT_TAR.tmp" "$OUT_TAR"
echo "$COMMIT" > "$DEST/llama.cpp.COMMIT"
echo
cat "$STRIP/ZMOE_PEER_SOURCE"
echo "packed: $OUT_TAR ($(du -h "$OUT_TAR" | cut -f1), $(tar -tzf "$OUT_TAR" | wc -l) entries)"
echo "carry it to the device machine with scratch/gpu (see bench/peers/llama_cpp/README.md)"
