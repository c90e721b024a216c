#!/usr/bin/env bash
# Usage: launch/multiprocess_local.sh NUM_PROCESSES DEVICES_PER_PROCESS [trainer flags...]
#
# A multi-host run in miniature, for testing: NUM_PROCESSES trainer processes on this machine, each with
# DEVICES_PER_PROCESS CPU devices (JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=...),
# joined by jax.distributed over 127.0.0.1. Process i gets
#   --coordinator_address=127.0.0.1:$PORT --num_processes=NUM_PROCESSES --process_id=i
# plus the trainer flags, and its output is prefixed with "[i] ". Waits for all of them; if one fails, the others
# are stopped and the script exits with the failed process's status (0 when every process succeeds).
#   launch/multiprocess_local.sh 2 4 --workdir=/tmp/mp --config.data.dataset=synthetic --config.loop.batch_size=64 \
#     --config.loop.steps=100
# Env: PORT (coordinator port; default: a free one), PYTHON (default: python), TRAINER (module to run, default:
# experiments.train).
set -uo pipefail
usage() { sed -n '2,/^set /p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 2 && $1 =~ ^[1-9][0-9]*$ && $2 =~ ^[1-9][0-9]*$ ]] || usage
num_processes=$1 devices=$2
shift 2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
PORT="${PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}" JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${devices}${XLA_FLAGS:+ ${XLA_FLAGS}}"

pids=()
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; }
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < num_processes; i++)); do
  "$PY" -m "${TRAINER:-experiments.train}" --coordinator_address="127.0.0.1:${PORT}" \
    --num_processes="${num_processes}" --process_id="${i}" "$@" > >(sed -u "s/^/[${i}] /") 2>&1 &
  pids+=($!)
done

status=0
running=("${pids[@]}")
while ((${#running[@]})); do
  still=()
  for i in "${!pids[@]}"; do
    p=${pids[$i]}
    [[ " ${running[*]} " == *" ${p} "* ]] || continue
    if kill -0 "$p" 2>/dev/null; then
      still+=("$p")
    else
      wait "$p"
      rc=$?
      if ((rc != 0 && status == 0)); then
        status=$rc
        echo "multiprocess_local.sh: process ${i} exited with status ${rc}; stopping the others" >&2
        stop_all
      fi
    fi
  done
  running=("${still[@]}")
  ((${#running[@]})) && sleep 0.2
done
wait  # let the output prefixers drain
exit "$status"
