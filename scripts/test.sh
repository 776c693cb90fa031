#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this). Installs what the tests need
# (offline model weights, a Python venv for the official openai client), cached outside the repo.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${XDG_CACHE_HOME:-$HOME/.cache}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/nstream-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== model weights (offline Hugging Face cache)"
scripts/offline-models.sh

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== API docs (rustdoc warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

echo "== packaging: every publishable crate packs with its metadata and resolves (cargo publish --dry-run)"
# Against a local overlay registry, so the workspace crates resolve one another before any is on
# crates.io (the index is read from crates.io). --no-verify: verifying builds each package outside
# the workspace, without its [profile] settings, so every dependency (candle, tokenizers, kube,
# sqlx...) is compiled again unoptimised; nstream-core alone took 7 minutes that way, and the
# builds above and below compile the same sources. Only nstream-e2e (publish = false) is skipped.
cargo publish --workspace --dry-run --allow-dirty --locked --no-verify

echo "== fuzzing: every parser (GGUF, safetensors, tokenizers, chat templates, SSE, journal, YAML), 15 s each"
# cargo-fuzz on nightly, in its own target directory; the seeds are fuzz/seeds/, the grown corpora
# are cached outside the repository (docs/reliability.md). NSTREAM_FUZZ_SECONDS=0 skips the step.
if [[ "${NSTREAM_FUZZ_SECONDS:-15}" != 0 ]]; then
  scripts/fuzz.sh "${NSTREAM_FUZZ_SECONDS:-15}"
fi

echo "== Kubernetes testbed for the operator's end-to-end test (etcd, kube-apiserver, kube-controller-manager)"
# Built from Go modules once (10-20 min cold on 2 cores), cached outside the repository.
scripts/testbed.sh build

echo "== PostgreSQL 15 + pgvector for the knowledge-base tests (a throwaway server on 127.0.0.1)"
eval "$(scripts/pg-test-server.sh start)"
trap 'scripts/pg-test-server.sh stop' EXIT
export NSTREAM_REQUIRE_PG=1

echo "== tests"
# No backtraces: a failing test's message must stay in the tail of the log CI shows (a backtrace
# of a long async test pushes it out); rerun one test with RUST_BACKTRACE=1 to get one.
RUST_BACKTRACE=0 cargo test --workspace --locked

echo "== the official openai Python client against nstream-server"
# The debug nstream-server and nstream the Rust tests use (a no-op when `cargo test` built them).
cargo build --locked -p nstream-server-bin -p nstream
python="$(scripts/python-test-env.sh)"
NSTREAM_SERVER_BIN="$CARGO_TARGET_DIR/debug/nstream-server" NSTREAM_BIN="$CARGO_TARGET_DIR/debug/nstream" \
  "$python" -m pytest tests/python -q || {
  status=$?
  # pytest exits 5 when it collected no tests: a renamed or broken file must not pass silently.
  [[ $status -ne 5 ]] || echo "pytest collected no tests in tests/python" >&2
  exit "$status"
}

echo "== container images: nstream-server and nstream-operator built by podman, started from their filesystems"
# The debug binaries above on a local Debian 12 base (debootstrap, cached); NSTREAM_SKIP_IMAGES=1 skips.
scripts/images.sh check

echo "== fine-tuning parity with PyTorch + transformers + peft (tiny checkpoint; docs/finetune.md)"
# Its pinned venv (torch from PyPI, a few GB) is built once and cached outside the repository.
scripts/finetune-parity.sh

echo "== LoRA serving parity with Python peft (tiny checkpoint; docs/adapters.md)"
scripts/lora-parity.sh
