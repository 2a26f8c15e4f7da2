#!/usr/bin/env bash
# A real-network partition test of `chitchat-uring node`.
#
# Makes N network namespaces (3-5, default 4), each with one veth joined to a bridge that lives
# in a namespace of its own, with addresses in 10.77.0.0/24 configured *inside the namespaces
# only* (the host's namespace is never touched, nothing outside them is ever targeted). Runs one
# node per namespace, all seeded with the first, then:
#   before : every node sees every node alive;
#   during : the last node's link is taken down: the others see it dead and keep converging
#            (a key set on node 2 reaches the other connected nodes);
#   after  : the link is up again: every node sees every node alive and the key set during the
#            partition reaches the isolated node too.
# Every wait is bounded. Everything is cleaned up on exit (trap).
#
# Usage: scripts/netns-cluster.sh [--nodes N] [--bin PATH]
# Exit: 0 pass, 1 fail, 77 cannot run here (not root, no `ip`, netns creation refused).
set -euo pipefail

NODES=4
BIN="${CHITCHAT_URING_BIN:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --bin) BIN="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if ! [[ "$NODES" =~ ^[3-5]$ ]]; then
  echo "--nodes must be 3, 4 or 5" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "$BIN" ]; then
  for candidate in "$ROOT/target/release/chitchat-uring" "$ROOT/target/debug/chitchat-uring"; do
    if [ -x "$candidate" ]; then BIN="$candidate"; break; fi
  done
fi
if [ -z "$BIN" ] || [ ! -x "$BIN" ]; then
  echo "no chitchat-uring binary (build it, or pass --bin)" >&2
  exit 2
fi

skip() { echo "SKIP: $*"; exit 77; }
[ "$(id -u)" -eq 0 ] || skip "not running as root"
command -v ip >/dev/null 2>&1 || skip "the ip command is not available"
command -v python3 >/dev/null 2>&1 || skip "python3 is not available"

SUBNET=10.77.0
PORT=7000
TAG="ccu$$"
BR_NS="${TAG}-br"
WORK="$(mktemp -d)"
declare -a PIDS=()
declare -a FDS=()
declare -a NAMESPACES=()

