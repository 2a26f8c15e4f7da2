#!/usr/bin/env bash
# Side-by-side benchmark: chitchat-uring (io_uring, epoll) against chitchat 0.13, release build.
#
# Usage: scripts/bench.sh [--quick] [--sizes 10,50,100,200] [--steady-secs S] [--load-secs S] [--out DIR]
#   --quick   clusters of 10 and 50 nodes, short windows (about 1 minute instead of about 4)
#   --from-json FILE   redraw the table and plot from a saved side_by_side.json, measure nothing
# Writes target/bench-report/side_by_side.{md,json,svg} and prints the markdown.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="$PWD/target/bench-report"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  if [ "${args[$i]}" = "--out" ] && [ $((i + 1)) -lt ${#args[@]} ]; then OUT="${args[$((i + 1))]}"; fi
done
mkdir -p "$OUT"
start=$SECONDS
cargo bench -p chitchat-uring-tools --bench side_by_side -- "$@" --out "$OUT"
echo
echo "report ($((SECONDS - start)) s): $OUT/side_by_side.md, $OUT/side_by_side.svg, $OUT/side_by_side.json"
