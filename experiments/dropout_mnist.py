r"""Srivastava et al. 2014, Table 2: permutation-invariant MNIST MLPs with and without dropout and max-norm.

The rows (no augmentation, no convolutions; pixels as given, in [0, 1]):
  standard_2x800_logistic        2 x 800 logistic, no dropout                          paper 1.60% (Simard et al.)
  dropout_3x1024_logistic        3 x 1024 logistic, dropout                            paper 1.35%
  dropout_3x1024_relu            3 x 1024 ReLU, dropout (inverted form)                paper 1.25%
  dropout_3x1024_relu_original   the same net with the paper's original dropout form  paper 1.25%
  dropout_maxnorm_3x1024_relu    3 x 1024 ReLU, dropout + max-norm (optimizer.max_norm) paper 1.06%
  control_3x1024_relu            3 x 1024 ReLU without dropout: the control            (not in the table)
Dropout keeps inputs with probability model.input_keep_prob (0.8) and hidden units with model.keep_prob (0.5).
Every row: SGD with classic momentum ramped linearly from optimizer.initial_momentum (0.5) to optimizer.momentum
(0.95) over optimizer.momentum_ramp_epochs, learning rate optimizer.learning_rate * schedule.decay_rate**epoch,
batch loop.batch_size; ReLU nets start from he_normal, logistic nets from glorot_uniform. The two dropout forms
(inverted: train scales kept units by 1/p; original: test scales by p) run with study.seeds seeds each and are
compared against their seed spread; every other row runs once, with the config's seed.

Each run is one trainer run (experiments.train_lib.train_and_evaluate) in WORKDIR/runs/<row>_seed<k>: re-running
the same command resumes a killed run from its last checkpoint (one per epoch), reuses finished runs, and extends
them when loop.epochs grows. SIGTERM or Ctrl-C stops after the current step with a checkpoint (exit code 75).

  python -m experiments.dropout_mnist --config.data.data_dir=/path/to/mnist --workdir=runs/dropout
  python -m experiments.dropout_mnist --config.data.data_dir=DIR --epochs=5 --workdir=runs/short

Config: experiments/configs/dropout_mnist.py (keys: configs/schema.py); override with --config.group.key=value
(--epochs=N is shorthand for --config.loop.epochs=N, recorded in config.json like any key). Without MNIST (no IDX files in data.data_dir, no prepared TFDS copy;
data.download lets TFDS fetch it) the study runs on Fashion-MNIST and says so in its table, log and results.json.
Writes config.json, results.json, results.csv, table.txt and errors.png to --workdir.
"""

import dataclasses
import json
import math
import os
import sys
import time

from absl import flags
import numpy as np

from dlcore import checks, loop
from . import batchnorm_mnist, common, config_lib, train_lib
from .configs import schema

BINARY = "dropout_mnist"
DATASETS = ("mnist", "fashion_mnist", "synthetic")
INIT = {"relu": "he_normal", "sigmoid": "glorot_uniform"}
EXIT_INTERRUPTED = 75  # as experiments.train: stopped on a signal after checkpointing; run again to resume


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of the study: the paper's architecture and regulariser, and its MNIST test error (%)."""
  key: str
  label: str
  paper_error: float | None
  hidden: tuple[int, ...]
  activation: str
  dropout: bool = False
  max_norm: bool = False
  dropout_mode: str = "inverted"


ROWS = (
    Row("standard_2x800_logistic", "Standard NN, 2x800 logistic", 1.60, (800, 800), "sigmoid"),
    Row("dropout_3x1024_logistic", "Dropout NN, 3x1024 logistic", 1.35, (1024,) * 3, "sigmoid", dropout=True),
    Row("dropout_3x1024_relu", "Dropout NN, 3x1024 ReLU (inverted)", 1.25, (1024,) * 3, "relu", dropout=True),
    Row("dropout_3x1024_relu_original", "Dropout NN, 3x1024 ReLU (original)", 1.25, (1024,) * 3, "relu",
        dropout=True, dropout_mode="original"),
    Row("dropout_maxnorm_3x1024_relu", "Dropout + max-norm, 3x1024 ReLU", 1.06, (1024,) * 3, "relu", dropout=True,
        max_norm=True),
    Row("control_3x1024_relu", "No dropout (control), 3x1024 ReLU", None, (1024,) * 3, "relu"),
)
BY_KEY = {row.key: row for row in ROWS}
# The two dropout forms of one net: each runs with study.seeds seeds.
FORMS = ("dropout_3x1024_relu", "dropout_3x1024_relu_original")
# The paper's rows in its order (error falling down the table): whether the measured errors fall the same way.
PAPER_ORDER = ("standard_2x800_logistic", "dropout_3x1024_logistic", "dropout_3x1024_relu",
               "dropout_maxnorm_3x1024_relu")


