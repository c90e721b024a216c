r"""ReLU vs tanh training speed (Krizhevsky et al. 2012, Fig. 1): epochs to 25% training error on CIFAR-10.

The claim: a four-layer conv net with ReLUs reaches 25% training error on CIFAR-10 six times faster than the same
net with tanh (learning rates chosen separately for each, no regularisation). This binary trains the four-layer
CIFAR ConvNet (`cifar_convnet`) with each of study.activations from the same init family and, per seed, the same
initial-weights key and the same data order; no dropout, weight decay or penalty. Each activation's learning rate
is the one of study.lr_grid with the lowest training error after study.sweep_epochs (seed `seed`). Then
study.seeds runs per activation log the training error after every epoch: the error of the model in eval mode
over the whole (data.subset) training set, measured the same way for every activation.

  python -m experiments.relu_vs_tanh --config.data.data_dir=/tmp/cifar10_proxy --workdir=runs/relu_vs_tanh
  python -m experiments.relu_vs_tanh --config.data.data_dir=/tmp/cifar10_proxy --config.data.subset=10000 \
      --config.study.max_epochs=20 --config.study.sweep_epochs=1 --config.study.stop_at_target \
      --workdir=runs/relu_vs_tanh_quick

Config: experiments/configs/relu_vs_tanh.py (keys: configs/schema.py); override with --config.group.key=value.

Writes to --workdir: config.json, results.json, curves.csv (training error per activation, seed and epoch),
sweep.csv, training_error.png (the paper's figure: solid for the first activation, dashed for the second, a line
at the target) and lr_sweep.png; and runs/<activation>_seed<s>_lr<lr>/ per run, each with config.json,
curve.json, metrics.jsonl, tensorboard/ and checkpoints/ (saved at every epoch end). Running the command again
skips finished runs and resumes unfinished ones from their last epoch; the runs do not depend on
study.max_epochs, study.target_error, study.lr_grid or study.seeds, so changing those reuses every compatible run
(a longer study.max_epochs continues the old runs). A run that differs in anything that changes its computation
is refused unless --overwrite (which discards every run in --workdir).

results.json: `speedup` is the mean over seeds of (epochs to target of the second activation) / (epochs to
target of the first), seed i paired with seed i, and `speedup_std` its std over seeds (ddof=1). `speedup_kind`
says what it is: 'exact' when every run reached the target; 'lower_bound' when some runs of the second activation
never did (they count as the epochs they ran + 1, so the true ratio is at least this; their best error is
reported); 'upper_bound' when only runs of the first activation missed it; null with 'undetermined' when both runs
of a seed missed it or bounds of both directions mix. The same holds per activation for `epochs_to_target_mean`
(`epochs_kind`). Seconds to target count training steps only (no compile, evaluation or checkpoint time) and
depend on the machine's load; epochs and steps do not.
"""

import dataclasses
import json
import math
import os
import shutil
import sys
import time

from absl import flags
import numpy as np

from dlcore import activations, checkpoint, checks, data, initializers, loop, optim, parallel, summaries, train
from . import common, config_lib, train_lib
from .configs import schema

PAPER_SPEEDUP = 6.0
LINESTYLES = ("-", "--", ":", "-.")

FLAGS = flags.FLAGS


# ---------------------------------------------------------------------------------------------------------------
# Settings.


def _floats(flag: str, items) -> list[float]:
  values = []
  for item in items:
    try:
      value = float(item)
    except (TypeError, ValueError):
      raise ValueError(f"{flag} entry {item!r} is not a number") from None
    checks.positive(f"{flag} entry", value)
    values.append(value)
  if not values:
    raise ValueError(f"{flag} must list at least one value")
  if len(set(values)) != len(values):
    raise ValueError(f"{flag} lists a value twice: {list(items)}")
  return values


# The study's own names for its config keys (configs/schema.py).
KEYS = {
    "activations": "study.activations",
    "init": "model.init",
    "lr_grid": "study.lr_grid",
    "sweep_epochs": "study.sweep_epochs",
    "target_error": "study.target_error",
    "dataset": "data.dataset",
    "data_dir": "data.data_dir",
    "subset": "data.subset",
    "preprocess": "data.preprocess",
    "max_epochs": "study.max_epochs",
    "batch": "loop.batch_size",
    "optimizer": "optimizer.name",
    "momentum": "optimizer.momentum",
    "stop_at_target": "study.stop_at_target",
    "resident": "data.resident",
    "steps_per_call": "loop.steps_per_call",
}


