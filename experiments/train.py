r"""The general trainer: any dataset, model, loss, regulariser, optimiser and schedule, set by a config file.

  python -m experiments.train --workdir=runs/fmnist_mlp                      # experiments/configs/fashion_mnist_mlp.py
  python -m experiments.train --config=experiments/configs/resnet20.py --config.data.data_dir=DIR --workdir=runs/r20
  python -m experiments.train --config=runs/fmnist_mlp --workdir=runs/again  # repeat a run from its config.json
  python -m experiments.train --workdir=runs/fmnist_mlp --config.loop.epochs=10 --extend_schedule   # extend it

Config keys (groups data, model, loss, optimizer, schedule, loop, parallel, ensemble): experiments/configs/
schema.py; override any with --config.group.key=value. Writes config.json, metrics.jsonl, tensorboard/,
checkpoints/, curves.png and results.json to --workdir. The same command again resumes from the latest
checkpoint (or, for a finished run, prints its results); SIGTERM or Ctrl-C stops after the current step with a
checkpoint and exit code 75. Besides --config and --workdir, the only flags are actions on the workdir
(--overwrite, --extend_schedule) and the multi-host launch (--coordinator_address, --num_processes,
--process_id): none of them changes what a run computes, so none belongs in its config.
"""

import json
import os
import sys

from absl import flags
import jax
from jax.experimental import multihost_utils

from dlcore import loop, parallel
from . import common, config_lib, train_lib

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped on a signal after checkpointing; run again to resume

FLAGS = flags.FLAGS
CONFIG = config_lib.define_config_flag("train", "fashion_mnist_mlp.py")
flags.DEFINE_string("workdir", None, "Output and checkpoint folder.", required=True)
flags.DEFINE_bool("overwrite", False, "Discard a run with a different config in --workdir.")
flags.DEFINE_bool("extend_schedule", False, "When loop.steps or loop.epochs grows and the schedule depends on the "
                  "run's length (warmup_cosine, linear), continue with the new length's schedule from the current "
                  "step.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (auto under SLURM/TPU).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def print_results(results: dict, workdir: str) -> None:
  rows = [["test accuracy", results["test_accuracy"]], ["test loss", results["test_loss"]],
          ["steps", results["steps"]], ["epochs", results["epochs"]],
          [f"best {results['eval_split']} accuracy", results["best_eval_accuracy"]],
          ["train images/s", results["train_images_per_sec"]], ["wall time (s)", results["wall_time_s"]]]
  print(common.format_table(["metric", "value"], rows))
  print(f"wrote {workdir}/results.json, metrics.jsonl, curves.png")


def main(argv):
  del argv
  common.quiet_logs()
  config = CONFIG.value
  try:
    train_lib.validate(config)
  except ValueError as e:
    sys.exit(f"error: {e}")
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  workdir = FLAGS.workdir
  if jax.process_index() == 0:  # one process judges (and with --overwrite clears) the shared workdir
    try:
      status = train_lib.check_workdir(workdir, config, overwrite=FLAGS.overwrite,
                                       extend_schedule=FLAGS.extend_schedule)
    except ValueError as e:
      sys.exit(f"error: {e}")
    if status == "finished":
      with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
      print(f"{workdir} holds a finished run with this config; nothing to do")
      print_results(results, workdir)
      return
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("workdir checked")
  with loop.StopOnSignals() as stop:
    try:
      results = train_lib.train_and_evaluate(config, workdir, extend_schedule=FLAGS.extend_schedule,
                                             should_stop=stop.requested)
    except train_lib.Interrupted as e:
      print(str(e), file=sys.stderr)
      sys.exit(EXIT_INTERRUPTED)
    except (ValueError, FileNotFoundError) as e:  # bad values only the data reveals, missing data
      sys.exit(f"error: {e}")
  if jax.process_index() == 0:
    print_results(results, workdir)


def run():
  common.run_main(main, __name__)


if __name__ == "__main__":
  run()
