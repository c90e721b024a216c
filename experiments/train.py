r"""The general trainer: any dataset, model, loss, regulariser, optimiser and schedule, chosen by flags.

  python -m experiments.train --dataset=fashion_mnist --model=mlp --epochs=5 --workdir=runs/fmnist_mlp
  python -m experiments.train --flagfile=my_run.flags --learning_rate=0.1   # a config file, then overrides

Writes config.json, metrics.jsonl, tensorboard/, checkpoints/, curves.png and results.json to --workdir.
Running the same command again resumes from the latest checkpoint; a different config in the same workdir is
refused unless --overwrite. Multi-device and multi-host: see README "Scaling out".
"""

from absl import flags
import jax
from jax.experimental import multihost_utils

from dlcore import activations, data, initializers, layers, losses, models, optim, parallel
from . import common, train_lib

D = train_lib.DEFAULTS
FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", D["dataset"], data.NAMES, "Dataset.")
flags.DEFINE_string("data_dir", D["data_dir"], "Folder with the dataset's standard files (else well-known "
                    "places, then TFDS).")
flags.DEFINE_bool("download", D["download"], "Let TFDS download and prepare the dataset when no local copy is "
                  "found (needs internet and TensorFlow).")
flags.DEFINE_integer("validation_size", D["validation_size"], "Examples held out of train for validation "
                     "(-1: the dataset's default; 0: evaluate on test).")
flags.DEFINE_enum("preprocess", D["preprocess"], data.preprocess.METHODS, "Preprocessing fitted on train.")
flags.DEFINE_string("augment", D["augment"], f"Comma-separated augmentations from {data.augment.NAMES}.")
flags.DEFINE_enum("model", D["model"], models.NAMES, "Model.")
flags.DEFINE_list("hidden", [str(h) for h in D["hidden"]], "MLP hidden widths.")
flags.DEFINE_enum("activation", D["activation"], activations.NAMES, "Activation.")
flags.DEFINE_enum("init", D["init"], initializers.NAMES, "Weight initialiser.")
flags.DEFINE_float("init_scale", D["init_scale"], "std for init=normal; gain for fan-based schemes.")
flags.DEFINE_enum("batchnorm", D["batchnorm"], layers.BATCHNORM_PLACES, "BatchNorm relative to each hidden "
                  "unit's nonlinearity (unset: the model's default, 'before' for ResNets, else 'none').")
flags.DEFINE_float("bn_momentum", D["bn_momentum"], "BatchNorm running-average momentum.")
flags.DEFINE_enum("bn_running_var", D["bn_running_var"], layers.RUNNING_VARS, "Batch variance the running "
                  "average keeps: biased (flax) or unbiased (Ioffe & Szegedy Alg. 2, PyTorch).")
flags.DEFINE_float("keep_prob", D["keep_prob"], "Dropout keep probability p (1: no dropout); where each model "
                   "drops: `dlcore.models`.")
flags.DEFINE_enum("dropout_mode", D["dropout_mode"], layers.DROPOUT_MODES, "Dropout form (needs keep_prob < 1).")
flags.DEFINE_enum("shortcut", D["shortcut"], models.SHORTCUTS, "ResNet shortcut: projection (He et al. option "
                  "B) or zero_pad (option A).")
flags.DEFINE_enum("loss", D["loss"], losses.LOSSES, "Data loss.")
flags.DEFINE_float("label_smoothing", D["label_smoothing"], "Label smoothing for cross_entropy.")
flags.DEFINE_float("hinge_delta", D["hinge_delta"], "Margin for the hinge loss.")
flags.DEFINE_enum("penalty", D["penalty"], losses.PENALTIES, "Weight penalty added to the loss.")
flags.DEFINE_float("penalty_strength", D["penalty_strength"], "Penalty strength (lambda).")
flags.DEFINE_float("l1_ratio", D["l1_ratio"], "Elastic-net mixing (1: L1, 0: L2).")
flags.DEFINE_enum("optimizer", D["optimizer"], optim.OPTIMIZERS, "Optimiser.")
flags.DEFINE_float("learning_rate", D["learning_rate"], "Base learning rate.")
flags.DEFINE_float("momentum", D["momentum"], "Momentum mu (or beta for momentum_ema).")
flags.DEFINE_float("weight_decay", D["weight_decay"], "Weight decay on weights only.")
flags.DEFINE_enum("weight_decay_mode", D["weight_decay_mode"], optim.WEIGHT_DECAY_MODES,
                  "decoupled (AdamW-style) or l2 (added to the gradient).")