def validate(study: dict) -> dict:
  """The study settings, normalised and checked with errors that name the config key (seeds: the list of seeds)."""
  study = dict(study)
  acts = [a.strip().lower() for a in study["activations"] if a.strip()]
  if not acts:
    raise ValueError("study.activations must name at least one activation")
  for name in acts:
    if name not in activations.NAMES:
      raise ValueError(f"study.activations: unknown activation {name!r}; valid names: {', '.join(activations.NAMES)}")
  if len(set(acts)) != len(acts):
    raise ValueError(f"study.activations lists an activation twice: {study['activations']}")
  study["activations"] = acts
  study["lr_grid"] = _floats("study.lr_grid", study["lr_grid"])
  checks.one_of("model.init", study["init"], initializers.NAMES)
  checks.one_of("data.dataset", study["dataset"], data.NAMES)
  checks.one_of("data.preprocess", study["preprocess"], data.preprocess.METHODS)
  checks.one_of("optimizer.name", study["optimizer"], optim.OPTIMIZERS)
  for name in ("sweep_epochs", "max_epochs", "batch"):
    checks.positive(f"{KEYS[name]}", study[name])
  checks.non_negative("data.subset", study["subset"])
  checks.non_negative("loop.steps_per_call", study["steps_per_call"])
  if not study["seeds"] or min(study["seeds"]) < 0:
    raise ValueError(f"seed must be >= 0 and study.seeds >= 1, got seeds {study['seeds']}")
  checks.in_range("study.target_error", study["target_error"], 0.0, 1.0, low_open=True, high_open=True)
  checks.in_range("optimizer.momentum", study["momentum"], 0.0, 1.0, high_open=True)
  if (study["optimizer"] not in ("momentum", "momentum_ema", "nesterov")
      and study["momentum"] != schema.relu_vs_tanh().optimizer.momentum):
    raise ValueError(f"optimizer.momentum={study['momentum']!r} has no effect: optimizer.name is "
                     f"{study['optimizer']!r}")
  if study["subset"] and study["batch"] > study["subset"]:
    raise ValueError(f"loop.batch_size {study['batch']} is larger than data.subset {study['subset']}")
  if study["dataset"] == "synthetic" and study["data_dir"] is not None:
    raise ValueError(f"data.data_dir must be unset for data.dataset=synthetic (it is generated), got "
                     f"{study['data_dir']!r}")
  return study


def study_from_config(config) -> dict:
  """The study's flat settings (KEYS, plus the list of seeds) from its ConfigDict, validated."""
  checks.positive("study.seeds", config.study.seeds)
  checks.non_negative("seed", config.seed)
  study = config_lib.select(config, KEYS)
  study["activations"], study["lr_grid"] = list(study["activations"]), list(study["lr_grid"])
  study["seeds"] = list(range(config.seed, config.seed + config.study.seeds))
  return validate(study)


def run_config(study: dict, activation: str, seed: int, lr: float):
  """One run's settings as a trainer config: everything that changes what it computes.

  Every key that build_state reads is pinned here, so a change of the trainer's defaults cannot change a run.
  """
  config = schema.train()
  config.seed = seed
  config.data.update(dataset=study["dataset"], data_dir=study["data_dir"], subset=study["subset"],
                     preprocess=study["preprocess"], augment="", validation_size=0, resident=study["resident"])
  config.model.update(name="cifar_convnet", activation=activation, init=study["init"], init_scale=None,
                      batchnorm="none", keep_prob=1.0)  # no regularisation, as in the paper's comparison
  config.loss.update(name="cross_entropy", label_smoothing=0.0, penalty="none", penalty_strength=0.0)
  config.optimizer.update(name=study["optimizer"], learning_rate=lr, momentum=study["momentum"], weight_decay=0.0,
                          weight_decay_mode="decoupled", clip_norm=None)
  config.schedule.name = "constant"
  config.loop.update(batch_size=study["batch"], steps_per_call=study["steps_per_call"])
  return config


def run_name(activation: str, seed: int, lr: float) -> str:
  return f"{activation}_seed{seed}_lr{lr:g}"


# ---------------------------------------------------------------------------------------------------------------
# Data, loaded only when some run has to train.


