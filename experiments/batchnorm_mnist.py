r"""Ioffe & Szegedy 2015, Figure 1: a sigmoid MLP on MNIST trained with and without BatchNorm.

The net of the paper: 3 fully-connected hidden layers of 100 sigmoid units, Gaussian-initialised weights
(std model.init_scale, 0.01), a 10-way softmax; SGD on batches of 60 for 50000 steps (the paper gives no learning
rate: optimizer.learning_rate 0.5). The second net is the same with BatchNorm before every sigmoid. Both start from the
same kernels (same seed; flax derives each kernel's key from its module path) and see the same batches in the
same order. At step 0 and every loop.eval_every steps the binary records each net's test accuracy and the
15th/50th/85th percentiles, over the test set, of one sigmoid input of the last hidden layer (unit study.unit
of 'layer2'; BatchNorm normalises with the test set's statistics, or with study.percentile_bn='running' its
running averages).

  python -m experiments.batchnorm_mnist --config.data.data_dir=/path/to/mnist --workdir=runs/bn_fig1
  python -m experiments.batchnorm_mnist --config.data.data_dir=DIR --config.loop.steps=5000 \
      --config.loop.eval_every=500 --workdir=runs/bn_short

Config: experiments/configs/batchnorm_mnist.py (keys: configs/schema.py); override with --config.group.key=value.
Without MNIST (no IDX files in data.data_dir, no prepared TFDS copy; data.download lets TFDS fetch it) the binary
falls back to Fashion-MNIST and says so in its output and in results.json. Writes config.json, results.json,
results.csv, fig1.png and <net>/metrics.jsonl (+ TensorBoard) to --workdir; prints a table and a verdict.
"""

import os
import shutil
import sys
import time

from absl import flags
import jax
import numpy as np

from dlcore import checks, data, loop, models, optim, parallel, state as state_lib, stats, summaries, train
from . import common, config_lib, train_lib
from .configs import schema

HIDDEN = (100, 100, 100)
LAYER = f"layer{len(HIDDEN) - 1}"  # the last hidden layer
PERCENTILES = (15, 50, 85)
NETS = (("no_bn", "none", "without BN"), ("bn", "before", "with BN"))  # (key, batchnorm, label)
DATASETS = ("mnist", "fashion_mnist", "synthetic")
EVAL_BATCH = 1000
BN_STATS = ("batch", "running")

FLAGS = flags.FLAGS
# The study's own names for its config keys (configs/schema.py): what `validate` and `train_net` read.
KEYS = {"dataset": "data.dataset", "data_dir": "data.data_dir", "download": "data.download", "steps": "loop.steps",
        "batch": "loop.batch_size", "optimizer": "optimizer.name", "learning_rate": "optimizer.learning_rate",
        "momentum": "optimizer.momentum", "init_scale": "model.init_scale", "eval_every": "loop.eval_every",
        "log_every": "loop.log_every", "unit": "study.unit", "percentile_bn": "study.percentile_bn", "seed": "seed",
        "num_devices": "parallel.num_devices", "resident": "data.resident", "steps_per_call": "loop.steps_per_call"}


def validate(config: dict) -> None:
  """Config checks that name the key (as in configs/schema.py) and the allowed values."""
  checks.one_of(KEYS["dataset"], config["dataset"], DATASETS)
  checks.lookup(KEYS["optimizer"], {n: n for n in optim.OPTIMIZERS}, config["optimizer"])
  checks.one_of(KEYS["percentile_bn"], config["percentile_bn"], BN_STATS)
  for name in ("steps", "batch", "eval_every", "learning_rate", "init_scale"):
    checks.positive(KEYS[name], config[name])
  for name in ("log_every", "seed", "steps_per_call"):
    checks.non_negative(KEYS[name], config[name])
  if config["num_devices"] is not None:
    checks.positive(KEYS["num_devices"], config["num_devices"])
  if not 0 <= config["unit"] < HIDDEN[-1]:
    raise ValueError(f"{KEYS['unit']} must be in [0, {HIDDEN[-1]}) (a unit of {LAYER}), got {config['unit']}")
  if config["data_dir"] is not None and config["dataset"] == "synthetic":
    raise ValueError(f"{KEYS['data_dir']} must be unset for data.dataset='synthetic' (it is generated), got "
                     f"{config['data_dir']!r}")
  if (config["optimizer"] not in ("momentum", "momentum_ema", "nesterov")
      and config["momentum"] != schema.batchnorm_mnist().optimizer.momentum):
    raise ValueError(f"{KEYS['momentum']}={config['momentum']!r} has no effect: optimizer.name is "
                     f"{config['optimizer']!r}")


