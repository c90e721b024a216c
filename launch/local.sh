#!/usr/bin/env bash
# Usage: launch/local.sh [trainer flags...]
#
# One process on this machine, data-parallel over every local device (all GPUs, the TPU chips of one host, or
# the CPU). Runs `python -m experiments.train "$@"`; add --config.parallel.num_devices=K to use only
# the first K devices.
#   launch/local.sh --workdir=/tmp/run --config=experiments/configs/resnet20.py --config.loop.batch_size=256
# Env: PYTHON (default: python), TRAINER (module to run, default: experiments.train).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python}" -m "${TRAINER:-experiments.train}" "$@"