def validate(config) -> None:
  """Study-level checks naming the key; each run's trainer config is validated by train_lib as well."""
  checks.one_of("data.dataset", config.data.dataset, DATASETS)
  if not config.study.rows:
    raise ValueError(f"study.rows is empty; choose from: {', '.join(BY_KEY)}")
  for key in config.study.rows:
    checks.one_of("study.rows", key, tuple(BY_KEY))
  if len(set(config.study.rows)) != len(config.study.rows):
    raise ValueError(f"study.rows lists a row twice: {config.study.rows!r}")
  checks.positive("study.seeds", config.study.seeds)
  if not float(config.study.seeds).is_integer():
    raise ValueError(f"study.seeds must be a whole number, got {config.study.seeds!r}")
  checks.non_negative("seed", config.seed)
  checks.positive("loop.epochs", config.loop.epochs)
  if config.data.data_dir is not None and config.data.dataset == "synthetic":
    raise ValueError(f"data.data_dir must be unset for data.dataset='synthetic' (it is generated), got "
                     f"{config.data.data_dir!r}")
  for row, seed in runs(config):
    train_lib.validate(trainer_config(config, row, seed, config.data.dataset))


def runs(config) -> list[tuple[Row, int]]:
  """(row, seed) of every run: study.seeds seeds (seed, seed + 1, ...) for the two dropout forms, one otherwise."""
  out = []
  for key in config.study.rows:
    seeds = int(config.study.seeds) if key in FORMS else 1
    out += [(BY_KEY[key], config.seed + k) for k in range(seeds)]
  return out


def run_name(row: Row, seed: int) -> str:
  """The run's folder under WORKDIR/runs."""
  return f"{row.key}_seed{seed}"


def trainer_config(config, row: Row, seed: int, dataset: str):
  """The trainer's config (schema.train) of one run: the row's net and regulariser, the study's optimiser."""
  tc = schema.train()
  tc.seed = seed
  tc.data.update(dataset=dataset, data_dir=config.data.data_dir, download=config.data.download,
                 resident=config.data.resident, validation_size=0)
  tc.model.update(name="mlp", hidden=row.hidden, activation=row.activation, init=INIT[row.activation])
  if row.dropout:
    tc.model.update(keep_prob=config.model.keep_prob, input_keep_prob=config.model.input_keep_prob,
                    dropout_mode=row.dropout_mode)
  o = config.optimizer
  tc.optimizer.update(name="momentum", learning_rate=o.learning_rate, momentum=o.momentum,
                      initial_momentum=o.initial_momentum, momentum_ramp_epochs=o.momentum_ramp_epochs,
                      max_norm=o.max_norm if row.max_norm else None)
  tc.schedule.name = "exponential"
  tc.schedule.decay_rate = config.schedule.decay_rate
  tc.loop.update(epochs=float(config.loop.epochs), batch_size=config.loop.batch_size, log_every=config.loop.log_every,
                 steps_per_call=config.loop.steps_per_call, eval_every=0)
  return tc


def curve(results: dict) -> list[dict]:
  """[{epoch, test_error}] of a finished run, one point per epoch (the trainer evaluates on test: no validation)."""
  steps_per_epoch = results["steps"] / results["epochs"]
  return [{"epoch": e["step"] / steps_per_epoch, "test_error": 1.0 - e["accuracy"]} for e in results["evals"]]


def summarize(config, finished: dict[str, dict], test_size: int) -> dict:
  """Per row: test errors per seed, their mean and spread; the two forms' difference against the noise; whether
  the paper's ordering of the rows holds."""
  rows = {}
  for key in config.study.rows:
    row = BY_KEY[key]
    errors = [1.0 - finished[run_name(row, s)]["test_accuracy"] for r, s in runs(config) if r.key == key]
    rows[key] = {"label": row.label, "paper_error": row.paper_error, "hidden": list(row.hidden),
                 "activation": row.activation, "dropout": row.dropout, "dropout_mode": row.dropout_mode if row.dropout
                 else None, "max_norm": config.optimizer.max_norm if row.max_norm else None,
                 "errors": errors, "mean_error": float(np.mean(errors)),
                 "std_error": float(np.std(errors, ddof=1)) if len(errors) > 1 else None}
  return {"rows": rows, "forms": forms_verdict(rows, test_size), "ordering": ordering_verdict(rows)}