class LazyData:
  """Loads, cuts to data.subset and preprocesses the dataset on first use."""

  def __init__(self, study: dict, log):
    self._study, self._log, self._dataset = study, log, None
    self.total_train = None

  def get(self) -> data.Dataset:
    if self._dataset is None:
      s = self._study
      start = time.perf_counter()
      dataset = data.load(s["dataset"], data_dir=s["data_dir"], validation_size=0)
      self.total_train = len(dataset.train)
      n = s["subset"] or self.total_train
      if n > self.total_train:
        raise ValueError(f"data.subset {n} exceeds the {self.total_train} training examples of {s['dataset']}")
      if s["batch"] > n:
        raise ValueError(f"loop.batch_size {s['batch']} is larger than the training set ({n} examples)")
      train_split = data.Split(dataset.train.images[:n], dataset.train.labels[:n])
      dataset = dataclasses.replace(dataset, train=train_split, validation=None)
      if s["preprocess"] != "none":
        dataset, _ = data.preprocess.preprocess_dataset(dataset, s["preprocess"])
      self._dataset = dataset
      self._log(f"data: {dataset.source} | training on the first {n} of {self.total_train} training examples, "
                f"image {dataset.image_shape}, preprocess {s['preprocess']} "
                f"(loaded in {time.perf_counter() - start:.1f} s)")
    return self._dataset


def data_title(source: str) -> str:
  """'CIFAR-10 (JPEG q75 proxy)' from the dataset's source string."""
  return source.split(" from ")[0].split(":")[0].strip()


# ---------------------------------------------------------------------------------------------------------------
# One run: train epoch by epoch, evaluate the training error, checkpoint; skip when done, resume when not.


def reached(record: dict, target: float) -> bool:
  return not record["diverged"] and record["train_error"] <= target


def finished(records: list[dict], epochs: int, stop_at_target: bool, target: float) -> bool:
  """Whether `records` already answer a request for `epochs` epochs."""
  records = records[:epochs]
  return (len(records) >= epochs or any(r["diverged"] for r in records)
          or (stop_at_target and any(reached(r, target) for r in records)))


def _compiled(cache: dict, config: dict, dataset: data.Dataset, state, mesh, batches, eval_batches):
  """(apply_fn, tx, train step, eval step, jitted train step) for the run's settings, compiled once for every seed.

  `cache` (one per study, made by `run_study`) maps model/optimiser settings and shapes to those five (the
  jitted step is what the device-resident path inlines into its own program).

  Runs that differ only in the seed or the data build equal models and optimisers; giving their states the first
  run's `apply_fn` and `tx` objects (static fields, part of the compiled functions' signature) lets the
  ahead-of-time compiled steps serve every seed, and keeps compile time out of the timings.
  """
  data_only = ("seed", "data.dataset", "data.data_dir", "data.subset", "data.preprocess")  # values, not code
  key = (json.dumps({k: v for k, v in config_lib.flat(config).items() if k not in data_only}, sort_keys=True),
         dataset.image_shape,
         dataset.num_classes, mesh.size)
  if key not in cache:
    put = lambda batch: parallel.shard_batch(batch, mesh)
    step_fn = parallel.compile_train_step(train.make_train_step("cross_entropy"), mesh, state)
    eval_fn = parallel.compile_eval_step(train.make_eval_step("cross_entropy"), mesh)
    cache[key] = (state.apply_fn, state.tx, step_fn.lower(state, put(batches.batch_at(0))).compile(),
                  eval_fn.lower(state, put(eval_batches.batch_at(0))).compile(), step_fn)
  return cache[key]