def _looks_like_fashion_mnist(dataset: data.Dataset) -> bool:
  """MNIST's classes are unbalanced; Fashion-MNIST has exactly 6000 training and 1000 test images per class."""
  labels = [dataset.train.labels] + ([dataset.validation.labels] if dataset.validation is not None else [])
  train_counts = np.bincount(np.concatenate(labels), minlength=10)
  return bool(np.all(train_counts == 6000) and np.all(np.bincount(dataset.test.labels, minlength=10) == 1000))


def load_dataset(name: str, data_dir: str | None, download: bool, log=print) -> tuple[data.Dataset, str | None]:
  """(dataset, note): MNIST falls back to Fashion-MNIST when it is missing; `note` says so (None otherwise)."""
  if name == "synthetic":
    return data.load("synthetic", validation_size=0), None
  try:
    dataset = data.load(name, data_dir=data_dir, validation_size=0, tfds_download=download)
  except FileNotFoundError as e:
    if name != "mnist":
      raise
    note = (f"MNIST was not found ({str(e).split('. To get it')[0]}); using Fashion-MNIST instead. "
            "Set data.data_dir to MNIST's IDX files (or data.download) for the paper's dataset.")
    log(f"NOTE: {note}")
    return data.load("fashion_mnist", data_dir=data_dir, validation_size=0, tfds_download=download), note
  if name == "mnist" and _looks_like_fashion_mnist(dataset):
    # MNIST and Fashion-MNIST share file names; the loader cannot tell them apart.
    note = (f"the files found for MNIST ({dataset.source}) have exactly 6000 training images per class: they are "
            "Fashion-MNIST, not MNIST (whose classes are unbalanced); reporting them as Fashion-MNIST.")
    log(f"NOTE: {note}")
    dataset = data.Dataset(name="fashion_mnist", train=dataset.train, validation=None, test=dataset.test,
                           num_classes=dataset.num_classes, class_names=dataset.class_names,
                           source=dataset.source.replace("mnist from", "fashion_mnist from", 1))
    return dataset, note
  return dataset, None


def build_model(batchnorm: str, init_scale: float, num_classes: int = 10) -> models.MLP:
  return models.MLP(hidden=HIDDEN, num_classes=num_classes, activation="sigmoid", initializer="normal",
                    init_scale=init_scale, batchnorm=batchnorm)


def make_percentile_recorder(model, images: np.ndarray, unit: int, layer: str = LAYER, bn_stats: str = "batch"):
  """record(variables) -> {'p15', 'p50', 'p85'} of the sigmoid input ('pre') of `unit` of `layer` over `images`.

  bn_stats: how BatchNorm normalises in this forward pass -- 'batch': with the statistics of `images` taken as
  one batch (as the training-time network normalises; over a whole test set this is close to Alg. 2's population
  statistics, though of the test set), 'running': with its running averages (eval mode, the network that is
  tested). Percentiles are numpy's, in float64.
  """
  checks.one_of("bn_stats", bn_stats, BN_STATS)

  @jax.jit
  def unit_inputs(variables, x):
    by_name = {a["name"]: a for a in stats.activations(model, variables, x, train=bn_stats == "batch")}
    if layer not in by_name:
      raise ValueError(f"layer {layer!r} sows no activations; layers: {', '.join(by_name)}")
    pre = by_name[layer]["pre"]
    if not 0 <= unit < pre.shape[-1]:
      raise ValueError(f"unit must be in [0, {pre.shape[-1]}) (the units of {layer}), got {unit}")
    return pre[:, unit]

  images = jax.device_put(images)

  def record(variables) -> dict[str, float]:
    pre = np.asarray(unit_inputs(variables, images), np.float64)
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(pre, PERCENTILES))}

  return record


