#!/usr/bin/env bash
# Fuzzes every parser of nstream (the targets of fuzz/, docs/reliability.md) for SECONDS each
# (default 15, as CI runs it): builds them with cargo-fuzz on the nightly toolchain, runs each from
# its seeds (fuzz/seeds/<target>/) and a corpus kept outside the repository, and exits non-zero
# on the first crash, leaving the crashing input under fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# No sanitizer (`-s none`): the code fuzzed is safe Rust (`unsafe_code = "forbid"`), so what the
# fuzzer hunts is panics, aborts, hangs and runaway allocations, which it catches without one;
# AddressSanitizer would double the cold build of candle, tokenizers and kube on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-15}"
shift || true
cache="${XDG_CACHE_HOME:-$HOME/.cache}"
# Its own target directory: nightly, instrumented artefacts must not mix with the stable build's.
target_dir="${NSTREAM_FUZZ_TARGET_DIR:-$cache/nstream-fuzz-target}"
corpus_root="${NSTREAM_FUZZ_CORPUS:-$cache/nstream-fuzz-corpus}"
cargo_fuzz_version=0.13.1

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
if [[ "$(cargo fuzz --version 2>/dev/null || true)" != "cargo-fuzz $cargo_fuzz_version" ]]; then
  cargo install cargo-fuzz --locked --version "$cargo_fuzz_version"
fi

fuzz=(cargo +nightly fuzz)
options=(--fuzz-dir fuzz --sanitizer none --target-dir "$target_dir")
if [[ $# -gt 0 ]]; then
  targets=("$@")
else
  mapfile -t targets < <("${fuzz[@]}" list --fuzz-dir fuzz)
fi
"${fuzz[@]}" build "${options[@]}"
for target in "${targets[@]}"; do
  corpus="$corpus_root/$target"
  log="$corpus_root/$target.log"
  mkdir -p "$corpus"
  echo "== fuzz $target for ${seconds}s"
  status=0
  # -timeout: an input that takes 10 s is a hang; -rss_limit_mb: a runaway allocation is a crash.
  "${fuzz[@]}" run "${options[@]}" "$target" "$corpus" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E '^(Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" | sed 's/^/   /' || true
  echo "   corpus: $(find "$corpus" -type f | wc -l) inputs in $corpus"
  if [[ $status -ne 0 ]]; then
    tail -n 40 "$log" | cut -c1-300 >&2
    echo "fuzz target $target failed (exit $status); the input is under fuzz/artifacts/$target/" >&2
    exit "$status"
  fi
done