def train_run(study: dict, activation: str, seed: int, lr: float, epochs: int, stop_at_target: bool,
              run_dir: str, lazy_data: LazyData, log, label: str, compiled: dict) -> dict:
  """Trains (or resumes, or reuses) one run to `epochs` epochs; returns its curve.json dict, cut to `epochs`."""
  config = run_config(study, activation, seed, lr)
  target = study["target_error"]
  train_lib.check_workdir(run_dir, config, overwrite=False)
  curve_path = os.path.join(run_dir, "curve.json")
  curve = None
  if os.path.exists(curve_path):
    with open(curve_path) as f:
      curve = json.load(f)
  if curve is not None and finished(curve["records"], epochs, stop_at_target, target):
    log(f"{label}: finished before ({len(curve['records'])} epochs logged); reusing it")
    return {**curve, "records": curve["records"][:epochs]}

  dataset = lazy_data.get()
  mesh = parallel.make_mesh(None)
  parallel.check_batch_size(config.loop.batch_size, mesh)
  steps_per_epoch, _ = train_lib.plan_steps(config, len(dataset.train))
  batches = data.TrainBatches(dataset.train, config.loop.batch_size, seed=seed)
  eval_batches = data.EvalBatches(dataset.train, config.loop.batch_size)
  put = lambda batch: parallel.shard_batch(batch, mesh)
  start = time.perf_counter()
  state = parallel.replicate(train_lib.build_state(config, dataset, batches.batch_at(0)["image"]), mesh)
  apply_fn, tx, step_fn, eval_fn, jitted_step = _compiled(compiled, config, dataset, state, mesh, batches,
                                                           eval_batches)
  state = state.replace(apply_fn=apply_fn, tx=tx)
  source = train_lib.training_source(batches, mesh, resident=config.data.resident,
                                     steps_per_call=config.loop.steps_per_call, log=lambda m: log(f"{label}: {m}"))
  if source is not batches:
    source.compile(jitted_step, state)
    log(f"{label}: device-resident data: {source.steps_per_call} step(s) per call ({source.why})")
  compile_seconds = time.perf_counter() - start

  ckpt = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), keep=1, keep_best=False,
                                 best_metric="train_error", best_mode="min")
  writer = summaries.MetricWriter(run_dir)
  records = []
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)
    records = meta["records"]
    writer.truncate_after(int(state.step))
    log(f"{label}: resumed from epoch {len(records)} (step {int(state.step)})")
  common.write_json(os.path.join(run_dir, "config.json"), config_lib.to_json_dict(config, train_lib.BINARY))
  curve = {"config": config.to_dict(), "data_source": dataset.source, "train_examples": len(dataset.train),
           "train_examples_total": lazy_data.total_train, "steps_per_epoch": steps_per_epoch,
           "compile_seconds": compile_seconds, "records": records}

  session_start, session_epochs = time.perf_counter(), 0
  for epoch in range(len(records) + 1, epochs + 1):
    t0 = time.perf_counter()
    loss_sum, step, end = None, (epoch - 1) * steps_per_epoch, epoch * steps_per_epoch
    if source is not batches:  # device-resident: up to K steps per call, the same batches and sums
      sums = None
      while step < end:
        calls = min(source.steps_per_call, end - step)
        state, sums = source.run(jitted_step, state, sums, step, calls)
        step += calls
      loss_sum = sums["loss"]
    for step in range(step, end):
      state, metrics = step_fn(state, put(batches.batch_at(step)))
      loss_sum = metrics["loss"] if loss_sum is None else loss_sum + metrics["loss"]
    step_loss = float(loss_sum) / steps_per_epoch  # waits for the last step
    train_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    ev = loop.evaluate(state, eval_fn, eval_batches, put)
    eval_seconds = time.perf_counter() - t1
    diverged = not (math.isfinite(step_loss) and math.isfinite(ev["loss"]))
    previous = records[-1]["cum_train_seconds"] if records else 0.0
    record = {"epoch": epoch, "step": epoch * steps_per_epoch, "train_error": 1.0 - ev["accuracy"],
              "train_loss": ev["loss"], "step_loss": step_loss, "diverged": diverged,
              "train_seconds": train_seconds, "eval_seconds": eval_seconds,
              "cum_train_seconds": previous + train_seconds,
              "images_per_sec": steps_per_epoch * config.loop.batch_size / train_seconds}
    records.append(record)
    if not diverged:
      ckpt.save(state, metrics={"train_error": record["train_error"]}, metadata={"records": records}, force=True)
    writer.write(record["step"], "train_eval", {k: record[k] for k in ("train_error", "train_loss", "step_loss",
                                                                       "images_per_sec")})
    common.write_json(curve_path, curve)
    session_epochs += 1
    per_epoch = (time.perf_counter() - session_start) / session_epochs
    log(f"{label}  epoch {epoch}/{epochs}  train error {record['train_error']:.4f}  loss {record['train_loss']:.4f}"
        f"  {record['images_per_sec']:.0f} img/s  ETA {loop.format_eta(per_epoch * (epochs - epoch))}"
        + ("  DIVERGED (non-finite loss): stopping this run" if diverged else ""))
    if diverged or (stop_at_target and reached(record, target)):
      break
  ckpt.close()
  writer.close()
  return {**curve, "records": records[:epochs]}


# ---------------------------------------------------------------------------------------------------------------
# Analysis: epochs to target, ratios with bounds.


def epochs_to_target(records: list[dict], target: float) -> int | None:
  """The first epoch whose logged training error is <= target (None when none is)."""
  return next((r["epoch"] for r in records if reached(r, target)), None)