def train_net(key: str, batchnorm: str, config: dict, dataset: data.Dataset, workdir: str, log=print) -> dict:
  """Trains one net; returns {'records': [{step, test_accuracy, test_loss, p15, p50, p85}], 'wall_time_s', ...}."""
  start = time.perf_counter()
  net_dir = os.path.join(workdir, key)
  shutil.rmtree(net_dir, ignore_errors=True)  # no resume: a rerun starts this net's metrics afresh
  train_batches = data.TrainBatches(dataset.train, config["batch"], seed=config["seed"])
  test_batches = data.EvalBatches(dataset.test, min(EVAL_BATCH, len(dataset.test)))
  model = build_model(batchnorm, config["init_scale"], dataset.num_classes)
  tx = optim.optimizer(config["optimizer"], config["learning_rate"], momentum=config["momentum"])
  mesh = parallel.make_mesh(config.get("num_devices"))
  parallel.check_batch_size(config["batch"], mesh)
  state = parallel.replicate(state_lib.create(model, tx, train_batches.batch_at(0)["image"], config["seed"]), mesh)
  train_step = parallel.compile_train_step(train.make_train_step(), mesh, state)
  eval_step = parallel.compile_eval_step(train.make_eval_step(), mesh)
  put_batch = lambda batch: parallel.shard_batch(batch, mesh)
  record_percentiles = make_percentile_recorder(model, dataset.test.images, config["unit"],
                                                bn_stats=config["percentile_bn"])
  writer = summaries.MetricWriter(net_dir)
  percentiles = {0: record_percentiles(state.variables())}
  initial = loop.evaluate(state, eval_step, test_batches, put_batch)
  writer.write(0, "test", initial)
  writer.write(0, "sigmoid_input", percentiles[0])

  def on_step(step, st):
    if step == config["steps"] or step % config["eval_every"] == 0:
      percentiles[step] = record_percentiles(st.variables())
      writer.write(step, "sigmoid_input", percentiles[step])

  loop_config = loop.LoopConfig(config["steps"], log_every=config["log_every"], eval_every=config["eval_every"],
                                checkpoint_every=0)
  source = train_lib.training_source(train_batches, mesh, resident=config["resident"],
                                     steps_per_call=config["steps_per_call"], log=lambda m: log(f"[{key}] {m}"))
  result = loop.fit(state, train_step, eval_step, source, test_batches, loop_config, writer=writer,
                    put_batch=put_batch, eval_split="test", log=lambda m: log(f"[{key}] {m}"), on_step=on_step)
  writer.close()
  evals = [{"step": 0, **initial}] + result.evals
  records = [{"step": e["step"], "test_accuracy": e["accuracy"], "test_loss": e["loss"], **percentiles[e["step"]]}
             for e in evals]
  return {"batchnorm": batchnorm, "records": records, "final_test_accuracy": records[-1]["test_accuracy"],
          "wall_time_s": time.perf_counter() - start}


def first_step_reaching(records: list[dict], accuracy: float) -> int | None:
  return next((r["step"] for r in records if r["test_accuracy"] >= accuracy), None)


def _ranges(records: list[dict]) -> tuple[float, float]:
  """(max - min of p50, max - min of the p85 - p15 band width) over `records`."""
  p50 = [r["p50"] for r in records]
  width = [r["p85"] - r["p15"] for r in records]
  return max(p50) - min(p50), max(width) - min(width)


def drift(records: list[dict], steps: int) -> dict:
  """How far the unit's input distribution moves: ranges over each half of training, and start -> end."""
  halves = {"first_half": [r for r in records if r["step"] <= steps / 2],
            "second_half": [r for r in records if r["step"] >= steps / 2] or records[-1:]}
  out = {}
  for half, rows in halves.items():
    out[f"p50_range_{half}"], out[f"band_width_range_{half}"] = _ranges(rows)
  out.update(p50_change_whole_run=records[-1]["p50"] - records[0]["p50"],
             band_width_start=records[0]["p85"] - records[0]["p15"],
             band_width_end=records[-1]["p85"] - records[-1]["p15"])
  return out


