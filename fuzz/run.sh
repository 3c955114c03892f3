#!/usr/bin/env bash
# Builds and runs every fuzz target for SECONDS each (default 30), seeded with the Infobip examples.
# Exits non-zero when a target crashes (the input is kept in fuzz/artifacts/<target>/).
#
#   fuzz/run.sh [SECONDS]
#
# Works on a stable toolchain: cargo fuzz passes `-Z` flags to rustc, which stable accepts under
# RUSTC_BOOTSTRAP=1 (harmless on nightly). FUZZ_SANITIZER=none skips AddressSanitizer (faster,
# and the code is `unsafe`-free, but ASan also catches leaks and overflows in C dependencies).
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-30}
sanitizer=${FUZZ_SANITIZER:-address}
targets=(normalize callback_data)
examples=../tests/fixtures/examples
export RUSTC_BOOTSTRAP=1

log() { printf '==> %s\n' "$*"; }

if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# Seeds are copied at run time, never committed: the corpus grows with every run.
mkdir -p corpus/normalize corpus/callback_data
cp -f "$examples"/*.json corpus/normalize/
for f in "$examples"/*.json; do
  # Every callbackData string of every example, one seed each (both JSON and Python-dict forms).
  if command -v jq >/dev/null; then
    jq -r '(.results // [.])[] | .callbackData | strings | @base64' "$f"
  fi | while read -r b64; do
    data=$(printf '%s' "$b64" | base64 -d)
    printf '%s' "$data" >"corpus/callback_data/seed-$(printf '%s' "$data" | sha1sum | cut -c1-16)"
  done
done
# Without jq, the whole examples still seed the decoder (it must survive them too).
cp -f "$examples"/*.json corpus/callback_data/

start=$(date +%s)
log "building fuzz targets (sanitizer: $sanitizer)"
cargo fuzz build -O --sanitizer "$sanitizer"
log "built in $(($(date +%s) - start)) s"

failed=()
for t in "${targets[@]}"; do
  log "fuzzing $t for ${seconds}s"
  mkdir -p "artifacts/$t"
  if ! cargo fuzz run -O --sanitizer "$sanitizer" "$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1; then
    failed+=("$t")
  fi
done

if ((${#failed[@]})); then
  echo "FUZZ FAILURE in: ${failed[*]} (inputs in fuzz/artifacts/; reproduce with" \
    "RUSTC_BOOTSTRAP=1 cargo fuzz run -O <target> <artifact>)" >&2
  exit 1
fi
log "no crash in ${targets[*]} (${seconds}s each)"
