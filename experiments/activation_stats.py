r"""Activation statistics across layers at initialisation (cs231n, 'Training Neural Networks I').

A deep MLP without biases (default 10 hidden layers of 500 units) is run forward on unit-Gaussian inputs; the
binary prints the input's and every hidden layer's mean and std. study.grads also backpropagates a random
upstream gradient and reports each layer's activation- and weight-gradient std; study.compare runs the cases of
study.cases (the lecture's) in one table. Written to --workdir:

  histograms_<case>.png  every hidden layer's post-activation histogram, one figure per case (histograms.png for
                         a single case), every panel labelled, all on one log count axis, bins and x-range, the
                         same for every case with that nonlinearity
  mean_std.png           per-layer post-activation mean and std (log scale), one line per case
  gradients.png          per-layer activation- and weight-gradient std (log scale), one line per case; only with
                         study.grads
  results.json, results.csv, config.json

  python -m experiments.activation_stats --workdir=runs/activation_stats     # the lecture's cases, with gradients
  python -m experiments.activation_stats --config.study.compare=False --config.model.activation=relu \
      --config.model.init=he_normal --workdir=/tmp/relu_he                      # one case

Config: experiments/configs/activation_stats.py (keys: configs/schema.py); override with --config.group.key=value.
"""

import dataclasses
import os
import sys

from absl import flags
from absl import logging
import jax
from matplotlib import ticker
import numpy as np

from dlcore import activations, checks, initializers, layers, models, stats
from . import common, config_lib
from .configs import schema

FLAGS = flags.FLAGS
CONFIG = config_lib.define_config_flag("activation_stats", "activation_stats.py")
flags.DEFINE_string("workdir", "runs/activation_stats", "Where plots and results are written.")


@dataclasses.dataclass(frozen=True)
class Case:
  nonlinearity: str
  init: str
  init_scale: float | None = None
  batchnorm: str = "none"

  @property
  def label(self) -> str:
    scale = "" if self.init_scale is None else f"({self.init_scale:g})"
    bn = "" if self.batchnorm == "none" else f" +BN {self.batchnorm}"
    return f"{self.nonlinearity} {self.init}{scale}{bn}"

  @property
  def slug(self) -> str:
    return self.label.replace(" +BN ", "_bn_").replace(" ", "_").replace("(", "").replace(")", "")

  @classmethod
  def parse(cls, text: str) -> "Case":
    """'tanh:normal:0.01:before' -> Case; each part validated against its registry."""
    parts = text.strip().split(":")
    if len(parts) < 2:
      raise ValueError(f"study.cases entry {text!r} must be nonlinearity:init[:init_scale][:before|after]")
    activations.get(parts[0]), initializers.get(parts[1])
    scale, bn = None, "none"
    for part in parts[2:]:
      if part in layers.BATCHNORM_PLACES:
        bn = part
      else:
        try:
          scale = float(part)
        except ValueError:
          raise ValueError(f"study.cases entry {text!r}: {part!r} is neither an init_scale nor one of "
                           f"{layers.BATCHNORM_PLACES}") from None
    return cls(parts[0], parts[1], scale, bn)


def run_case(case: Case, inputs: jax.Array, hidden: tuple[int, ...], seed: int, grads: bool) -> dict:
  """Layer statistics of one case on an MLP with `hidden` widths; the weights depend only on the seed."""
  for i, width in enumerate(hidden):
    checks.positive(f"model.hidden[{i}]", width)
  model = models.MLP(hidden=tuple(hidden), num_classes=0, activation=case.nonlinearity,
                     initializer=case.init, init_scale=case.init_scale, use_bias=False, batchnorm=case.batchnorm)
  variables = models.init_variables(model, jax.random.key(seed), inputs, lsuv_batch=inputs)
  train = case.batchnorm != "none"  # at initialisation BatchNorm normalises with the batch's own statistics
  acts = stats.activations(model, variables, inputs, train=train)
  records = []
  for layer in acts:
    record = {"name": layer["name"], **stats.summarize(layer["post"]),
              "saturated": stats.saturation(layer["post"], case.nonlinearity),
              "pre": stats.summarize(layer["pre"])}
    records.append(record)
  if grads:
    for record, g in zip(records, stats.gradients(model, variables, inputs, jax.random.key(seed + 1),
                                                  train=train)):
      record["grad_std"] = float(np.std(np.asarray(g["grad"], np.float64)))
      record["weight_grad_std"] = float(np.std(np.asarray(g["weight_grad"], np.float64)))
  return {"case": case.label, **dataclasses.asdict(case), "layers": records,
          "_post": [np.asarray(layer["post"]) for layer in acts]}


BOUNDED_RANGES = {"tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0)}
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">", "p")
TICK_SIZE = 8