def verdict(nets: dict, steps: int) -> dict:
  """Does BN reach higher accuracy sooner, and how much do the percentiles drift for each net."""
  plain, bn = nets["no_bn"]["records"], nets["bn"]["records"]
  target = plain[-1]["test_accuracy"]
  plain_step, bn_step = first_step_reaching(plain, target), first_step_reaching(bn, target)
  trained = [(p, b) for p, b in zip(plain, bn) if p["step"] > 0]
  ahead = sum(b["test_accuracy"] > p["test_accuracy"] for p, b in trained)
  d = {key: drift(net["records"], steps) for key, net in nets.items()}
  # Sooner: BN gets to the plain net's final accuracy no later than the plain net, and leads at most evaluations.
  sooner = bn_step is not None and bn_step <= plain_step and 2 * ahead > len(trained)
  higher = bn[-1]["test_accuracy"] >= target
  steadier = {half: d["bn"][f"p50_range_{half}"] < d["no_bn"][f"p50_range_{half}"]
              for half in ("first_half", "second_half")}
  yes = lambda flag: "yes" if flag else "no"
  pair = lambda name, fmt: f"{format(d['no_bn'][name], fmt)} without BN vs {format(d['bn'][name], fmt)} with BN"
  lines = [
      f"BN reaches higher accuracy sooner: {yes(sooner and higher)} -- final test accuracy "
      f"{bn[-1]['test_accuracy']:.4f} with BN vs {target:.4f} without; BN first reaches the plain net's final "
      f"accuracy at step {bn_step} (the plain net at step {plain_step}); BN is ahead at {ahead} of "
      f"{len(trained)} evaluations.",
      f"Sigmoid-input drift ({LAYER} unit; range = max - min over the evaluations): p50 range in the first half "
      f"{pair('p50_range_first_half', '.3g')}, in the second half {pair('p50_range_second_half', '.3g')}; "
      f"p50 change start -> end {pair('p50_change_whole_run', '+.3g')}; 15-85 band width range in the second "
      f"half {pair('band_width_range_second_half', '.3g')}.",
      f"BN keeps the sigmoid input steadier: first half {yes(steadier['first_half'])}, second half "
      f"{yes(steadier['second_half'])}.",
  ]
  return {"bn_higher_and_sooner": bool(sooner and higher), "bn_final_higher": bool(higher),
          "target_accuracy": target, "no_bn_step_reaching_target": plain_step, "bn_step_reaching_target": bn_step,
          "bn_ahead_evaluations": ahead, "evaluations": len(trained),
          "bn_steadier_p50_first_half": bool(steadier["first_half"]),
          "bn_steadier_p50_second_half": bool(steadier["second_half"]), "drift": d, "text": lines}


def plot(nets: dict, title: str, unit: int, path: str, bn_stats: str = "batch") -> None:
  """(a) test accuracy vs steps for both nets; (b), (c) p15/p50/p85 of the sigmoid input without / with BN."""
  fig, axes = common.plt.subplots(1, 3, figsize=(15, 4.4), layout="constrained")
  for (key, _, label), color in zip(NETS, ("C3", "C0")):
    records = nets[key]["records"]
    axes[0].plot([r["step"] for r in records], [r["test_accuracy"] for r in records], "o-", ms=3, color=color,
                 label=label)
  trained = [r["test_accuracy"] for k, _, _ in NETS for r in nets[k]["records"] if r["step"] > 0]
  low = min(trained) if trained else 0.0
  axes[0].set_ylim(max(0.0, low - 0.05 * (1.0 - low) - 0.01), 1.0)  # step 0 (chance) may fall below: as in the paper
  axes[0].set(title="(a) test accuracy", xlabel="step", ylabel="test accuracy")
  axes[0].legend(loc="lower right")
  for ax, (key, _, label), tag in zip(axes[1:], NETS, "bc"):
    records = nets[key]["records"]
    steps = [r["step"] for r in records]
    ax.fill_between(steps, [r["p15"] for r in records], [r["p85"] for r in records], color="C0", alpha=0.15)
    for p, style in zip(PERCENTILES, (":", "-", "--")):
      ax.plot(steps, [r[f"p{p}"] for r in records], style, color="C0", label=f"{p}th percentile")
    suffix = f" ({bn_stats} statistics)" if key == "bn" else ""
    ax.set(title=f"({tag}) sigmoid input, {label}{suffix}", xlabel="step", ylabel=f"{LAYER} unit {unit} input")
  lows = [min(r["p15"] for r in nets[k]["records"]) for k, _, _ in NETS]
  highs = [max(r["p85"] for r in nets[k]["records"]) for k, _, _ in NETS]
  pad = 0.05 * (max(highs) - min(lows) or 1.0)
  for ax in axes[1:]:
    ax.set_ylim(min(lows) - pad, max(highs) + pad)  # the same scale, so the two drifts compare by eye
  handles, labels = axes[1].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside lower right", ncol=3, fontsize=9)
  fig.suptitle(title)
  common.save_figure(fig, path)


