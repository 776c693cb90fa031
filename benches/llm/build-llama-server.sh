#!/usr/bin/env bash
# Builds llama.cpp's llama-server (the peer of benches/llm) from the llama.cpp tree vendored in the
# llama-cpp-python sdist on PyPI — the same llama.cpp that made tests/fixtures/llm — and caches it:
#
#   benches/llm/build-llama-server.sh            # prints the path of the binary
#
# Idempotent: the binary lives in ${XDG_CACHE_HOME:-$HOME/.cache}/nstream/llama-server/<version>/
# and is reused when present. Build flags: Release, GGML_NATIVE=OFF with the x86 SIMD options this
# CPU has set explicitly (read from /proc/cpuinfo), AMX off (a native build segfaults on the EPYC
# this project benches on), OpenMP off, curl off. Runs the compiler under `nice -n 19`.
# Environment: LLAMA_CPP_PYTHON_VERSION (default 0.3.36), LLAMA_SERVER_JOBS (default: nproc),
# LLAMA_SERVER_CPU_LEVEL=avx2 to build with every AVX-512 option off whatever the CPU has (the peer
# of NSTREAM_CPU_LEVEL=avx2; cached apart, in <version>-avx2/).
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
level="${LLAMA_SERVER_CPU_LEVEL:-}"
case "$level" in
  ""|avx2) ;;
  *) printf 'build-llama-server.sh: LLAMA_SERVER_CPU_LEVEL=%s: expected avx2 or unset\n' "$level" >&2; exit 2 ;;
esac
cache="${XDG_CACHE_HOME:-$HOME/.cache}/nstream/llama-server"
dest="$cache/$version${level:+-$level}"
bin="$dest/bin/llama-server"
log() { printf 'build-llama-server.sh: %s\n' "$*" >&2; }

if [[ -x "$bin" ]]; then
  echo "$bin"
  exit 0
fi

mkdir -p "$cache/sdist"
sdist="$cache/sdist/llama_cpp_python-$version.tar.gz"
if [[ ! -f "$sdist" ]]; then
  log "downloading the llama-cpp-python $version sdist"
  python3 -m pip download --quiet --no-binary :all: --no-deps -d "$cache/sdist" "llama-cpp-python==$version"
fi
[[ -f "$sdist" ]] || { log "no $sdist after pip download"; exit 1; }

src="$cache/src-$version"
if [[ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]]; then
  rm -rf "$src" "$src.tmp"
  mkdir -p "$src.tmp"
  tar -xzf "$sdist" -C "$src.tmp" --strip-components=1
  mv "$src.tmp" "$src"
fi
llama="$src/vendor/llama.cpp"

flags="$(grep -m1 '^flags' /proc/cpuinfo || true)"
has() {
  if [[ "$level" == avx2 && "$1" == avx512* ]]; then echo OFF; return; fi
  [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF
}
simd=(
  -DGGML_AVX="$(has avx)"
  -DGGML_AVX2="$(has avx2)"
  -DGGML_FMA="$(has fma)"
  -DGGML_F16C="$(has f16c)"
  -DGGML_AVX512="$(has avx512f)"
  -DGGML_AVX512_VBMI="$(has avx512vbmi)"
  -DGGML_AVX512_VNNI="$(has avx512_vnni)"
  -DGGML_AVX512_BF16="$(has avx512_bf16)"
  -DGGML_AVX_VNNI="$(has avx_vnni)"
)
log "SIMD options: ${simd[*]}"

build="$src/build${level:+-$level}"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
nice -n 19 cmake -S "$llama" -B "$build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=OFF \
  "${simd[@]}" \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DGGML_OPENMP=OFF \
  -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  >"$cache/cmake-configure-$version.log"
nice -n 19 cmake --build "$build" --config Release --target llama-server \
  -j "${LLAMA_SERVER_JOBS:-$(nproc)}" >"$cache/cmake-build-$version.log"

mkdir -p "$dest/bin"
cp "$build/bin/llama-server" "$bin.tmp"
mv "$bin.tmp" "$bin"
{
  echo "llama-cpp-python sdist $version (vendor/llama.cpp)"
  (cd "$llama" && grep -E '^(set\(LLAMA_BUILD_NUMBER|set\(LLAMA_BUILD_COMMIT)' CMakeLists.txt cmake/*.cmake 2>/dev/null || true)
  echo "cmake: -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF ${simd[*]} -DGGML_AMX_*=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF"
} >"$dest/BUILD-INFO"
log "built $bin"
echo "$bin"
