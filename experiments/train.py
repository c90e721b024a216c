r"""The general trainer: any dataset, model, loss, regulariser, optimiser and schedule, set by a config file.

  python -m experiments.train --workdir=runs/fmnist_mlp                      # experiments/configs/fashion_mnist_mlp.py
  python -m experiments.train --config=experiments/configs/resnet20.py --config.data.data_dir=DIR --workdir=runs/r20
  python -m experiments.train --config=runs/fmnist_mlp --workdir=runs/again  # repeat a run from its config.json
  python -m experiments.train --workdir=runs/fmnist_mlp --config.loop.epochs=10 --extend_schedule   # extend it

Config keys (groups data, model, loss, optimizer, schedule, loop, parallel, ensemble): experiments/configs/
schema.py; override any with --config.group.key=value. Writes config.json, metrics.jsonl, tensorboard/,
checkpoints/, curves.png and results.json to --workdir (--config.loop.diagnostics=True adds per-layer norms,
update/weight ratios and dead or saturated units to the logs, and diagnostics.png). The same command again resumes from the latest
checkpoint (or, for a finished run, prints its results); SIGTERM or Ctrl-C stops after the current step with a
checkpoint and exit code 75. Besides --config and --workdir, the only flags are actions on the workdir
(--overwrite, --extend_schedule) and the multi-host launch (--coordinator_address, --num_processes,
--process_id): none of them changes what a run computes, so none belongs in its config; --init_from=WORKDIR is
shorthand for --config.transfer.init_from=WORKDIR (recorded in config.json like any key).

Transfer learning: --init_from=WORKDIR starts from the last checkpoint of that finished run (params and
BatchNorm statistics, not the optimiser state); transfer.reinit (default: the classifier) re-initialises layers,
transfer.freeze keeps layers fixed, transfer.lr_scale scales the learning rate of the other transferred layers:

  python -m experiments.train --workdir=runs/b --init_from=runs/a --config.transfer.freeze="('layer0',)"
"""

import json
import os
import sys

from absl import flags
import jax
from jax.experimental import multihost_utils
import numpy as np

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
flags.DEFINE_string("init_from", None, "Shorthand for --config.transfer.init_from: a finished run's workdir whose "
                    "last checkpoint seeds this run (the transfer.* keys say which layers are re-initialised, "
                    "frozen, or trained at a scaled learning rate).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (auto under SLURM/TPU).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def print_results(results: dict, workdir: str) -> None:
  rows = [["test accuracy", results["test_accuracy"]], ["test loss", results["test_loss"]],
          ["steps", results["steps"]], ["epochs", results["epochs"]],
          [f"best {results['eval_split']} accuracy", results["best_eval_accuracy"]],
          ["train images/s", results["train_images_per_sec"]], ["wall time (s)", results["wall_time_s"]]]
  print(common.format_table(["metric", "value"], rows))
  pictures = "curves.png" + (", diagnostics.png" if os.path.exists(os.path.join(workdir, "diagnostics.png")) else "")
  print(f"wrote {workdir}/results.json, metrics.jsonl, {pictures}")


def _check_workdir_name(workdir: str) -> None:
  if not workdir:
    raise ValueError("--workdir is empty; give the folder for the run's outputs")
  try:
    os.fsencode(workdir).decode("utf-8")
  except UnicodeDecodeError:
    raise ValueError(f"--workdir {workdir!r} is not valid UTF-8; orbax cannot write there") from None
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} exists and is not a folder")


_RESOURCE_ERRORS = ("No space left on device", "File too large", "Disk quota exceeded")


def _resource_cause(error: Exception) -> str | None:
  """The resource limit an error reports, if any (as an OSError, or inside TensorStore's message)."""
  text = f"{getattr(error, 'strerror', '') or ''} {error}"
  return next((cause for cause in _RESOURCE_ERRORS if cause in text), None)


def main(argv):
  del argv
  common.quiet_logs()
  config = CONFIG.value
  workdir = FLAGS.workdir
  try:
    if FLAGS.init_from is not None:
      if config.transfer.init_from not in (None, FLAGS.init_from):
        raise ValueError(f"--init_from={FLAGS.init_from} and --config.transfer.init_from="
                         f"{config.transfer.init_from} disagree; give one of them")
      config.transfer.init_from = FLAGS.init_from
    _check_workdir_name(workdir)
    train_lib.validate(config)
  except (ValueError, TypeError) as e:
    sys.exit(f"error: {e}")
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  lock = common.WorkdirLock(workdir)
  status, error = "train", None
  if jax.process_index() == 0:  # one process holds the lock and judges (or with --overwrite clears) the workdir
    try:
      lock.__enter__()
      status = train_lib.check_workdir(workdir, config, overwrite=FLAGS.overwrite,
                                       extend_schedule=FLAGS.extend_schedule)
    except (common.WorkdirBusy, ValueError) as e:
      lock.release(remove_workdir=lock.created)
      status, error = "error", e
  if jax.process_count() > 1:  # every process acts on process 0's verdict
    codes = ("train", "finished", "error")
    status = codes[int(multihost_utils.broadcast_one_to_all(np.int32(codes.index(status))))]
  if status == "error":
    sys.exit(f"error: {error}" if error is not None else 1)
  if status == "finished":
    lock.release()
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
      print(f"{workdir} holds a finished run with this config; nothing to do")
      print_results(results, workdir)
    return
  try:
    with loop.StopOnSignals() as stop:
      results = train_lib.train_and_evaluate(config, workdir, should_stop=stop.requested)
  except train_lib.Interrupted as e:
    lock.release()
    print(str(e), file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
  except (ValueError, OSError) as e:
    lock.release(remove_workdir=lock.created)
    cause = _resource_cause(e)
    if cause is None and isinstance(e, (ValueError, FileNotFoundError)):  # bad values the data reveals, no data
      sys.exit(f"error: {e}")
    if cause is None:
      raise
    # A full disk or a file-size limit (TensorStore reports them as ValueErrors): one line, with how to go on.
    # Exit at once: orbax's failed background writers would otherwise print tracebacks while Python shuts down.
    print(f"error: {cause} while writing to {workdir}; last good checkpoint: step "
          f"{train_lib.last_checkpoint(workdir)}; "
          "free space (or raise the limit) and re-run the same command to resume", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  lock.release()
  if jax.process_index() == 0:
    print_results(results, workdir)


def run():
  common.run_main(main, __name__)


if __name__ == "__main__":
  run()