flags.DEFINE_float("clip_norm", D["clip_norm"], "Global-norm gradient clipping (unset: none).")
flags.DEFINE_enum("schedule", D["schedule"], optim.SCHEDULES, "Learning-rate schedule.")
flags.DEFINE_list("schedule_params", [], "key=value pairs, e.g. step_size=1000,gamma=0.1 or "
                  "boundaries=1000;2000 (lists with ';').")
flags.DEFINE_integer("batch_size", D["batch_size"], "Global batch size.")
flags.DEFINE_float("epochs", D["epochs"], "Training length in epochs (unless --steps).")
flags.DEFINE_integer("steps", D["steps"], "Training length in steps (overrides --epochs when > 0).")
flags.DEFINE_integer("eval_every", D["eval_every"], "Evaluate every N steps (0: once per epoch).")
flags.DEFINE_integer("log_every", D["log_every"], "Log training metrics every N steps.")
flags.DEFINE_integer("checkpoint_every", D["checkpoint_every"], "Checkpoint every N steps (0: at evals and end).")
flags.DEFINE_integer("keep_checkpoints", D["keep_checkpoints"], "Checkpoints kept besides the best.")
flags.DEFINE_integer("patience", D["patience"], "Early stopping after N evals without improvement (0: off).")
flags.DEFINE_integer("seed", D["seed"], "Seed for init, data order, dropout and augmentation.")
flags.DEFINE_bool("snapshot_ensemble", D["snapshot_ensemble"], "Ensemble the SGDR cycle-end snapshots.")
flags.DEFINE_list("ensemble", D["ensemble"], "Workdirs of finished runs to ensemble with this one.")
flags.DEFINE_string("workdir", None, "Output and checkpoint folder.", required=True)
flags.DEFINE_bool("overwrite", False, "Discard a run with a different config in --workdir.")
flags.DEFINE_integer("num_devices", D["num_devices"], "Use only the first N local devices (unset: all).")
flags.DEFINE_enum("bn_stats", D["bn_stats"], parallel.BN_STATS, "BatchNorm statistics over the global batch "
                  "or per device.")
flags.DEFINE_enum("dtype", D["dtype"], list(models.DTYPES), "Compute dtype: bfloat16 = mixed precision "
                  "(bf16 matmuls and convolutions; float32 params, optimiser state, BatchNorm statistics and loss).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (auto under SLURM/TPU).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def parse_schedule_params(items: list[str]) -> dict:
  """['step_size=1000', 'boundaries=10;20'] -> {'step_size': 1000, 'boundaries': [10, 20]}."""
  def number(text):
    try:
      return int(text)
    except ValueError:
      try:
        return float(text)
      except ValueError:
        raise ValueError(f"--schedule_params value {text!r} is not a number") from None
  params = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--schedule_params entry {item!r} must be key=value")
    params[key.strip()] = [number(v) for v in value.split(";")] if ";" in value else number(value)
  return params


def config_from_flags() -> dict:
  config = {key: FLAGS[key].value for key in train_lib.DEFAULTS if key in FLAGS}
  config["hidden"] = [int(h) for h in FLAGS.hidden]
  config["schedule_params"] = parse_schedule_params(FLAGS.schedule_params)
  return config


def main(argv):
  del argv
  common.quiet_logs()
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  config = config_from_flags()
  if jax.process_index() == 0:  # one process judges (and with --overwrite clears) the shared workdir
    train_lib.check_workdir(FLAGS.workdir, config, FLAGS.overwrite)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("workdir checked")
  results = train_lib.train_and_evaluate(config, FLAGS.workdir)
  if jax.process_index() != 0:
    return
  rows = [["test accuracy", results["test_accuracy"]], ["test loss", results["test_loss"]],
          ["steps", results["steps"]], ["epochs", results["epochs"]],
          [f"best {results['eval_split']} accuracy", results["best_eval_accuracy"]],
          ["train images/s", results["train_images_per_sec"]], ["wall time (s)", results["wall_time_s"]]]
  print(common.format_table(["metric", "value"], rows))
  print(f"wrote {FLAGS.workdir}/results.json, metrics.jsonl, curves.png")


def run():
  common.run_main(main, __name__)


if __name__ == "__main__":
  run()