def seed_ratio(other: dict, ref: dict) -> tuple[float | None, str]:
  """(other's epochs / ref's epochs, kind) for one seed; a run that missed the target counts as trained + 1."""
  o, r = other["epochs_to_target"], ref["epochs_to_target"]
  if o is not None and r is not None:
    return o / r, "exact"
  if r is not None:
    return (other["epochs_trained"] + 1) / r, "lower_bound"
  if o is not None:
    return o / (ref["epochs_trained"] + 1), "upper_bound"
  return None, "undetermined"


def aggregate(values: list[float | None], kinds: list[str]) -> dict:
  """Mean and std (ddof=1; null for one value) of per-seed values whose kinds are exact / lower / upper bounds."""
  kind_set = set(kinds)
  if "undetermined" in kind_set or {"lower_bound", "upper_bound"} <= kind_set:
    kind = "undetermined"
  else:
    kind = next((k for k in ("lower_bound", "upper_bound") if k in kind_set), "exact")
  if kind == "undetermined":
    return {"mean": None, "std": None, "kind": kind}
  std = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return {"mean": float(np.mean(values)), "std": std, "kind": kind}


def summarize_run(curve: dict, activation: str, seed: int, lr: float, target: float, run_dir: str) -> dict:
  records = curve["records"]
  epochs = epochs_to_target(records, target)
  valid = [r for r in records if not r["diverged"]] or records
  best = min(valid, key=lambda r: (r["train_error"], r["epoch"]))
  hit = records[epochs - 1] if epochs else None
  return {"activation": activation, "seed": seed, "learning_rate": lr, "epochs_trained": len(records),
          "reached_target": epochs is not None, "epochs_to_target": epochs,
          "steps_to_target": hit["step"] if hit else None,
          "seconds_to_target": hit["cum_train_seconds"] if hit else None,
          "best_train_error": best["train_error"], "best_epoch": best["epoch"],
          "final_train_error": records[-1]["train_error"], "diverged": any(r["diverged"] for r in records),
          "steps_per_epoch": curve["steps_per_epoch"], "run_dir": run_dir}


def summarize_activation(runs: list[dict]) -> dict:
  """Epochs / steps / seconds to target over seeds; unreached runs count as epochs_trained + 1 (a lower bound)."""
  epochs = [r["epochs_to_target"] if r["reached_target"] else r["epochs_trained"] + 1 for r in runs]
  kinds = ["exact" if r["reached_target"] else "lower_bound" for r in runs]
  stats = aggregate(epochs, kinds)
  steps = aggregate([e * r["steps_per_epoch"] for e, r in zip(epochs, runs)], kinds)
  all_reached = all(r["reached_target"] for r in runs)
  seconds = aggregate([r["seconds_to_target"] for r in runs], kinds) if all_reached else None
  return {"learning_rate": runs[0]["learning_rate"], "seeds": [r["seed"] for r in runs],
          "epochs_to_target": [r["epochs_to_target"] for r in runs],
          "steps_to_target": [r["steps_to_target"] for r in runs],
          "seconds_to_target": [r["seconds_to_target"] for r in runs],
          "reached": sum(r["reached_target"] for r in runs), "runs": len(runs),
          "epochs_to_target_mean": stats["mean"], "epochs_to_target_std": stats["std"], "epochs_kind": stats["kind"],
          "steps_to_target_mean": steps["mean"], "steps_to_target_std": steps["std"],
          "seconds_to_target_mean": seconds["mean"] if seconds else None,
          "seconds_to_target_std": seconds["std"] if seconds else None,
          "best_train_error": [r["best_train_error"] for r in runs]}


def summarize_speedup(other_runs: list[dict], ref_runs: list[dict]) -> dict:
  per_seed = []
  for o, r in zip(other_runs, ref_runs):
    ratio, kind = seed_ratio(o, r)
    per_seed.append({"seed": o["seed"], "ratio": ratio, "kind": kind})
  stats = aggregate([p["ratio"] for p in per_seed], [p["kind"] for p in per_seed])
  return {"ratio_of": f"{other_runs[0]['activation']}/{ref_runs[0]['activation']} epochs to target",
          "mean": stats["mean"], "std": stats["std"], "kind": stats["kind"], "per_seed": per_seed}


