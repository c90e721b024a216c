r"""Transfer learning: how much do features learned on some classes help to learn other classes from few examples?

Stage 1 trains the model on study.source_classes (all their training examples, study.source_epochs epochs).
Stage 2 trains on study.target_classes (relabelled 0..k-1) with each of study.target_sizes training examples per
class (a seeded, balanced subset; 0 = all of them), by each of study.methods:

  scratch    a fresh initialisation, every layer at the full learning rate;
  finetune   stage 1's weights (and BatchNorm statistics) with a new classifier: the classifier at the full
             learning rate, every other layer at transfer.lr_scale times it;
  frozen     stage 1's features, frozen: only the new classifier trains (a linear classifier on fixed features).

The rule for stage 2, the same for every method and size: study.target_steps steps of loop.batch_size examples
(so a small training set is seen for more epochs), the trainer's schedule (warmup_cosine) over those steps, an
evaluation on the validation split of the target classes every tenth of the run, and the test accuracy on the
test set of the target classes at the end. Every run is a trainer run (`experiments.train`) in
runs/<name>/ of --workdir, so the command again reuses finished runs and resumes unfinished ones.

  python -m experiments.transfer --config.data.data_dir=DIR --workdir=runs/transfer
  python -m experiments.transfer --config.data.data_dir=DIR --config.study.target_sizes="(30, 100, 1000, 0)" \
      --config.loop.batch_size=64 --config.transfer.lr_scale=1.0 --workdir=runs/transfer_more

Config: experiments/configs/transfer.py (keys: configs/schema.py); override with --config.group.key=value.

Writes to --workdir: config.json, results.json, results.csv (one row per method and size), accuracy.png (test
accuracy against examples per class, log x, one line per method) and runs/source/ and runs/<method>_<size>/
(each a trainer workdir: config.json, metrics.jsonl, checkpoints/, curves.png, results.json). A different config
is refused unless --overwrite (which discards every run in --workdir).
"""

import json
import os
import sys
import time

from absl import flags

from dlcore import data, loop
from . import common, config_lib, train_lib
from .configs import schema

__all__ = ["BINARY", "EVALS_PER_RUN", "METHODS", "RESUMABLE_KEYS", "plot_accuracy", "run_study",
           "source_config", "target_config", "validate"]

BINARY = "transfer"
METHODS = ("scratch", "finetune", "frozen")
EVALS_PER_RUN = 10  # evaluations on the validation split per stage-2 run
# Keys that may differ when the study is run again: they change where or how often, not what is computed.
RESUMABLE_KEYS = ("data.data_dir", "data.download", "data.resident", "loop.log_every", "loop.steps_per_call")
FLAGS = flags.FLAGS


def _trainer_config(config):
  """The trainer's config with this study's data, model, optimiser, loop keys and seed."""
  tc = schema.train()
  tc.seed = config.seed
  for group in ("data", "model", "optimizer", "loop"):
    tc[group].update(config[group].to_dict())
  return tc


def source_config(config):
  """Stage 1's trainer config: study.source_classes, all their examples, study.source_epochs epochs."""
  tc = _trainer_config(config)
  tc.data.classes = tuple(config.study.source_classes)
  tc.loop.update(epochs=float(config.study.source_epochs), steps=0)
  return tc


def _layers(config) -> tuple[str, ...]:
  return train_lib.layer_names(_trainer_config(config))


