r"""Activation statistics across layers at initialisation (cs231n, 'Training Neural Networks I').

A deep MLP without biases (default 10 hidden layers of 500 units) is run forward on unit-Gaussian inputs; the
binary prints the input's and every hidden layer's mean and std, and writes per-layer histograms, a mean/std
plot and results.json/results.csv to --workdir. --grads also backpropagates a random upstream gradient and
reports each layer's activation- and weight-gradient std. --compare runs the lecture's cases in one table.

  python -m experiments.activation_stats --workdir=runs/activation_stats     # the lecture's cases, with --grads
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


def plot_histograms(result: dict, bins: int, path: str) -> None:
  posts = result["_post"]
  cols = min(len(posts), 5)
  rows = -(-len(posts) // cols)
  fig, axes = common.plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), squeeze=False,
                                     layout="constrained")
  for i, (ax, post) in enumerate(zip(axes.flat, posts)):
    ax.hist(post.ravel(), bins=bins, color="C0")
    ax.set_title(f"layer {i + 1}: std {post.std():.3g}", fontsize=9)
    ax.tick_params(labelsize=7)
  for ax in list(axes.flat)[len(posts):]:
    ax.axis("off")
  fig.suptitle(f"post-activation histograms: {result['case']}")
  common.save_figure(fig, path)


def plot_mean_std(results: list[dict], path: str) -> None:
  fig, (ax_mean, ax_std) = common.plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
  for result in results:
    depth = np.arange(1, len(result["layers"]) + 1)
    ax_mean.plot(depth, [r["mean"] for r in result["layers"]], "o-", label=result["case"])
    ax_std.plot(depth, [r["std"] for r in result["layers"]], "o-", label=result["case"])
  ax_mean.set(title="layer mean", xlabel="hidden layer")
  ax_std.set(title="layer std", xlabel="hidden layer", yscale="log")
  ax_std.legend(fontsize=7)
  common.save_figure(fig, path)


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
    name = "histograms.png" if len(cases) == 1 else f"histograms_{case.slug}.png"
    plot_histograms(result, study.bins, os.path.join(FLAGS.workdir, name))
    results.append(result)

  if len(cases) > 1:
    header = ["layer"] + [r["case"] for r in results]
    rows = [[i + 1] + [r["layers"][i]["std"] for r in results] for i in range(len(hidden))]
    print(f"\n== std of each hidden layer ==\n{common.format_table(header, rows)}")
  plot_mean_std(results, os.path.join(FLAGS.workdir, "mean_std.png"))

  public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
  csv_rows = [[r["case"], i + 1, l["mean"], l["std"], l["saturated"], l.get("grad_std", ""),
               l.get("weight_grad_std", "")] for r in public for i, l in enumerate(r["layers"])]
  common.write_csv(os.path.join(FLAGS.workdir, "results.csv"),
                   ["case", "layer", "mean", "std", "saturated", "grad_std", "weight_grad_std"], csv_rows)
  summary = {"input": input_stats, "config": config.to_dict()}
  summary.update({"layers": public[0]["layers"], "case": public[0]["case"]} if len(public) == 1
                 else {"cases": public})
  common.write_json(os.path.join(FLAGS.workdir, "results.json"), summary)
  print(f"\nwrote {FLAGS.workdir}/results.json, results.csv, mean_std.png and histograms")


def run():
  common.run_main(main, __name__)


if __name__ == "__main__":
  run()