def histogram_range(posts: list[np.ndarray], nonlinearity: str) -> tuple[float, float]:
  """The x-range shared by every histogram of `posts` (the layers of every case with this nonlinearity): tanh's
  and sigmoid's own range, else the extremes over them (0 included, so relu's dead units sit at the left edge)."""
  if nonlinearity in BOUNDED_RANGES:
    return BOUNDED_RANGES[nonlinearity]
  finite = [p[np.isfinite(p)] for p in posts]
  lo = min([0.0] + [float(f.min()) for f in finite if f.size])
  hi = max([0.0] + [float(f.max()) for f in finite if f.size])
  return (lo, hi) if hi > lo else (lo, lo + 1.0)


def histogram_figure(result: dict, bins: int, x_range: tuple[float, float] | None = None):
  """One panel per hidden layer, each with its own axis labels and tick labels, all on one x-range (`x_range`,
  default `histogram_range` of this case's layers), bins and log-count y-axis, so a layer whose values collapse
  to 0 shows as a spike next to the wide histograms of the layers (and, given a range shared by the cases, the
  cases) before it."""
  posts = result["_post"]
  lo, hi = x_range or histogram_range(posts, result["nonlinearity"])
  edges = np.linspace(lo, hi, bins + 1)
  cols = min(len(posts), 5)
  rows = -(-len(posts) // cols)
  fig, axes = common.plt.subplots(rows, cols, figsize=(3.1 * cols + 0.3, 2.7 * rows + 0.5), squeeze=False,
                                  sharex=True, sharey=True, layout="constrained")
  for i, (ax, post) in enumerate(zip(axes.flat, posts)):
    ax.hist(post.ravel(), bins=edges, color="C0")
    ax.set_title(f"layer {i + 1}: std {post.std():.3g}", fontsize=10)
    ax.set_xlabel("post-activation value", fontsize=9)
    ax.set_ylabel("count (log scale)", fontsize=9)
    ax.tick_params(which="both", labelsize=TICK_SIZE, labelbottom=True, labelleft=True)
  pad = 0.03 * (hi - lo)  # a spike at either end stays off the frame; neighbouring end tick labels stay apart
  ax.set(xlim=(lo - pad, hi + pad), yscale="log")
  ax.set_ylim(0.7, 2 * max(post.size for post in posts))  # up to a spike of every value in one bin
  for ax in axes.flat[len(posts):]:
    ax.axis("off")
  fig.suptitle(f"post-activation histograms: {result['case']} (each panel: {posts[0].size} values)", fontsize=12)
  return fig


def plot_histograms(result: dict, bins: int, path: str, x_range: tuple[float, float] | None = None) -> None:
  common.save_figure(histogram_figure(result, bins, x_range), path)


class PlainLogFormatter(ticker.LogFormatter):
  """Labels the log-axis ticks matplotlib would label (minor ones only on a narrow axis) as 0.85, not 8.5e-01."""

  def __call__(self, x, pos=None):
    return f"{x:.3g}" if super().__call__(x, pos) else ""


def _lines_by_layer(ax, results: list[dict], key, log: bool) -> None:
  """One line per case of `key(layer record)` against the hidden-layer index (non-positive values left out on a
  log axis)."""
  for i, result in enumerate(results):
    depth = np.arange(1, len(result["layers"]) + 1)
    values = np.array([key(r) for r in result["layers"]], np.float64)
    if log:
      values[values <= 0] = np.nan
    ax.plot(depth, values, marker=MARKERS[i % len(MARKERS)], markersize=5, color=f"C{i % 10}", alpha=0.85,
            label=result["case"])
  ax.set_xlabel("hidden layer index", fontsize=10)
  ax.set_xticks(np.arange(1, max(len(r["layers"]) for r in results) + 1))
  ax.tick_params(which="both", labelsize=TICK_SIZE + 1)
  ax.grid(alpha=0.3, which="major")
  if log:
    ax.set_yscale("log")
    ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def _figure_by_layer(results: list[dict], panels: list[tuple[str, str, object, bool]], title: str):
  """Side-by-side panels (title, y label, key, log y) with one legend for all of them below the panels."""
  fig, axes = common.plt.subplots(1, len(panels), figsize=(12, 4.2 + 0.25 * -(-len(results) // 4)),
                                  layout="constrained")
  for ax, (panel_title, ylabel, key, log) in zip(axes, panels):
    _lines_by_layer(ax, results, key, log)
    ax.set_title(panel_title, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=10)
  fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(len(results), 4),
             fontsize=9, frameon=False)
  fig.suptitle(title, fontsize=12)
  return fig


def mean_std_figure(results: list[dict]):
  return _figure_by_layer(results, [
      ("mean", "mean of post-activations", lambda r: r["mean"], False),
      ("std", "std of post-activations (log scale)", lambda r: r["std"], True)],
      "post-activation statistics per hidden layer")


def plot_mean_std(results: list[dict], path: str) -> None:
  common.save_figure(mean_std_figure(results), path)


def has_gradients(results: list[dict]) -> bool:
  return bool(results) and all("grad_std" in r["layers"][0] for r in results)


def gradients_figure(results: list[dict]):
  """Per-layer std of dL/d(post-activation) and dL/dW, one line per case; None without gradient statistics."""
  if not has_gradients(results):
    return None
  return _figure_by_layer(results, [
      ("activation gradient", "std of dL/d(post-activation) (log scale)", lambda r: r["grad_std"], True),
      ("weight gradient", "std of dL/dW (log scale)", lambda r: r["weight_grad_std"], True)],
      "gradient statistics per hidden layer (random unit-Gaussian upstream gradient)")


def plot_gradients(results: list[dict], path: str) -> bool:
  """Writes gradients.png when every result carries gradient statistics; whether it did."""
  fig = gradients_figure(results)
  if fig is not None:
    common.save_figure(fig, path)
  return fig is not None


def layer_table(result: dict, input_stats: dict) -> str:
  grads = "grad_std" in result["layers"][0]
  header = ["layer", "mean", "std", "saturated"] + (["grad_std", "weight_grad_std"] if grads else [])
  rows = [["input", input_stats["mean"], input_stats["std"], "-"] + (["-", "-"] if grads else [])]
  for i, r in enumerate(result["layers"]):
    rows.append([i + 1, r["mean"], r["std"], r["saturated"]]
                + ([r["grad_std"], r["weight_grad_std"]] if grads else []))
  return common.format_table(header, rows)


SINGLE_CASE_KEYS = ("activation", "init", "init_scale", "batchnorm")


def cases_of(config) -> list[Case]:
  """The cases `config` asks for: study.cases with study.compare, else the one case of its model keys.

  Keys the chosen mode does not read are refused when changed from their defaults (ValueError naming them).
  """
  defaults = schema.activation_stats()
  if config.study.compare:
    unused = [f"model.{k}" for k in SINGLE_CASE_KEYS if config.model[k] != defaults.model[k]]
    if unused:
      raise ValueError(f"{', '.join(unused)} would be ignored with study.compare=True; describe each case in "
                       "study.cases (activation:init[:init_scale][:before|after])")
    return [Case.parse(c) for c in config.study.cases]
  if config.study.cases != defaults.study.cases:
    raise ValueError("study.cases is read only with study.compare=True")
  m = config.model
  activations.get(m.activation)
  initializers.get(m.init, m.init_scale)
  checks.one_of("model.batchnorm", m.batchnorm, layers.BATCHNORM_PLACES)
  return [Case(m.activation, m.init, m.init_scale, m.batchnorm)]


def main(argv):
  del argv
  config = CONFIG.value
  try:
    cases = cases_of(config)
    for name in ("num_inputs", "input_dim", "bins"):
      checks.positive(f"study.{name}", config.study[name])
    for i, width in enumerate(config.model.hidden):
      checks.positive(f"model.hidden[{i}]", width)
  except ValueError as e:
    sys.exit(f"error: {e}")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  common.write_json(os.path.join(FLAGS.workdir, "config.json"), config_lib.to_json_dict(config, "activation_stats"))
  study, hidden = config.study, tuple(config.model.hidden)
  inputs = jax.random.normal(jax.random.key(config.seed), (study.num_inputs, study.input_dim))
  input_stats = stats.summarize(inputs)

  results = []
  for i, case in enumerate(cases):
    logging.info("case %d/%d: %s", i + 1, len(cases), case.label)
    result = run_case(case, inputs, hidden, config.seed + 1, study.grads)
    print(f"\n== {case.label} ==\n{layer_table(result, input_stats)}", flush=True)
    results.append(result)
  for result, case in zip(results, cases):  # cases with the same nonlinearity share one x-range
    same = [post for r in results if r["nonlinearity"] == case.nonlinearity for post in r["_post"]]
    name = "histograms.png" if len(cases) == 1 else f"histograms_{case.slug}.png"
    plot_histograms(result, study.bins, os.path.join(FLAGS.workdir, name),
                    histogram_range(same, case.nonlinearity))

  if len(cases) > 1:
    header = ["layer"] + [r["case"] for r in results]
    rows = [[i + 1] + [r["layers"][i]["std"] for r in results] for i in range(len(hidden))]
    print(f"\n== std of each hidden layer ==\n{common.format_table(header, rows)}")
  plot_mean_std(results, os.path.join(FLAGS.workdir, "mean_std.png"))
  grads_png = plot_gradients(results, os.path.join(FLAGS.workdir, "gradients.png"))

  public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
  csv_rows = [[r["case"], i + 1, l["mean"], l["std"], l["saturated"], l.get("grad_std", ""),
               l.get("weight_grad_std", "")] for r in public for i, l in enumerate(r["layers"])]
  common.write_csv(os.path.join(FLAGS.workdir, "results.csv"),
                   ["case", "layer", "mean", "std", "saturated", "grad_std", "weight_grad_std"], csv_rows)
  summary = {"input": input_stats, "config": config.to_dict()}
  summary.update({"layers": public[0]["layers"], "case": public[0]["case"]} if len(public) == 1
                 else {"cases": public})
  common.write_json(os.path.join(FLAGS.workdir, "results.json"), summary)
  pngs = "mean_std.png, gradients.png" if grads_png else "mean_std.png"
  print(f"\nwrote {FLAGS.workdir}/results.json, results.csv, {pngs} and histograms")


def run():
  common.run_main(main, __name__)


if __name__ == "__main__":
  run()