def forms_verdict(rows: dict, test_size: int) -> dict | None:
  """Inverted vs original dropout: the difference of mean test errors against two standard errors, from the
  seed spread (when both rows have >= 2 seeds) and at least the binomial noise of a test error on test_size
  examples."""
  if not all(k in rows for k in FORMS):
    return None
  inv, orig = rows[FORMS[0]], rows[FORMS[1]]
  diff = orig["mean_error"] - inv["mean_error"]
  n_inv, n_orig = len(inv["errors"]), len(orig["errors"])
  p = 0.5 * (inv["mean_error"] + orig["mean_error"])
  binomial_se = math.sqrt(p * (1 - p) / test_size * (1 / n_inv + 1 / n_orig))
  seed_se = (math.sqrt(inv["std_error"] ** 2 / n_inv + orig["std_error"] ** 2 / n_orig)
             if inv["std_error"] is not None and orig["std_error"] is not None else None)
  se = max(binomial_se, seed_se or 0.0)
  same = abs(diff) <= 2 * se
  text = (f"inverted vs original dropout: {100 * inv['mean_error']:.2f}% vs {100 * orig['mean_error']:.2f}% "
          f"(difference {100 * diff:+.2f} points; 2 x SE = {200 * se:.2f} points, SE from the seed spread "
          f"{'n/a' if seed_se is None else f'{100 * seed_se:.2f}'} and the binomial noise {100 * binomial_se:.2f}): "
          + ("the same within noise" if same else "different beyond noise"))
  return {"difference": diff, "seed_se": seed_se, "binomial_se": binomial_se, "same_within_noise": bool(same),
          "seeds": [n_inv, n_orig], "text": text}


def ordering_verdict(rows: dict) -> dict:
  """Whether the measured errors fall down the paper's rows as the paper's do, pair by adjacent pair; and whether
  dropout beats the control."""
  present = [k for k in PAPER_ORDER if k in rows]
  pairs = [{"above": a, "below": b, "holds": rows[b]["mean_error"] < rows[a]["mean_error"]}
           for a, b in zip(present, present[1:])]
  holds = all(p["holds"] for p in pairs)
  lines = [f"{'holds' if p['holds'] else 'FAILS'}: {rows[p['below']]['label']} "
           f"{100 * rows[p['below']]['mean_error']:.2f}% < {rows[p['above']]['label']} "
           f"{100 * rows[p['above']]['mean_error']:.2f}%" for p in pairs]
  control = None
  if "control_3x1024_relu" in rows and FORMS[0] in rows:
    control = rows[FORMS[0]]["mean_error"] < rows["control_3x1024_relu"]["mean_error"]
    lines.append(f"{'holds' if control else 'FAILS'}: dropout ReLU {100 * rows[FORMS[0]]['mean_error']:.2f}% < "
                 f"control without dropout {100 * rows['control_3x1024_relu']['mean_error']:.2f}%")
  return {"pairs": pairs, "paper_order_holds": bool(holds) if pairs else None, "dropout_beats_control": control,
          "text": lines}


def table_rows(summary: dict) -> list[list]:
  """The printed table: row, net, paper MNIST error, measured mean test error, per-seed errors (and their std)."""
  out = []
  for key, r in summary["rows"].items():
    spread = ", ".join(f"{100 * e:.2f}" for e in r["errors"])
    if r["std_error"] is not None:
      spread += f" (std {100 * r['std_error']:.2f})"
    paper = "-" if r["paper_error"] is None else f"{r['paper_error']:.2f}"
    out.append([r["label"], f"{len(r['hidden'])}x{r['hidden'][0]}", paper, f"{100 * r['mean_error']:.2f}", spread])
  return out


