#!/usr/bin/env bash
# Runs chitchat 0.13's own integration tests (tests/cluster_test.rs, tests/perf_test.rs of the
# published crate) against chitchat-uring, renamed `chitchat`, with only the lock edit applied
# (`.lock().await` -> `.lock()`): the drop-in promise, checked with the reference's own suite.
#
# The test files are taken from the chitchat 0.13.0 source that Cargo already downloaded for our
# dev-dependency; nothing of it is copied into this repository. The scratch crate lives under
# target/chitchat-suite/ and is rebuilt from scratch every run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

# Where Cargo unpacked chitchat 0.13.0 (fetching it if this machine has not yet).
src_dir="$(cargo metadata --format-version 1 --locked 2>/dev/null |
  python3 -c 'import json,sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "chitchat" and p["version"] == "0.13.0":
        import os; print(os.path.dirname(p["manifest_path"]))')"
if [ -z "$src_dir" ] || [ ! -f "$src_dir/tests/cluster_test.rs" ]; then
  echo "chitchat-suite: cannot find the chitchat 0.13.0 source (dev-dependency) in Cargo's registry" >&2
  exit 1
fi

scratch="$root/target/chitchat-suite"
rm -rf "$scratch/tests" "$scratch/src"
mkdir -p "$scratch/tests" "$scratch/src"
: > "$scratch/src/lib.rs"
for f in cluster_test.rs perf_test.rs; do
  # The only edit a chitchat user makes: our ChitchatRef is a parking_lot mutex.
  sed -e 's/\.lock()\.await/.lock()/g' "$src_dir/tests/$f" > "$scratch/tests/$f"
done
cat > "$scratch/Cargo.toml" <<TOML
[package]
name = "chitchat-suite"
version = "0.0.0"
edition = "2024"
publish = false

[workspace]

[dev-dependencies]
chitchat = { package = "chitchat-uring", path = "$root", features = ["testsuite"] }
anyhow = "1"
itertools = "0.15"
rand = "0.10"
tokio = { version = "1", features = ["net", "sync", "rt-multi-thread", "macros", "test-util", "time"] }
tokio-stream = { version = "0.1", features = ["sync"] }
tracing = "0.1"
TOML
cp "$root/Cargo.lock" "$scratch/Cargo.lock"
cd "$scratch"
CARGO_TARGET_DIR="$scratch/target" cargo test --release "$@"