def _pm(mean, std, digits=1) -> str:
  if mean is None:
    return "n/a"
  return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _judgement(sp: dict) -> str:
  """How a relu-vs-tanh ratio (mean and kind) compares with the paper's ~6x."""
  m, kind = sp["mean"], sp["kind"]
  every = all(p["ratio"] is not None and p["ratio"] > 1 for p in sp["per_seed"])
  seeds = " ReLU was faster on every seed." if every else ""
  if kind == "exact":
    if m <= 1:
      return "This does not reproduce the claim: ReLU was not faster."
    if m < PAPER_SPEEDUP / 1.5:
      return f"This reproduces the direction of the claim with a smaller factor than the paper's ~6x.{seeds}"
    if m <= PAPER_SPEEDUP * 1.5:
      return f"This agrees with the paper's ~6x.{seeds}"
    return f"ReLU was faster by more than the paper's ~6x.{seeds}"
  if kind == "lower_bound" and m > 1:
    tail = ("consistent with the paper's ~6x or more" if m >= PAPER_SPEEDUP
            else "whether by ~6x needs longer tanh runs (raise study.max_epochs)")
    return (f"Some tanh runs never reached the target, so {m:.2f} is a lower bound: ReLU was faster"
            f"{' on every seed' if every else ''}; {tail}.")
  if kind == "upper_bound" and m < 1:
    return "This does not reproduce the claim: tanh reached the target where ReLU did not."
  return "This is inconclusive: raise study.max_epochs."


def verdict(results: dict) -> str:
  """One paragraph: the data, the setting, epochs to target, the ratio and how it compares with the paper's."""
  s, acts, target = results["settings"], results["settings"]["activations"], results["target_error"]
  per_act = results["activations"]
  lrs = ", ".join(f"{a} {per_act[a]['learning_rate']:g}" for a in acts)
  text = [f"Data: {results['data']}. The four-layer CIFAR ConvNet (Krizhevsky et al. 2012 Fig. 1; no LRN, no "
          f"regularisation), {s['init']} init for all, {s['optimizer']} (momentum {s['momentum']:g}), batch "
          f"{s['batch']}, learning rates from a {s['sweep_epochs']}-epoch sweep over {s['lr_grid']}: {lrs}."]
  for a in acts:
    st = per_act[a]
    each = ", ".join("not reached" if e is None else str(e) for e in st["epochs_to_target"])
    if st["reached"] == st["runs"]:
      mean = _pm(st["epochs_to_target_mean"], st["epochs_to_target_std"])
      text.append(f"{a} reached {target:.0%} training error after {mean} epochs (seeds {st['seeds']}: {each}).")
    else:
      best = ", ".join(f"{e:.3f}" for e in st["best_train_error"])
      text.append(f"{a} reached {target:.0%} in {st['reached']} of {st['runs']} runs within {s['max_epochs']} "
                  f"epoch{'s' * (s['max_epochs'] != 1)} (seeds {st['seeds']}: {each}; best training errors {best}).")
  if len(acts) >= 2:
    ref, other = acts[0], acts[1]
    sp = results["speedups"][other]
    per_seed = ", ".join("n/a" if p["ratio"] is None else f"{p['ratio']:.2f}" for p in sp["per_seed"])
    if sp["kind"] == "undetermined":
      text.append(f"The {other}/{ref} ratio of epochs to target is undetermined (per seed: {per_seed}): the target "
                  f"was not reached by both; raise study.max_epochs or study.target_error.")
    else:
      bound = {"exact": "", "lower_bound": "at least ", "upper_bound": "at most "}[sp["kind"]]
      text.append(f"{ref} got there {bound}{_pm(sp['mean'], sp['std'], 2)} times faster in epochs than {other} "
                  f"(mean ± std over seeds, per seed {per_seed}).")
      if (ref, other) == ("relu", "tanh"):
        text.append(_judgement(sp))
        subset = results["train_examples"] < results["train_examples_total"]
        text.append("Caveats: " + (f"epochs here are passes over {results['train_examples']} examples, not the "
                                   f"paper's {results['train_examples_total']}; " if subset else "")
                    + f"the paper's net had local response normalisation and hand-set rates; "
                    f"{len(s['seeds'])} seed(s).")
  return " ".join(text)


# ---------------------------------------------------------------------------------------------------------------
# Outputs.


def plot_curves(results: dict, curves: dict, path: str) -> None:
  """Training error vs epochs: first activation solid, second dashed (then dotted, dash-dot), target line."""
  acts = results["settings"]["activations"]
  fig, ax = common.plt.subplots(figsize=(7, 5), layout="constrained")
  for i, act in enumerate(acts):
    lr = results["activations"][act]["learning_rate"]
    for j, seed in enumerate(results["settings"]["seeds"]):
      records = curves[(act, seed)]
      ax.plot([r["epoch"] for r in records], [r["train_error"] for r in records], LINESTYLES[i % len(LINESTYLES)],
              color=f"C{j}" if len(acts) <= 2 else f"C{i}", marker=".", markersize=4,
              label=f"{act} (lr {lr:g}), seed {seed}")
  ax.axhline(results["target_error"], color="gray", linewidth=1, linestyle=":",
             label=f"target {results['target_error']:g}")
  ax.set(xlabel="epochs", ylabel="training error", ylim=(0, None), xlim=(0, None),
         title=f"Four-layer ConvNet, {results['data_title']}, {results['train_examples']} training examples")
  ax.legend(fontsize=8)
  common.save_figure(fig, path)