def main(argv):
  del argv
  common.quiet_logs()
  config = config_lib.select(CONFIG.value, KEYS)
  try:
    validate(config)
  except ValueError as e:
    sys.exit(f"error: {e}")
  start = time.perf_counter()
  dataset, note = load_dataset(config["dataset"], config["data_dir"], config["download"])
  if config["batch"] > len(dataset.train):
    sys.exit(f"error: {KEYS['batch']} {config['batch']} is larger than the training set ({len(dataset.train)} "
             "examples)")
  print(f"data: {dataset.source} | train {len(dataset.train)}, test {len(dataset.test)}, image "
        f"{dataset.image_shape}", flush=True)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  common.write_json(os.path.join(FLAGS.workdir, "config.json"),
                    config_lib.to_json_dict(CONFIG.value, "batchnorm_mnist"))

  nets = {}
  epochs = config["steps"] * config["batch"] / len(dataset.train)
  for key, batchnorm, label in NETS:
    print(f"== {label}: {config['steps']} steps of {config['batch']} ({epochs:.2f} epochs), {config['optimizer']} "
          f"lr {config['learning_rate']:g}, N(0, {config['init_scale']:g}^2) init ==", flush=True)
    nets[key] = train_net(key, batchnorm, config, dataset, FLAGS.workdir)

  result = verdict(nets, config["steps"])
  dataset_name = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "synthetic": "synthetic"}[dataset.name]
  title = (f"Ioffe & Szegedy 2015 Fig. 1 on {dataset_name}"
           + (" (MNIST not available)" if note and config["dataset"] == "mnist" else "")
           + f": 3x100 sigmoid MLP, N(0, {config['init_scale']:g}^2) init, {config['optimizer']} "
           f"lr {config['learning_rate']:g}, batch {config['batch']}")
  plot(nets, title, config["unit"], os.path.join(FLAGS.workdir, "fig1.png"), config["percentile_bn"])

  header = ["step"] + [f"{name} {label}" for _, _, label in NETS
                       for name in ("acc", "p15", "p50", "p85")]
  rows = [[p["step"]] + [r[k] for r in (p, b) for k in ("test_accuracy", "p15", "p50", "p85")]
          for p, b in zip(nets["no_bn"]["records"], nets["bn"]["records"])]
  common.write_csv(os.path.join(FLAGS.workdir, "results.csv"),
                   ["net", "batchnorm", "step", "test_accuracy", "test_loss", "p15", "p50", "p85"],
                   [[key, nets[key]["batchnorm"], r["step"], r["test_accuracy"], r["test_loss"], r["p15"], r["p50"],
                     r["p85"]] for key, _, _ in NETS for r in nets[key]["records"]])
  over = {"batch": "the test set's own statistics (one batch)", "running": "its running averages (eval mode)"}[
      config["percentile_bn"]]
  results = {
      "dataset": dataset.name, "requested_dataset": config["dataset"], "data_source": dataset.source,
      "data_note": note, "layer": LAYER, "unit": config["unit"],
      "percentiles_over": f"test set ({len(dataset.test)} examples); BatchNorm with {over}", "steps": config["steps"],
      "final_test_accuracy": {key: nets[key]["final_test_accuracy"] for key, _, _ in NETS},
      "nets": nets, "verdict": result, "wall_time_s": time.perf_counter() - start, "config": config,
  }
  common.write_json(os.path.join(FLAGS.workdir, "results.json"), results)

  print(f"\n== test accuracy and {LAYER} unit {config['unit']} sigmoid-input percentiles ({dataset_name}; BN with "
        f"{over}) ==")
  print(common.format_table(header, rows))
  if note:
    print(f"\nNOTE: {note}")
  print("\n" + "\n".join(result["text"]))
  print(f"\nwrote {FLAGS.workdir}/results.json, results.csv, fig1.png ({results['wall_time_s']:.0f} s)")


CONFIG = None


def define_flags() -> None:
  """Defines the flags; called by `run` only, so importing this module (tests) clashes with no other binary."""
  global CONFIG
  CONFIG = config_lib.define_config_flag("batchnorm_mnist", "batchnorm_mnist.py")
  flags.DEFINE_string("workdir", "runs/batchnorm_mnist", "Where results and plots are written.")


def run():
  define_flags()
  common.run_main(main, __name__)


if __name__ == "__main__":
  run()