def plot(summary: dict, curves: dict[str, list[dict]], title: str, dataset_name: str, path: str) -> None:
  """(a) test error per epoch per row (first seed); (b) final test error per row (mean, std over seeds); (c) the
  paper's MNIST error of the same rows, on its own scale, so the two orderings compare row by row."""
  fig, (ax_curve, ax_bar, ax_paper) = common.plt.subplots(
      1, 3, figsize=(17, 5.4), layout="constrained", gridspec_kw={"width_ratios": [1.4, 1, 0.6]})
  rows = summary["rows"]
  for i, (key, r) in enumerate(rows.items()):
    points = curves[key]
    ax_curve.plot([p["epoch"] for p in points], [100 * p["test_error"] for p in points], "o-", ms=3,
                  color=f"C{i}", label=r["label"])
  ax_curve.set(title="(a) test error per epoch (first seed)", xlabel="epoch", ylabel=f"{dataset_name} test error (%)",
               yscale="log")
  errors = [100 * p["test_error"] for points in curves.values() for p in points]
  ticks = [t for t in (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 18, 20, 25, 30, 40, 50, 60, 80, 100)
           if min(errors) * 0.95 <= t <= max(errors) * 1.05]
  ax_curve.set_yticks(ticks, [f"{t:g}" for t in ticks])  # plain labels where the curves are, on the log axis
  ax_curve.yaxis.set_minor_locator(common.plt.matplotlib.ticker.NullLocator())
  ax_curve.legend(fontsize=8, loc="best")
  ax_curve.grid(True, which="both", alpha=0.3)
  y = np.arange(len(rows))
  labels = [r["label"] for r in rows.values()]
  measured = [100 * r["mean_error"] for r in rows.values()]
  spread = [100 * (r["std_error"] or 0.0) for r in rows.values()]
  ax_bar.barh(y, measured, 0.6, xerr=spread, color=[f"C{i}" for i in range(len(rows))], capsize=3)
  for yi, value, err in zip(y, measured, spread):
    ax_bar.text(value + err, yi, f"  {value:.2f}", va="center", fontsize=8)
  ax_bar.set_yticks(y, labels, fontsize=8)
  ax_bar.set_xlim(0, 1.2 * max(m + e for m, e in zip(measured, spread)))
  ax_bar.set(title=f"(b) {dataset_name}: final test error\n(mean; bar: std over seeds)", xlabel="test error (%)")
  paper = [r["paper_error"] for r in rows.values()]
  ax_paper.barh(y, [p if p is not None else 0.0 for p in paper], 0.6, color="C7")
  for yi, value in zip(y, paper):
    ax_paper.text(value or 0.0, yi, f"  {value:.2f}" if value is not None else "  not in the table", va="center",
                  fontsize=8)
  ax_paper.set_yticks(y, [""] * len(y))
  ax_paper.set_xlim(0, 1.6 * max((p for p in paper if p is not None), default=1.0))
  ax_paper.set(title="(c) paper, MNIST (Table 2)", xlabel="test error (%)")
  for ax in (ax_bar, ax_paper):
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top, the same rows side by side
  fig.suptitle(title)
  common.save_figure(fig, path)