def plot_sweep(results: dict, path: str) -> None:
  fig, ax = common.plt.subplots(figsize=(6, 4), layout="constrained")
  for i, act in enumerate(results["settings"]["activations"]):
    rows = sorted(results["sweep"][act], key=lambda r: r["learning_rate"])
    ax.plot([r["learning_rate"] for r in rows], [1.0 if r["diverged"] else r["train_error"] for r in rows],
            LINESTYLES[i % len(LINESTYLES)], marker="o", label=act)
    chosen = results["activations"][act]["learning_rate"]
    ax.plot([chosen], [next(r["train_error"] for r in rows if r["learning_rate"] == chosen)], "k*", markersize=12)
  ax.set(xscale="log", xlabel="learning rate", ylabel=f"training error after {results['settings']['sweep_epochs']} "
         "epoch(s)", title="learning-rate sweep (star: chosen; diverged plotted at 1)")
  ax.legend()
  common.save_figure(fig, path)


def run_study(study: dict, workdir: str, *, overwrite: bool = False, log=print) -> dict:
  """The sweep, the seeded runs and the analysis; writes every output to `workdir` and returns results.json's dict.

  `study` holds the study's settings (see `validate`; `seeds` is the list of seeds).
  """
  study = validate(study)
  runs_dir = os.path.join(workdir, "runs")
  if overwrite and os.path.isdir(runs_dir):
    shutil.rmtree(runs_dir)
  os.makedirs(workdir, exist_ok=True)
  common.write_json(os.path.join(workdir, "settings.json"), study)
  lazy_data = LazyData(study, log)
  compiled = {}  # compiled steps shared by the runs of this study (see _compiled)
  acts, seeds, grid, target = study["activations"], study["seeds"], study["lr_grid"], study["target_error"]
  sweep_seed = seeds[0]
  total = len(acts) * len(grid) + len(acts) * len(seeds)
  counter = iter(range(1, total + 1))
  curves_by_dir = {}

  def run(act, seed, lr, epochs, stop, phase):
    run_dir = os.path.join(runs_dir, run_name(act, seed, lr))
    label = f"[{next(counter)}/{total} {phase}] {act} seed {seed} lr {lr:g}"
    curve = train_run(study, act, seed, lr, epochs, stop, run_dir, lazy_data, log, label, compiled)
    curves_by_dir[run_dir] = curve
    return run_dir, curve

  # 1. Learning-rate sweep on the first seed: lowest training error after sweep_epochs (diverged runs lose).
  sweep, chosen = {}, {}
  for act in acts:
    rows = []
    for lr in grid:
      _, curve = run(act, sweep_seed, lr, study["sweep_epochs"], False, "sweep")
      last = curve["records"][-1]
      rows.append({"learning_rate": lr, "train_error": last["train_error"], "epochs": len(curve["records"]),
                   "diverged": last["diverged"]})
    sweep[act] = rows
    ok = [r for r in rows if not r["diverged"]]
    if not ok:
      raise ValueError(f"every study.lr_grid rate {grid} diverged for activation {act!r}; use smaller rates")
    chosen[act] = min(ok, key=lambda r: (r["train_error"], r["learning_rate"]))["learning_rate"]
    log(f"learning rate for {act}: {chosen[act]:g} (training error after {study['sweep_epochs']} epoch(s): "
        + ", ".join(f"{r['learning_rate']:g}: {'diverged' if r['diverged'] else format(r['train_error'], '.4f')}"
                    for r in rows) + ")")

  # 2. The seeded runs, paired by seed (the first seed continues its sweep run).
  runs, curves = [], {}
  for seed in seeds:
    for act in acts:
      run_dir, curve = run(act, seed, chosen[act], study["max_epochs"], study["stop_at_target"], "main")
      runs.append(summarize_run(curve, act, seed, chosen[act], target, os.path.relpath(run_dir, workdir)))
      curves[(act, seed)] = curve["records"]

  first = next(iter(curves_by_dir.values()))
  source, n = first["data_source"], first["train_examples"]
  title = data_title(source)
  results = {
      "claim": ("Krizhevsky et al. 2012 Fig. 1: a four-layer CNN with ReLUs reaches 25% training error on "
                "CIFAR-10 six times faster than the same network with tanh"),
      "data": f"{title}, first {n} of {first['train_examples_total']} training examples" if n != first[
          "train_examples_total"] else f"{title}, all {n} training examples",
      "data_title": title, "data_source": source, "train_examples": n,
      "train_examples_total": first["train_examples_total"],
      "steps_per_epoch": first["steps_per_epoch"], "target_error": target, "settings": study,
      "learning_rates": chosen, "sweep": sweep, "runs": runs,
      "activations": {a: summarize_activation([r for r in runs if r["activation"] == a]) for a in acts},
      "reference": acts[0], "paper_speedup": PAPER_SPEEDUP,
  }
  results["speedups"] = {a: summarize_speedup([r for r in runs if r["activation"] == a],
                                              [r for r in runs if r["activation"] == acts[0]]) for a in acts[1:]}
  main = results["speedups"].get(acts[1]) if len(acts) > 1 else None
  results["speedup"] = main["mean"] if main else None
  results["speedup_std"] = main["std"] if main else None
  results["speedup_kind"] = main["kind"] if main else None
  results["verdict"] = verdict(results)

  header = ["activation", "seed", "learning_rate", "epoch", "step", "train_error", "train_loss", "step_loss",
            "cum_train_seconds", "diverged"]
  rows = [[a, s, chosen[a], r["epoch"], r["step"], r["train_error"], r["train_loss"], r["step_loss"],
           r["cum_train_seconds"], r["diverged"]] for (a, s), recs in curves.items() for r in recs]
  common.write_csv(os.path.join(workdir, "curves.csv"), header, rows)
  sweep_rows = []
  for a in acts:
    for lr in grid:
      recs = curves_by_dir[os.path.join(runs_dir, run_name(a, sweep_seed, lr))]["records"][:study["sweep_epochs"]]
      sweep_rows += [[a, sweep_seed, lr, r["epoch"], r["train_error"], r["diverged"]] for r in recs]
  common.write_csv(os.path.join(workdir, "sweep.csv"),
                   ["activation", "seed", "learning_rate", "epoch", "train_error", "diverged"], sweep_rows)
  plot_curves(results, curves, os.path.join(workdir, "training_error.png"))
  plot_sweep(results, os.path.join(workdir, "lr_sweep.png"))
  common.write_json(os.path.join(workdir, "results.json"), results)
  return results


