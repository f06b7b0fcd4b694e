#!/usr/bin/env bash
# N JAX processes on this machine, on CPU: try the multi-host code path without a cluster.
#
# Usage:
#   launch/local.sh N CONFIG WORKDIR [extra vqlc.main flags...]
# Example (2 processes x 2 virtual CPU devices = one 4-device mesh):
#   launch/local.sh 2 vqlc/configs/default.py:tiny runs/local2 --config.train.num_steps=20
#
# Each process gets XLA_FLAGS=--xla_force_host_platform_device_count=$VQLC_LOCAL_DEVICES
# (default 2) and VQLC_COORDINATOR_ADDRESS / VQLC_NUM_PROCESSES / VQLC_PROCESS_ID for a
# coordinator on a free localhost port (vqlc/distributed.py passes them to
# jax.distributed.initialize; CPU collectives go through gloo). Output lines are prefixed with
# "[pI] ". The script waits for all processes; when one fails, it stops the others and exits
# with that process's status. Environment: VQLC_LOCAL_DEVICES (devices per process),
# VQLC_COORDINATOR_PORT (default: a free port), PYTHON (default: python).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
num_processes=$1
config=$2
workdir=$3
shift 3
if ! [[ $num_processes =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: N must be a positive integer, got '$num_processes'" >&2
  exit 2
fi
devices=${VQLC_LOCAL_DEVICES:-2}
python=${PYTHON:-python}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

port=${VQLC_COORDINATOR_PORT:-}
if [[ -z $port ]]; then
  # Ask the kernel for a free port; the coordinator (process 0) binds it a moment later.
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

# Job control: each process (with its output prefixer and any data-loader workers) gets a
# process group of its own, so stopping it stops all of them.
set -m
declare -A index_of=()  # pid (= process group id) -> process index
cleanup() {
  # SIGTERM first (the trainer saves and stops on it), SIGKILL after a grace period: a process
  # whose peer died can block in a collective that never completes.
  local pid t alive grace=${VQLC_KILL_GRACE:-10}
  for pid in "${!index_of[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  for ((t = 0; t < grace * 10; t++)); do
    alive=0
    for pid in "${!index_of[@]}"; do
      if kill -0 -- "-$pid" 2>/dev/null; then alive=1; fi
    done
    ((alive)) || return 0
    sleep 0.1
  done
  for pid in "${!index_of[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
}
trap 'cleanup; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  (
    # Replace (not add to) any device count inherited from the caller's XLA_FLAGS.
    flags=$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<<"${XLA_FLAGS:-}")
    export XLA_FLAGS="$flags --xla_force_host_platform_device_count=$devices"
    export JAX_PLATFORMS=cpu
    export VQLC_COORDINATOR_ADDRESS="localhost:$port"
    export VQLC_NUM_PROCESSES=$num_processes
    export VQLC_PROCESS_ID=$i
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1  # whole lines reach the prefixing sed as they are printed
    # exec: the subshell becomes python, so its pid is the one waited for and stopped.
    exec "$python" -m vqlc.main --config="$config" --workdir="$workdir" "$@" \
      > >(sed -u "s/^/[p$i] /") 2>&1
  ) &
  index_of[$!]=$i
done

# Reap processes as they finish; the first failure stops the rest.
while ((${#index_of[@]} > 0)); do
  finished=""
  status=0
  wait -n -p finished "${!index_of[@]}" || status=$?
  if [[ -z $finished ]]; then  # nothing left to wait for
    break
  fi
  i=${index_of[$finished]}
  unset "index_of[$finished]"
  if ((status != 0)); then
    echo "local.sh: process $i exited with status $status; stopping the others" >&2
    cleanup
    wait || true
    exit "$status"
  fi
done
wait || true  # the output prefixers
echo "local.sh: all $num_processes processes finished" >&2
