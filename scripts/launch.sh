#!/usr/bin/env bash
# Start N processes of a data-parallel program on this machine with torchrun's environment
# (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), so that one
# machine runs what a cluster runs. With --nnodes and --node-rank, one call per machine starts
# that machine's share of a multi-machine job (ranks node_rank·N ... node_rank·N + N − 1).
#
#   scripts/launch.sh --nproc 2 -- build/examples/walkthrough --quick
#   scripts/launch.sh --nproc 4 --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 -- prog args
#
# When a process fails, the others are stopped (SIGTERM, then SIGKILL after --grace seconds)
# and the launcher exits with the first failure's status, as torchrun does. Output is the
# processes' own; rank 0 alone prints in fasterai's Learner.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/launch.sh --nproc N [options] -- PROGRAM [ARGS...]
  --nproc N          processes on this machine (required)
  --nnodes M         machines in the job (default 1)
  --node-rank K      this machine's index in [0, M) (default 0)
  --master-addr A    address of rank 0's machine (default 127.0.0.1)
  --master-port P    TCP port of rank 0's store (default 29500; 'auto': a port of this
                     machine nothing listens on, for single-machine jobs)
  --grace S          seconds between SIGTERM and SIGKILL when stopping (default 5)
EOF
}

nproc="" nnodes=1 node_rank=0 master_addr=127.0.0.1 master_port=29500 grace=5
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) nproc="${2:-}"; shift 2 ;;
    --nnodes) nnodes="${2:-}"; shift 2 ;;
    --node-rank) node_rank="${2:-}"; shift 2 ;;
    --master-addr) master_addr="${2:-}"; shift 2 ;;
    --master-port) master_port="${2:-}"; shift 2 ;;
    --grace) grace="${2:-}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "launch.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

is_count() { [[ "$1" =~ ^[0-9]+$ ]]; }
fail() { echo "launch.sh: $1" >&2; exit 2; }
is_count "$nproc" && (( nproc >= 1 )) || fail "--nproc '$nproc' is not allowed; expected a count >= 1"
is_count "$nnodes" && (( nnodes >= 1 )) || fail "--nnodes '$nnodes' is not allowed; expected a count >= 1"
is_count "$node_rank" && (( node_rank < nnodes )) ||
  fail "--node-rank '$node_rank' is not allowed; expected an index in [0, $nnodes)"
if [[ "$master_port" == auto ]]; then
  (( nnodes == 1 )) || fail "--master-port auto is for single-machine jobs; give the port to every machine"
  for _ in $(seq 100); do
    candidate=$(( 20000 + RANDOM % 40000 ))
    # A refused connection means nothing listens there.
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null; then master_port=$candidate; break; fi
  done
fi
is_count "$master_port" && (( master_port >= 1 && master_port <= 65535 )) ||
  fail "--master-port '$master_port' is not allowed; expected a TCP port in [1, 65535]"
is_count "$grace" || fail "--grace '$grace' is not allowed; expected whole seconds"
[[ $# -ge 1 ]] || fail "no program after '--'"

world_size=$(( nproc * nnodes ))
# As torchrun: several processes on one machine each get one intra-op thread unless told
# otherwise, instead of each starting a thread per core.
if [[ -z "${OMP_NUM_THREADS:-}" ]] && (( nproc > 1 )); then
  export OMP_NUM_THREADS=1
  echo "launch.sh: OMP_NUM_THREADS=1 for each of the $nproc processes (set it to choose)" >&2
fi
pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  local waited=0
  while (( waited < grace * 10 )); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || return 0
    sleep 0.1
    waited=$(( waited + 1 ))
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for (( local_rank = 0; local_rank < nproc; ++local_rank )); do
  MASTER_ADDR="$master_addr" MASTER_PORT="$master_port" WORLD_SIZE="$world_size" \
  RANK=$(( node_rank * nproc + local_rank )) LOCAL_RANK="$local_rank" LOCAL_WORLD_SIZE="$nproc" \
    "$@" &
  pids+=("$!")
done

# Wait for all; on the first failure stop the rest and report which rank failed. (Polling:
# `wait -n` cannot say which child ended before bash 5.1, and its -p is unreliable on a list.)
status=0
declare -A live
for i in "${!pids[@]}"; do live[${pids[$i]}]=$i; done
while (( ${#live[@]} > 0 )); do
  for pid in "${!live[@]}"; do
    kill -0 "$pid" 2>/dev/null && continue
    set +e
    wait "$pid"
    code=$?
    set -e
    i=${live[$pid]}
    unset "live[$pid]"
    if (( code != 0 && status == 0 )); then
      status=$code
      echo "launch.sh: rank $(( node_rank * nproc + i )) exited with status $code; stopping the others" >&2
      stop_all
    fi
  done
  (( ${#live[@]} > 0 )) && sleep 0.1
done
exit "$status"