CONFIG = None


def define_flags() -> None:
  """Defines the flags; called by `run` only, so importing this module (tests) clashes with no other binary."""
  global CONFIG
  CONFIG = config_lib.define_config_flag("relu_vs_tanh", "relu_vs_tanh.py")
  flags.DEFINE_string("workdir", "runs/relu_vs_tanh", "Output folder; holds one sub-folder per run.")
  flags.DEFINE_bool("overwrite", False, "Discard every run in --workdir first.")


def main(argv):
  del argv
  common.quiet_logs()
  start = time.perf_counter()
  try:
    study = study_from_config(CONFIG.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  common.write_json(os.path.join(FLAGS.workdir, "config.json"), config_lib.to_json_dict(CONFIG.value, "relu_vs_tanh"))
  results = run_study(study, FLAGS.workdir, overwrite=FLAGS.overwrite,
                      log=lambda message: print(message, flush=True))
  rows = [[r["activation"], r["seed"], r["learning_rate"],
           "not reached" if r["epochs_to_target"] is None else r["epochs_to_target"],
           "-" if r["steps_to_target"] is None else r["steps_to_target"],
           "-" if r["seconds_to_target"] is None else r["seconds_to_target"], r["best_train_error"],
           r["epochs_trained"]] for r in results["runs"]]
  print("\n" + common.format_table(["activation", "seed", "lr", "epochs to target", "steps", "train seconds",
                                    "best train error", "epochs run"], rows))
  for act, sp in results["speedups"].items():
    print(f"{act}/{results['reference']} epochs to target: {_pm(sp['mean'], sp['std'], 2)} ({sp['kind']})")
  print(f"\n{results['verdict']}\n")
  print(f"wrote {FLAGS.workdir}/results.json, curves.csv, sweep.csv, training_error.png, lr_sweep.png "
        f"(this invocation took {time.perf_counter() - start:.0f} s)")


def run():
  define_flags()
  common.run_main(main, __name__)


if __name__ == "__main__":
  run()
