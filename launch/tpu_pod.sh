#!/usr/bin/env bash
# Usage: launch/tpu_pod.sh TPU_NAME ZONE [trainer flags...]
#
# Runs the trainer on every host ("worker") of a Cloud TPU VM pod slice at once, one process per host using all
# of its chips. The trainer calls dlcore.parallel.initialize_distributed() with no flags and jax.distributed
# detects the pod. The repository must already be at $REMOTE_DIR (relative to the home directory) on every
# worker, with its dependencies installed, e.g.
#   gcloud compute tpus tpu-vm scp --recurse . TPU_NAME:~/dlcore --zone=ZONE --worker=all
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all \
#     --command='cd ~/dlcore && pip install -e . "jax[tpu]==0.10.2"'
#   launch/tpu_pod.sh my-v4-32 us-central2-b --workdir=gs://bucket/run1 --config=experiments/configs/resnet20.py \
#     --config.loop.batch_size=1024
# --workdir should be shared storage (e.g. gs://) so that checkpoints are visible from every host.
# Env: REMOTE_DIR (default: dlcore), PROJECT (gcloud project), PYTHON (default: python3), TRAINER (module).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,/^set /p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
fi
name=$1 zone=$2
shift 2
flags=""
(($#)) && printf -v flags ' %q' "$@"
remote="cd ${REMOTE_DIR:-dlcore} && PYTHONPATH=.\${PYTHONPATH:+:\$PYTHONPATH}"
remote+=" ${PYTHON:-python3} -m ${TRAINER:-experiments.train}${flags}"
exec gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" ${PROJECT:+--project="$PROJECT"} --worker=all \
  --command="$remote"