cleanup() {
  set +e
  for fd in "${FDS[@]}"; do exec {fd}>&- 2>/dev/null; done
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for _ in $(seq 50); do
    alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" -eq 0 ] && break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null; done
  for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

ns_of() { echo "${TAG}-n$1"; }

# --- Network -----------------------------------------------------------------------------------
ip netns add "$BR_NS" 2>/dev/null || skip "cannot create a network namespace here"
NAMESPACES+=("$BR_NS")
ip -n "$BR_NS" link add br0 type bridge || skip "cannot create a bridge in a namespace"
ip -n "$BR_NS" link set br0 up
for i in $(seq 1 "$NODES"); do
  ns="$(ns_of "$i")"
  ip netns add "$ns"
  NAMESPACES+=("$ns")
  # The pair is created inside the bridge's namespace and its peer moved straight into the
  # node's: no interface ever exists in the host's namespace.
  ip -n "$BR_NS" link add "v$i" type veth peer name eth0 netns "$ns"
  ip -n "$BR_NS" link set "v$i" master br0 up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
  ip -n "$ns" link set eth0 up
done

# --- Nodes -------------------------------------------------------------------------------------
for i in $(seq 1 "$NODES"); do
  fifo="$WORK/n$i.in"
  mkfifo "$fifo"
  exec {fd}<>"$fifo"
  FDS+=("$fd")
  ip netns exec "$(ns_of "$i")" "$BIN" node \
    --listen "$SUBNET.$i:$PORT" --id "n$i" --generation 1 --cluster netns \
    --seed "$SUBNET.1:$PORT" --gossip-ms 100 --status-every-ms 200 --dead-grace-secs 600 \
    --for-secs 300 \
    <"$fifo" >"$WORK/n$i.jsonl" 2>"$WORK/n$i.log" &
  PIDS+=("$!")
done

send() { # send NODE COMMAND...
  local fd="${FDS[$(($1 - 1))]}"
  shift
  echo "$*" >&"$fd"
}

# check MODE ARGS: reads every node's latest status line; exit 0 if the condition holds.
check() {
  python3 - "$WORK" "$NODES" "$@" <<'PY'
import json, sys
work, n, mode, args = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]

def last_status(i):
    try:
        lines = open(f"{work}/n{i}.jsonl").read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None

def ids(status, field):
    return {node["node_id"] for node in status[field]}

def value(status, owner, key):
    for state in status["cluster_state"]["node_states"]:
        if state["chitchat_id"]["node_id"] == owner:
            kv = state["key_values"].get(key)
            return kv and kv["status"] == "Set" and kv["value"]
    return None

everyone = {f"n{i}" for i in range(1, n + 1)}
statuses = {i: last_status(i) for i in range(1, n + 1)}
if any(s is None for s in statuses.values()):
    sys.exit(1)
if mode == "all-live":            # every node sees every node alive
    ok = all(ids(s, "live_nodes") == everyone for s in statuses.values())
elif mode == "isolated":          # args: k — the others see nk dead and each other alive
    k = int(args[0])
    ok = all(ids(s, "live_nodes") == everyone - {f"n{k}"} and f"n{k}" in ids(s, "dead_nodes")
             for i, s in statuses.items() if i != k)
elif mode == "has-key":           # args: owner key value [except-node]
    owner, key, val = args[0], args[1], args[2]
    skip_node = int(args[3]) if len(args) > 3 else None
    ok = all(value(s, owner, key) == val for i, s in statuses.items() if i != skip_node)
else:
    sys.exit(2)
sys.exit(0 if ok else 1)
PY
}

# wait_for SECONDS DESCRIPTION CHECK-ARGS...: bounded poll.
wait_for() {
  local limit="$1" what="$2"
  shift 2
  local start=$SECONDS
  while [ $((SECONDS - start)) -lt "$limit" ]; do
    for pid in "${PIDS[@]}"; do
      if ! kill -0 "$pid" 2>/dev/null; then
        echo "FAIL: a node exited early while waiting for: $what" >&2
        tail -n 5 "$WORK"/n*.log >&2
        exit 1
      fi
    done
    if check "$@"; then
      echo "ok ($((SECONDS - start)) s): $what"
      return 0
    fi
    sleep 0.5
  done
  echo "FAIL: not within ${limit} s: $what" >&2
  for i in $(seq 1 "$NODES"); do
    echo "--- n$i (last status, log tail)" >&2
    tail -n 1 "$WORK/n$i.jsonl" | cut -c1-600 >&2
    tail -n 3 "$WORK/n$i.log" >&2
  done
  exit 1
}

echo "netns cluster: $NODES nodes on $SUBNET.0/24 (namespaces ${TAG}-*), binary $BIN"
wait_for 40 "before: every node sees all $NODES nodes alive" all-live

ISOLATED="$NODES"
ip -n "$BR_NS" link set "v$ISOLATED" down
echo "link of n$ISOLATED down"
wait_for 60 "during: the others see n$ISOLATED dead and each other alive" isolated "$ISOLATED"
send 2 set partition-key set-during-partition
wait_for 30 "during: a key set on n2 reaches every connected node" \
  has-key n2 partition-key set-during-partition "$ISOLATED"

ip -n "$BR_NS" link set "v$ISOLATED" up
echo "link of n$ISOLATED up"
wait_for 60 "after: every node sees all $NODES nodes alive again" all-live
wait_for 30 "after: the key set during the partition reached n$ISOLATED" \
  has-key n2 partition-key set-during-partition

for i in $(seq 1 "$NODES"); do send "$i" quit; done
for pid in "${PIDS[@]}"; do
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
done
echo "PASS"