def run_study(config, workdir: str, *, overwrite: bool = False, should_stop=lambda: None, log=print) -> dict:
  """Trains (or resumes, or reuses) every run and writes the study's outputs; returns results.json's dict."""
  start = time.perf_counter()
  dataset, note = batchnorm_mnist.load_dataset(config.data.dataset, config.data.data_dir, config.data.download, log)
  dataset_name = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "synthetic": "synthetic"}[dataset.name]
  log(f"data: {dataset.source} | train {len(dataset.train)}, test {len(dataset.test)} | reporting {dataset_name} "
      f"test error beside the paper's MNIST errors")
  common.write_json(os.path.join(workdir, "config.json"), config_lib.to_json_dict(config, BINARY))
  plan = runs(config)
  finished, done_seconds, trained = {}, 0.0, 0
  for i, (row, seed) in enumerate(plan):
    name = run_name(row, seed)
    run_dir = os.path.join(workdir, "runs", name)
    tc = trainer_config(config, row, seed, dataset.name)
    status = train_lib.check_workdir(run_dir, tc, overwrite=overwrite)
    eta = "?" if not trained else loop.format_eta(done_seconds / trained * (len(plan) - i))
    log(f"== run {i + 1}/{len(plan)}: {name} ({row.label}; {status}; ETA of the study {eta}) ==")
    if status == "finished":
      with open(os.path.join(run_dir, "results.json")) as f:
        finished[name] = json.load(f)
      continue
    t0 = time.perf_counter()
    finished[name] = train_lib.train_and_evaluate(tc, run_dir, dataset=dataset, should_stop=should_stop,
                                                  log=lambda m, name=name: log(f"[{name}] {m}"))
    done_seconds, trained = done_seconds + time.perf_counter() - t0, trained + 1

  summary = summarize(config, finished, len(dataset.test))
  curves = {key: curve(finished[run_name(BY_KEY[key], config.seed)]) for key in config.study.rows}
  title = (f"Srivastava et al. 2014 Table 2 on {dataset_name}"
           + (" (MNIST not available)" if note and config.data.dataset == "mnist" else "")
           + f": {config.loop.epochs:g} epochs, momentum {config.optimizer.initial_momentum} -> "
           f"{config.optimizer.momentum}, lr {config.optimizer.learning_rate:g} x {config.schedule.decay_rate:g}^epoch")
  plot(summary, curves, title, dataset_name, os.path.join(workdir, "errors.png"))
  header = ["row", "net", "paper MNIST error (%)", f"{dataset_name} test error (%)", "per seed (%)"]
  table = f"{title}\n\n" + common.format_table(header, table_rows(summary))
  lines = summary["ordering"]["text"] + ([summary["forms"]["text"]] if summary["forms"] else [])
  table += "\n\n" + "\n".join(lines) + (f"\n\nNOTE: {note}" if note else "") + "\n"
  common.atomic_write(os.path.join(workdir, "table.txt"), table)
  common.write_csv(os.path.join(workdir, "results.csv"),
                   ["row", "seed", "dropout_mode", "paper_mnist_error", "test_error", "epochs", "run_dir"],
                   [[row.key, seed, row.dropout_mode if row.dropout else "", row.paper_error,
                     1.0 - finished[run_name(row, seed)]["test_accuracy"], finished[run_name(row, seed)]["epochs"],
                     os.path.join("runs", run_name(row, seed))] for row, seed in plan])
  results = {"dataset": dataset.name, "requested_dataset": config.data.dataset, "data_source": dataset.source,
             "data_note": note, "epochs": config.loop.epochs, **summary, "curves": curves,
             "runs": {run_name(r, s): {"test_error": 1.0 - finished[run_name(r, s)]["test_accuracy"],
                                       "wall_time_s": finished[run_name(r, s)]["wall_time_s"]} for r, s in plan},
             "runs_wall_time_s": sum(finished[run_name(r, s)]["wall_time_s"] for r, s in plan),  # all sessions
             "wall_time_s": time.perf_counter() - start}  # this invocation
  common.write_json(os.path.join(workdir, "results.json"), results)
  log("\n" + table)
  log(f"wrote {workdir}/results.json, results.csv, table.txt, errors.png ({results['wall_time_s']:.0f} s; the "
      f"runs trained for {results['runs_wall_time_s']:.0f} s in all)")
  return results


def main(argv):
  del argv
  common.quiet_logs()
  config = CONFIG.value
  workdir = FLAGS.workdir
  try:
    if FLAGS.epochs is not None:
      given = any(arg.split("=")[0] in ("--config.loop.epochs", "-config.loop.epochs") for arg in sys.argv[1:])
      if given and config.loop.epochs != FLAGS.epochs:
        raise ValueError(f"--epochs={FLAGS.epochs:g} and --config.loop.epochs={config.loop.epochs:g} disagree; "
                         "give one of them")
      config.loop.epochs = float(FLAGS.epochs)
    validate(config)
  except (ValueError, TypeError) as e:
    sys.exit(f"error: {e}")
  try:
    with common.WorkdirLock(workdir), loop.StopOnSignals() as stop:
      run_study(config, workdir, overwrite=FLAGS.overwrite, should_stop=stop.requested)
  except train_lib.Interrupted as e:
    print(str(e), file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
  except (common.WorkdirBusy, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


FLAGS = flags.FLAGS
CONFIG = None


def define_flags() -> None:
  """Defines the flags; called by `run` only, so importing this module (tests) clashes with no other binary."""
  global CONFIG
  CONFIG = config_lib.define_config_flag(BINARY, "dropout_mnist.py")
  flags.DEFINE_string("workdir", "runs/dropout_mnist", "Output folder; holds one trainer run per row and seed in "
                      "runs/.")
  flags.DEFINE_bool("overwrite", False, "Discard the runs already in --workdir and train every run afresh.")
  flags.DEFINE_float("epochs", None, "Shorthand for --config.loop.epochs: epochs per run (short runs; a larger "
                     "value extends finished runs).")


def run():
  define_flags()
  common.run_main(main, __name__)


if __name__ == "__main__":
  run()
