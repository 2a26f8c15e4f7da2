#!/usr/bin/env bash
# Criterion's message-handling bench of two revisions, side by side in one run:
#
#   scripts/compare-revisions.sh OLD [NEW] [--rounds R] [--filter REGEX]
#
# OLD and NEW are git revisions (NEW defaults to the working tree). Each is checked out under
# target/revisions/src-REV, its `message_handling` bench binary is built, and then the two
# binaries run alternately R times (default 3) on the same benchmark filter (default: every
# `handle_datagram` case), so both see the same machine. Prints, per benchmark, the range of
# criterion's point estimates over the rounds for each revision and the range of OLD ÷ NEW.
# Run it alone on the machine: the two binaries share its cores with nothing else.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
old="" new=WORKTREE rounds=3 filter='^handle_datagram/'
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --filter) filter="$2"; shift 2 ;;
    -*) echo "compare-revisions.sh: unknown option $1" >&2; exit 2 ;;
    *) if [ -z "$old" ]; then old="$1"; else new="$1"; fi; shift ;;
  esac
done
[ -n "$old" ] || { echo "usage: scripts/compare-revisions.sh OLD [NEW] [--rounds R] [--filter REGEX]" >&2; exit 2; }
out="$root/target/revisions"; mkdir -p "$out"

checkout() { # rev -> source directory
  if [ "$1" = WORKTREE ]; then echo "$root"; return; fi
  local name dir
  name="$(git -C "$root" rev-parse --short "$1")"; dir="$out/src-$name"
  [ -d "$dir" ] || git -C "$root" worktree add -q --detach "$dir" "$1" >&2
  echo "$dir"
}
build() { # source directory -> bench binary
  (cd "$1" && cargo bench -p chitchat-uring-tools --bench message_handling --no-run \
      --message-format=json 2>/dev/null) |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "message_handling" and m.get("executable"):
        print(m["executable"])' | tail -1
}
label() { if [ "$1" = WORKTREE ]; then echo worktree; else git -C "$root" rev-parse --short "$1"; fi; }

old_bin="$(build "$(checkout "$old")")"; new_bin="$(build "$(checkout "$new")")"
[ -x "$old_bin" ] && [ -x "$new_bin" ] || { echo "compare-revisions.sh: a build failed" >&2; exit 1; }
old_name="$(label "$old")"; new_name="$(label "$new")"
log="$out/compare-$old_name-$new_name.log"; : > "$log"
echo "old $old_name: $old_bin" >&2; echo "new $new_name: $new_bin" >&2
for r in $(seq 1 "$rounds"); do
  for side in old new; do
    bin="${side}_bin"; echo "round $r: $side" >&2
    echo "### $side $r" >> "$log"
    # Each revision's own criterion directory, so one never compares against the other's files.
    CRITERION_HOME="$out/criterion-$side" "${!bin}" --bench --noplot "$filter" >> "$log" 2>&1
  done
done
python3 - "$log" "$old_name" "$new_name" <<'PY'
import re, sys
log, old_name, new_name = sys.argv[1:]
unit = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
runs = {}  # (side, bench) -> [seconds]
side, bench = None, None
for line in open(log, encoding="utf-8"):
    m = re.match(r"### (old|new) \d+", line)
    if m:
        side = m.group(1); continue
    m = re.match(r"^(\S+/\S+)\s*(time:.*)?$", line.rstrip())
    if m and not line.startswith(" "):
        bench = m.group(1)
        line = m.group(2) or ""
    m = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
    if m and bench:
        runs.setdefault((side, bench), []).append(float(m.group(1)) * unit[m.group(2)])
def fmt(s):
    for u, f in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= f: return f"{s / f:.1f} {u}"
    return f"{s / 1e-9:.0f} ns"
benches = sorted({b for (_, b) in runs})
print(f"| benchmark | {old_name} | {new_name} | {old_name} ÷ {new_name} |")
print("|---|---|---|---|")
for b in benches:
    o, n = runs.get(("old", b), []), runs.get(("new", b), [])
    if not o or not n:
        continue
    lo, hi = min(o) / max(n), max(o) / min(n)
    print(f"| {b} | {fmt(min(o))}–{fmt(max(o))} | {fmt(min(n))}–{fmt(max(n))} | {lo:.2f}–{hi:.2f}× |")
PY
