#!/usr/bin/env bash
# Side-by-side benchmark: chitchat-uring (io_uring, epoll) against chitchat 0.13, release build.
#
# Usage: scripts/bench.sh [--quick] [--large] [--one-host] [--cases LIST] [--impls LIST] [options]
#   (default)  cases load,clusters: one node under Syn load, clusters of 10/50/100/200 (about 4 min)
#   --quick    clusters of 10 and 50 nodes, short windows (about 1 minute)
#   --large    adds 500 nodes at 100 ms gossip and 1,000 nodes at 1 s, one process each: convergence
#              (or "did not converge in N s"), msgs/s per node, datagram loss, RSS, CPU per node,
#              shutdown time. Bounded: convergence wait --large-timeout-secs (120), steady window
#              --large-steady-secs (10), shutdown --shutdown-limit-secs (60); about 15 min.
#   --one-host adds one real node among simulated peers of a 1,000- and 5,000-node cluster, V0 and
#              V1, 1 s gossip: the node's CPU and bytes per second (about 12 min).
#   --cases LIST         any of load,clusters,large,one-host,all (replaces the default set)
#   --impls LIST         any of ours-uring,ours-epoll,chitchat (default: all three)
#   --sizes 10,50,100,200 --steady-secs S --load-secs S
#   --large-clusters 500@100,1000@1000   nodes@gossip-interval-ms
#   --host-sizes 1000,5000 --host-protocols v0,v1 --host-interval-ms 1000 --host-secs 20
#   --host-seed-timeout-secs 120
#   --out DIR            where the report goes (default target/bench-report)
#   --from-json FILE     redraw the table and plot from a saved side_by_side.json, measure nothing
# Examples: scripts/bench.sh --cases large --large-clusters 50@100,50@1000 --large-timeout-secs 30
#           scripts/bench.sh --cases one-host --host-sizes 200 --host-interval-ms 100 --host-secs 3
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
