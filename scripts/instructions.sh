#!/usr/bin/env bash
# Instructions per handled datagram, counted by callgrind: repeatable whatever else the machine
# is doing, so two versions can be compared on a shared 2-core machine where timings are noise.
#
#   scripts/instructions.sh [REV ...]     (default: HEAD and the working tree)
#
# For each revision the library is checked out under target/instructions/REV, a small harness
# (scripts/instructions/main.rs: a node holding 1,000 remote states of 10 keys) is built against
# it, and `handle_datagram` is counted for an up-to-date Syn, an empty-digest Syn and an Ack: the
# instructions of 200 datagrams minus those of the set-up alone, divided by 200.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
command -v valgrind >/dev/null || { echo "instructions.sh: valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
revs=("$@"); [ ${#revs[@]} -gt 0 ] || revs=(HEAD WORKTREE)
out="$root/target/instructions"; mkdir -p "$out"
count() { # binary case n -> instructions
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$1" "$2" "$3" 2>&1 |
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
printf '%-12s %22s %22s %22s\n' revision "up-to-date Syn" "empty-digest Syn" "Ack (one key)"
for rev in "${revs[@]}"; do
  if [ "$rev" = WORKTREE ]; then lib="$root"; name=worktree
  else
    name="$(git -C "$root" rev-parse --short "$rev")"; lib="$out/src-$name"
    [ -d "$lib" ] || git -C "$root" worktree add -q --detach "$lib" "$rev"
  fi
  h="$out/harness-$name"; mkdir -p "$h/src"
  cp "$root/scripts/instructions/main.rs" "$h/src/main.rs"
  cat > "$h/Cargo.toml" <<TOML
[package]
name = "instructions"
version = "0.0.0"
edition = "2024"
publish = false
[workspace]
[dependencies]
chitchat_uring = { package = "chitchat-uring", path = "$lib" }
tokio = { version = "1", features = ["sync"] }
[profile.release]
debug = 1
TOML
  cp "$lib/Cargo.lock" "$h/Cargo.lock"
  (cd "$h" && CARGO_TARGET_DIR="$h/target" cargo build --release -q)
  bin="$h/target/release/instructions"
  row=()
  for case in up empty ack; do
    base=$(count "$bin" "$case" 0); full=$(count "$bin" "$case" 200)
    row+=("$(( (full - base) / 200 ))")
  done
  printf '%-12s %22s %22s %22s\n' "$name" "${row[0]} instr" "${row[1]} instr" "${row[2]} instr"
done
