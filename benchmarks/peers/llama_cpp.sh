#!/usr/bin/env bash
# Builds llama.cpp's server and llama-bench in scratch space, to measure beside jitney on the same machine.
# Nothing in `make test` needs it. The source comes from PyPI: the llama-cpp-python sdist carries llama.cpp
# (vendor/llama.cpp, MIT licence), so this needs no other download.
#
#   bash benchmarks/peers/llama_cpp.sh [native|avx512|avx2] [DIR]     (default: native, /tmp/jitney-peers)
#
# avx2 builds the AVX2 + FMA + F16C kernels only (no AVX-512), so that an AVX-512 machine runs what an AMD
# Zen 2/3 or an Intel client chip would. avx512 builds the AVX-512 kernels (VNNI, BF16) without AMX: on an Intel
# Xeon with AMX the native build's server crashes at start (segmentation fault, 2026-12-05; its llama-bench
# runs), so the server's row there comes from this build. Takes about 10 minutes on 2 cores. Prints the two
# binaries' paths.
set -euo pipefail
ISA=${1:-native}
DIR=${2:-/tmp/jitney-peers}
VERSION=0.3.36
case "$ISA" in
  native) FLAGS=(-DGGML_NATIVE=ON) ;;
  avx512) FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
                 -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
                 -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF) ;;
  avx2) FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
               -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF) ;;
  *) echo "usage: $0 [native|avx512|avx2] [DIR]" >&2; exit 2 ;;
esac
mkdir -p "$DIR"
cd "$DIR"
if [ ! -d "llama_cpp_python-$VERSION" ]; then
  python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .
  tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
BUILD="$DIR/llama.cpp-$ISA"
command -v cmake >/dev/null || { echo "cmake is needed (apt-get install cmake)" >&2; exit 1; }
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF "${FLAGS[@]}" >/dev/null
cmake --build "$BUILD" -j"$(nproc)" --target llama-server llama-bench >/dev/null
echo "$BUILD/bin/llama-server"
echo "$BUILD/bin/llama-bench"