def target_config(config, method: str, size: int, source_dir: str | None):
  """Stage 2's trainer config of `method` with `size` examples per target class (0: all), from `source_dir`
  (stage 1's workdir; unused for scratch)."""
  tc = _trainer_config(config)
  tc.data.classes, tc.data.per_class = tuple(config.study.target_classes), int(size)
  steps = int(config.study.target_steps)
  tc.loop.update(steps=steps, eval_every=max(1, steps // EVALS_PER_RUN))
  if method != "scratch":
    tc.transfer.init_from = source_dir
  if method == "finetune":
    tc.transfer.lr_scale = float(config.transfer.lr_scale)
  if method == "frozen":
    tc.transfer.freeze = tuple(n for n in _layers(config) if n != "classifier")
  return tc


def _run_name(method: str, size: int) -> str:
  return f"{method}_{size or 'all'}"


def validate(config) -> None:
  """The study's keys, then every stage's trainer config (ValueError naming the key and what is allowed)."""
  s = config.study
  for key in ("source_classes", "target_classes"):
    classes = s[key]
    if len(classes) < 2 or len(set(classes)) != len(classes) or not all(isinstance(c, int) and c >= 0
                                                                        for c in classes):
      raise ValueError(f"study.{key} must be at least two distinct labels >= 0, got {classes!r}")
  both = sorted(set(s.source_classes) & set(s.target_classes))
  if both:
    raise ValueError(f"study.source_classes and study.target_classes share {both}; the target classes must be new")
  sizes = s.target_sizes
  if not sizes or len(set(sizes)) != len(sizes) or not all(isinstance(n, int) and n >= 0 for n in sizes):
    raise ValueError(f"study.target_sizes must be distinct examples-per-class counts >= 0 (0: all), got {sizes!r}")
  small = [n for n in sizes if n and n * len(s.target_classes) < config.loop.batch_size]
  if small:
    raise ValueError(f"study.target_sizes {small} give fewer training examples than loop.batch_size "
                     f"{config.loop.batch_size}; lower loop.batch_size or raise the sizes")
  if not s.source_epochs > 0:
    raise ValueError(f"study.source_epochs must be > 0, got {s.source_epochs}")
  if not isinstance(s.target_steps, int) or s.target_steps <= 0:
    raise ValueError(f"study.target_steps must be a positive integer, got {s.target_steps!r}")
  unknown = [m for m in s.methods if m not in METHODS]
  if not s.methods or unknown or len(set(s.methods)) != len(s.methods):
    raise ValueError(f"study.methods must be distinct names from {', '.join(METHODS)}, got {s.methods!r}")
  if "finetune" not in s.methods and config.transfer.lr_scale != schema.transfer().transfer.lr_scale:
    raise ValueError(f"transfer.lr_scale={config.transfer.lr_scale!r} has no effect: study.methods has no "
                     "'finetune'")
  if not config.transfer.lr_scale > 0:
    raise ValueError(f"transfer.lr_scale must be > 0, got {config.transfer.lr_scale!r}")
  train_lib.validate(source_config(config))
  train_lib.validate(target_config(config, "scratch", sizes[0], None))
  if "frozen" in s.methods and len(_layers(config)) < 2:
    raise ValueError("study.methods 'frozen' needs a model with layers besides the classifier")


def _train(tc, run_dir: str, full: data.Dataset, log) -> tuple[dict, float]:
  """(results, seconds of training in this call) of one trainer run: reused when finished, resumed otherwise."""
  if train_lib.check_workdir(run_dir, tc) == "finished":
    log(f"{run_dir}: finished, reused")
    with open(os.path.join(run_dir, "results.json")) as f:
      return json.load(f), 0.0
  start = time.perf_counter()
  results = train_lib.train_and_evaluate(tc, run_dir, dataset=train_lib.load_dataset(tc, full=full), log=log)
  return results, time.perf_counter() - start


def _class_names(full: data.Dataset, classes) -> str:
  return ", ".join(full.class_names[c] for c in classes)


def plot_accuracy(results: dict, path: str) -> None:
  """Test accuracy against examples per class (log x), one line per method; 'all' at its mean count."""
  fig, ax = common.plt.subplots(figsize=(6.5, 4.5), layout="constrained")
  styles = {"scratch": ("o-", "tab:gray"), "finetune": ("s-", "tab:blue"), "frozen": ("^-", "tab:orange")}
  for method in results["methods"]:
    rows = sorted((r for r in results["runs"] if r["method"] == method), key=lambda r: r["examples_per_class"])
    style, color = styles[method]
    ax.plot([r["examples_per_class"] for r in rows], [100 * r["test_accuracy"] for r in rows], style, color=color,
            label=method)
  sizes = sorted({r["examples_per_class"] for r in results["runs"]})
  ax.set_xscale("log")
  ax.set_xticks(sizes, [f"{n:,}" + (" (all)" if n == results["all_per_class"] else "") for n in sizes])
  ax.minorticks_off()
  ax.set(xlabel="training examples per target class", ylabel="test accuracy on the target classes (%)",
         title=f"{results['dataset']}: {results['target_names']}\nafter {results['source_names']}")
  ax.title.set_fontsize(9)
  ax.grid(alpha=0.3)
  ax.legend(title=f"{results['target_steps']} steps each")
  common.save_figure(fig, path)


def run_study(config, workdir: str, *, log=print) -> dict:
  """Trains stage 1 and every stage-2 run (reusing finished ones), writes and returns results.json's dict."""
  start = time.perf_counter()
  s = config.study
  sc = source_config(config)
  full = data.load(sc.data.dataset, data_dir=sc.data.data_dir, tfds_download=sc.data.download,
                   validation_size=None if sc.data.validation_size < 0 else sc.data.validation_size)
  for key in ("source_classes", "target_classes"):
    if max(s[key]) >= full.num_classes:
      raise ValueError(f"study.{key} {tuple(s[key])}: {full.name} has classes 0..{full.num_classes - 1}")
  log(f"data: {full.source}")
  run_root = os.path.join(workdir, "runs")
  source_dir = os.path.join(run_root, "source")
  source_train = len(train_lib.load_dataset(sc, full=full).train)
  source_steps = train_lib.plan_steps(sc, source_train)[1]
  plan = [(m, n) for n in s.target_sizes for m in s.methods]
  total = source_steps + len(plan) * s.target_steps
  done, seconds = 0, 0.0

  def announce(i, name, steps):
    eta = loop.format_eta((total - done) * seconds / done) if done and seconds else "?"
    log(f"\n[{i}/{len(plan) + 1}] {name}: {steps} steps (study: {done}/{total} steps done, ETA {eta})")

  announce(1, f"source, classes {tuple(s.source_classes)}", source_steps)
  source, took = _train(sc, source_dir, full, log)
  done, seconds = done + source_steps, seconds + took
  runs = []
  for i, (method, size) in enumerate(plan, start=2):
    tc = target_config(config, method, size, source_dir)
    name = _run_name(method, size)
    announce(i, f"{name}, classes {tuple(s.target_classes)}", s.target_steps)
    result, took = _train(tc, os.path.join(run_root, name), full, log)
    if took:
      done, seconds = done + s.target_steps, seconds + took
    else:
      total -= s.target_steps
    train_size = len(train_lib.load_dataset(tc, full=full).train)
    runs.append({"method": method, "per_class": size, "train_examples": train_size,
                 "examples_per_class": size or train_size // len(s.target_classes),
                 "test_accuracy": result["test_accuracy"], "test_loss": result["test_loss"],
                 "best_validation_accuracy": result["best_eval_accuracy"], "steps": result["steps"],
                 "epochs": result["epochs"], "wall_time_s": result["wall_time_s"], "workdir": f"runs/{name}"})
  all_size = len(train_lib.load_dataset(target_config(config, "scratch", 0, None), full=full).train)
  results = {
      "dataset": full.name, "data_source": full.source,
      "source_classes": list(s.source_classes), "target_classes": list(s.target_classes),
      "source_names": _class_names(full, s.source_classes), "target_names": _class_names(full, s.target_classes),
      "source": {"test_accuracy": source["test_accuracy"], "steps": source["steps"], "epochs": source["epochs"],
                 "train_examples": source_train, "workdir": "runs/source"},
      "methods": list(s.methods), "target_steps": s.target_steps, "batch_size": config.loop.batch_size,
      "lr_scale_finetune": config.transfer.lr_scale, "all_per_class": all_size // len(s.target_classes),
      "rule": f"every stage-2 run: {s.target_steps} steps of {config.loop.batch_size} examples, whatever its "
              "training-set size; test accuracy on the test set of the target classes at the last step",
      "runs": runs, "wall_time_s": time.perf_counter() - start,
  }
  common.write_json(os.path.join(workdir, "results.json"), results)
  common.write_csv(os.path.join(workdir, "results.csv"),
                   ["method", "per_class", "train_examples", "steps", "epochs", "test_accuracy", "test_loss",
                    "best_validation_accuracy", "wall_time_s"],
                   [[r["method"], r["per_class"], r["train_examples"], r["steps"], r["epochs"], r["test_accuracy"],
                     r["test_loss"], r["best_validation_accuracy"], r["wall_time_s"]] for r in runs])
  plot_accuracy(results, os.path.join(workdir, "accuracy.png"))
  return results


def report(results: dict) -> str:
  """The table: test accuracy per examples-per-class (rows) and method (columns)."""
  by = {(r["method"], r["examples_per_class"]): r for r in results["runs"]}
  sizes = sorted({r["examples_per_class"] for r in results["runs"]})
  header = ["examples per class", *results["methods"]]
  rows = [[f"{n:,}" + (" (all)" if n == results["all_per_class"] else ""),
           *[f"{100 * by[(m, n)]['test_accuracy']:.2f}%" for m in results["methods"]]] for n in sizes]
  return (f"source: {results['source_names']}: test accuracy {100 * results['source']['test_accuracy']:.2f}% "
          f"after {results['source']['steps']} steps ({results['source']['epochs']:.1f} epochs)\n"
          f"target: {results['target_names']}; {results['rule']}\n\n"
          + common.format_table(header, rows))


CONFIG = None


def define_flags() -> None:
  """Defines the flags; called by `run` only, so importing this module (tests) clashes with no other binary."""
  global CONFIG
  CONFIG = config_lib.define_config_flag(BINARY, "transfer.py")
  flags.DEFINE_string("workdir", "runs/transfer", "Output folder: config.json, results, plots, runs/<name>/.")
  flags.DEFINE_bool("overwrite", False, "Discard a study with another config in --workdir first.")


def main(argv):
  del argv
  common.quiet_logs()
  config = CONFIG.value
  try:
    validate(config)
  except ValueError as e:
    sys.exit(f"error: {e}")
  log = lambda message: print(message, flush=True)
  try:
    results = common.run_study_locked(run_study, config, FLAGS.workdir, binary=BINARY, resumable_keys=RESUMABLE_KEYS,
                                      overwrite=FLAGS.overwrite, what="study", log=log)
  except (ValueError, FileNotFoundError, common.WorkdirBusy) as e:
    sys.exit(f"error: {e}")
  print("\n" + report(results))
  print(f"\nwrote {FLAGS.workdir}/results.json, results.csv, accuracy.png (this invocation took "
        f"{results['wall_time_s']:.0f} s)")


def run():
  define_flags()
  common.run_main(main, __name__)


if __name__ == "__main__":
  run()
