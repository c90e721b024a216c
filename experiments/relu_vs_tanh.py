r"""ReLU vs tanh training speed (Krizhevsky et al. 2012, Fig. 1): epochs to 25% training error on CIFAR-10, each
activation at the learning rate that gets it there fastest.

The claim: a four-layer conv net with ReLUs reaches 25% training error on CIFAR-10 six times faster than the same
net with tanh, "the learning rates for each network were chosen independently to make training as fast as
possible"; no regularisation. This binary trains the four-layer CIFAR ConvNet (`cifar_convnet`) with each of
study.activations. For one activation, every rate of study.lr_grid and every seed train together as one
population (`dlcore.population`): member (rate, seed) has that seed's initial-weights key and data order, the
same for every activation and rate. After each epoch every member's training error is measured over the whole
(data.subset) training set in eval mode; with study.stop_at_target a member that reaches study.target_error
stops there, and the population stops when every member has reached it or diverged, or at study.max_epochs.

The criterion is the paper's: each activation's rate is the one with the fewest epochs to the target (the mean
over seeds; a member that never reaches it counts as max_epochs + 1, a diverged one loses), ties going to the
lower final training error. When the best rate is the lowest or highest tried, the search widens: the rate one
grid step beyond (the grid's ratio at that end) trains as a new population, until the best rate is interior or
study.widen_rounds rounds are spent (results.json then says it lies at an edge).

model.init: an initializer for every layer (default lecun_normal), or cuda_convnet, the paper-era cuda-convnet
layers-18pct initial weights: normal with std 1e-4 for conv1 and 0.01 for conv2, conv3 and the classifier,
biases 0. Per-layer statistics at initialisation (init_stats.csv, results.json) show what an initialisation does
to each activation: on 256 training images at the first seed's initial weights, each layer's weight std, output
std, fraction of saturated (tanh |y| > 0.99) or dead (ReLU y = 0) units, and the std of the cross-entropy
gradient of its weights, also relative to the weights' std.

  python -m experiments.relu_vs_tanh --config.data.data_dir=/tmp/cifar10_proxy --workdir=runs/relu_vs_tanh
  python -m experiments.relu_vs_tanh --config.data.data_dir=/tmp/cifar10_proxy --config.data.subset=5000 \
      --config.model.init=cuda_convnet --config.study.max_epochs=15 --workdir=runs/relu_vs_tanh_cuda

Config: experiments/configs/relu_vs_tanh.py (keys: configs/schema.py); override with --config.group.key=value.

Writes to --workdir: config.json, results.json, curves.csv (training error per activation, rate, seed and epoch),
rates.csv (epochs to target per activation, rate and seed), init_stats.csv, training_error.png (the paper's
figure at the chosen rates: solid for the first activation, dashed for the second, a line at the target) and
lr_search.png (epochs to target, and the last training error, against the rate); and
runs/<activation>_round<r>/ per population, with round.json (its settings and every member's records) and
checkpoints/ (the population at every epoch end).
Running the command again reuses finished populations and resumes unfinished ones from their last epoch (a
longer study.max_epochs continues them); a population whose settings differ otherwise is refused unless
--overwrite (which discards every population in --workdir).

results.json: `speedup` is the mean over seeds of (epochs to target of the second activation) / (epochs to
target of the first), seed i paired with seed i, at each activation's chosen rate, and `speedup_std` its std over
seeds (ddof=1). `speedup_kind` says what it is: 'exact' when every run reached the target; 'lower_bound' when some
runs of the second activation never did (they count as the epochs they ran + 1, so the true ratio is at least
this; their best error is reported); 'upper_bound' when only runs of the first activation missed it; null with
'undetermined' when both runs of a seed missed it or bounds of both directions mix. The same holds per activation
for `epochs_to_target_mean` (`epochs_kind`). Seconds count the population's training steps (all its members) and
depend on the machine's load; epochs and steps do not.
"""

import dataclasses
import json
import os
import shutil
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from dlcore import (activations, checkpoint, checks, data, initializers, loop, losses, models, optim, population,
                    stats)
from . import common, config_lib
from .configs import schema

PAPER_SPEEDUP = 6.0
LINESTYLES = ("-", "--", ":", "-.")
# The paper-era cuda-convnet layers-18pct initial weights: std per layer (biases 0).
CUDA_CONVNET_STD = {"conv1": 1e-4, "conv2": 0.01, "conv3": 0.01, "classifier": 0.01}
INITS = ("cuda_convnet", *initializers.NAMES)
STATS_IMAGES = 256

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
  return sorted(values)


# The study's own names for its config keys (configs/schema.py).
KEYS = {
    "activations": "study.activations",
    "init": "model.init",
    "lr_grid": "study.lr_grid",
    "widen_rounds": "study.widen_rounds",
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
  checks.one_of("model.init", study["init"], INITS)
  if study["init"] == "lsuv":
    raise ValueError("model.init='lsuv' is not supported here (its scale depends on data per member); valid: "
                     + ", ".join(i for i in INITS if i != "lsuv"))
  checks.one_of("data.dataset", study["dataset"], data.NAMES)
  checks.one_of("data.preprocess", study["preprocess"], data.preprocess.METHODS)
  checks.one_of("optimizer.name", study["optimizer"], optim.OPTIMIZERS)
  for name in ("max_epochs", "batch"):
    checks.positive(f"{KEYS[name]}", study[name])
  if not isinstance(study["widen_rounds"], int) or study["widen_rounds"] < 0:
    raise ValueError(f"study.widen_rounds must be an integer >= 0, got {study['widen_rounds']!r}")
  checks.non_negative("data.subset", study["subset"])
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


# ---------------------------------------------------------------------------------------------------------------
# The model, its initialisation and its statistics there.


def build_model(init: str, activation: str, num_classes: int):
  """The four-layer ConvNet with no regularisation; cuda_convnet builds with std 0.01 everywhere (conv1 is
  rescaled by `cuda_convnet_params`)."""
  if init == "cuda_convnet":
    return models.get("cifar_convnet", activation=activation, initializer="normal",
                      init_scale=CUDA_CONVNET_STD["conv2"], num_classes=num_classes, batchnorm="none", keep_prob=1.0)
  return models.get("cifar_convnet", activation=activation, initializer=init, num_classes=num_classes,
                    batchnorm="none", keep_prob=1.0)


def cuda_convnet_params(params: dict) -> dict:
  """Params drawn with std 0.01 everywhere, conv1's kernel rescaled to std 1e-4 (any leading member axes)."""
  scale = CUDA_CONVNET_STD["conv1"] / CUDA_CONVNET_STD["conv2"]
  conv1 = {**params["conv1"], "linear": {**params["conv1"]["linear"],
                                         "kernel": params["conv1"]["linear"]["kernel"] * scale}}
  return {**params, "conv1": conv1}


def create_population(study: dict, activation: str, members: list[tuple[float, int]], sample: np.ndarray,
                      num_classes: int) -> population.Population:
  """The population of (rate, seed) members at initialisation."""
  pop = population.create(build_model(study["init"], activation, num_classes), sample, optimizer=study["optimizer"],
                          learning_rate=[lr for lr, _ in members], momentum=study["momentum"],
                          seed=[seed for _, seed in members])
  if study["init"] == "cuda_convnet":
    pop = pop.replace(state=pop.state.replace(params=cuda_convnet_params(pop.state.params)))
  return pop


def init_statistics(study: dict, activation: str, dataset: data.Dataset) -> list[dict]:
  """Per layer at the first seed's initial weights, on the first STATS_IMAGES training images: weight std, output
  std, saturated (tanh, sigmoid) or dead (ReLU family) fraction, std of the cross-entropy gradient of the
  weights and its ratio to the weight std."""
  images = jnp.asarray(dataset.train.images[:STATS_IMAGES])
  labels = jnp.asarray(dataset.train.labels[:STATS_IMAGES])
  pop = create_population(study, activation, [(1.0, study["seeds"][0])], np.asarray(images[:2]),
                          dataset.num_classes)
  state = population.member(pop, 0)
  model = build_model(study["init"], activation, dataset.num_classes)
  loss_fn = losses.get("cross_entropy")
  grads = jax.grad(lambda p: loss_fn(model.apply({"params": p}, images), labels))(state.params)
  rows = []
  for layer in stats.activations(model, {"params": state.params}, images):
    name = layer["name"]
    weight = np.asarray(state.params[name]["linear"]["kernel"])
    weight_grad = np.asarray(grads[name]["linear"]["kernel"])
    unit = activation if name != "classifier" else "identity"
    rows.append({"activation": activation, "layer": name, "weight_std": float(weight.std()),
                 "output_std": float(np.asarray(layer["post"]).std()),
                 "saturated_or_dead": stats.saturation(layer["post"], unit) if unit != "identity" else None,
                 "weight_grad_std": float(weight_grad.std()),
                 "grad_to_weight": float(weight_grad.std() / weight.std())})
  return rows


# ---------------------------------------------------------------------------------------------------------------
# Data, loaded only when some population has to train.


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
# One population: train epoch by epoch, evaluate every member's training error, checkpoint; resume.


def reached(record: dict, target: float) -> bool:
  return not record["diverged"] and record["train_error"] <= target


def trained(records: list[dict], stop_at_target: bool, target: float) -> list[dict]:
  """A member's records up to the epoch it stopped at: the first that reached the target (with stop_at_target;
  the population goes on while others train, the stopped member's state no longer changes), or all of them."""
  hit = epochs_to_target(records, target) if stop_at_target else None
  return records if hit is None else records[:hit]


def finished(records: list[dict], epochs: int, stop_at_target: bool, target: float) -> bool:
  """Whether one member's `records` already answer a request for `epochs` epochs."""
  records = records[:epochs]
  return (len(records) >= epochs or any(r["diverged"] for r in records)
          or (stop_at_target and any(reached(r, target) for r in records)))


# What a population's results depend on (study.max_epochs only says how long it trains).
ROUND_KEYS = ("init", "dataset", "data_dir", "subset", "preprocess", "batch", "optimizer", "momentum",
              "target_error", "stop_at_target")


def train_round(study: dict, activation: str, rates: list[float], run_dir: str, lazy_data: LazyData, log,
                label: str) -> dict:
  """Trains (or resumes, or reuses) the population of `rates` x the study's seeds; returns its round.json dict
  ({'settings', 'members': [{'learning_rate', 'seed', 'records'}], 'steps_per_epoch', ...}), records cut to
  study.max_epochs."""
  epochs, target, stop = study["max_epochs"], study["target_error"], study["stop_at_target"]
  members = [(lr, seed) for lr in rates for seed in study["seeds"]]
  settings = {"activation": activation, "rates": rates, "seeds": study["seeds"],
              **{k: study[k] for k in ROUND_KEYS}}
  path = os.path.join(run_dir, "round.json")
  saved = None
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved["settings"] != settings:
      diff = ", ".join(f"{k}: {saved['settings'].get(k)!r} -> {v!r}" for k, v in settings.items()
                       if saved["settings"].get(k) != v)
      raise ValueError(f"{run_dir} holds a population with other settings ({diff}); pass --overwrite to discard "
                       "every population, or use another --workdir")
    if all(finished(m["records"], epochs, stop, target) for m in saved["members"]):
      log(f"{label}: finished before ({len(saved['members'][0]['records'])} epochs logged); reusing it")
      return {**saved, "members": [{**m, "records": trained(m["records"][:epochs], stop, target)}
                                   for m in saved["members"]]}

  dataset = lazy_data.get()
  k, batch_size = len(members), study["batch"]
  steps_per_epoch = len(dataset.train) // batch_size
  orders = {seed: data.TrainBatches(dataset.train, batch_size, seed=seed) for seed in study["seeds"]}
  start = time.perf_counter()
  pop = create_population(study, activation, members, orders[members[0][1]].batch_at(0)["image"],
                          dataset.num_classes)
  # On CPU a vmapped convolution is a grouped convolution, slower than the members one after another
  vectorize = jax.default_backend() != "cpu"
  step_fn = jax.jit(population.make_train_step(per_member_batches=True, vectorize=vectorize), donate_argnums=0)
  eval_fn = jax.jit(population.make_eval_step(vectorize=vectorize))
  eval_batches = data.EvalBatches(dataset.train, batch_size)
  ckpt = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), keep=1, keep_best=False,
                                 best_metric="train_error", best_mode="min")
  records = [[] for _ in members]
  if ckpt.latest_step() is not None:
    restored, meta = ckpt.restore(pop.state.replace(step=0))
    pop = pop.replace(state=restored.replace(step=jnp.asarray(meta["member_steps"], pop.state.step.dtype)),
                      active=jnp.asarray(meta["active"]), diverged_at=jnp.asarray(meta["diverged_at"], jnp.int32))
    records = meta["records"]
    log(f"{label}: resumed from epoch {len(records[0])}")
  os.makedirs(run_dir, exist_ok=True)
  out = {"settings": settings, "steps_per_epoch": steps_per_epoch, "train_examples": len(dataset.train),
         "train_examples_total": lazy_data.total_train, "data_source": dataset.source,
         "setup_seconds": time.perf_counter() - start}
  log(f"{label}: {k} members (rates {', '.join(f'{r:g}' for r in rates)} x seeds {study['seeds']}), "
      f"{steps_per_epoch} steps of {batch_size} per epoch")

  session_start, session_epochs = time.perf_counter(), 0
  for epoch in range(len(records[0]) + 1, epochs + 1):
    if all(finished(r, epochs, stop, target) for r in records):
      break
    t0 = time.perf_counter()
    loss_sum = None
    for step in range((epoch - 1) * steps_per_epoch, epoch * steps_per_epoch):
      by_seed = {seed: order.batch_at(step) for seed, order in orders.items()}
      batch = {key: np.stack([by_seed[seed][key] for _, seed in members]) for key in ("image", "label")}
      pop, metrics = step_fn(pop, batch)
      loss_sum = metrics["loss"] if loss_sum is None else loss_sum + metrics["loss"]
    step_loss = np.asarray(loss_sum) / steps_per_epoch  # waits for the last step
    train_seconds = time.perf_counter() - t0
    evals = population.evaluate(pop, eval_fn, eval_batches)
    diverged = np.asarray(pop.diverged_at) >= 0
    previous = records[0][-1]["cum_train_seconds"] if records[0] else 0.0
    for m in range(k):
      records[m].append({
          "epoch": epoch, "step": epoch * steps_per_epoch,
          "train_error": 1.0 - evals[m]["accuracy"], "train_loss": common.finite_or_none(evals[m]["loss"]),
          "step_loss": common.finite_or_none(step_loss[m]),
          "diverged": bool(diverged[m]), "cum_train_seconds": previous + train_seconds,
          "images_per_sec": k * steps_per_epoch * batch_size / train_seconds})
    if stop:
      done = [m for m in range(k) if reached(records[m][-1], target)]
      if done:
        pop = population.freeze(pop, done)
    meta = {"records": records, "member_steps": np.asarray(pop.state.step).tolist(),
            "active": np.asarray(pop.active).tolist(), "diverged_at": np.asarray(pop.diverged_at).tolist()}
    ckpt.save(pop.state.replace(step=epoch * steps_per_epoch), metadata=meta, force=True)
    out["members"] = [{"learning_rate": lr, "seed": seed, "records": records[m]}
                      for m, (lr, seed) in enumerate(members)]
    common.write_json(path, out)
    session_epochs += 1
    per_epoch = (time.perf_counter() - session_start) / session_epochs
    errors = "  ".join(f"{lr:g}/seed {seed}: " + ("diverged" if records[m][-1]["diverged"] else
                                                   f"{records[m][-1]['train_error']:.3f}")
                       for m, (lr, seed) in enumerate(members))
    log(f"{label}  epoch {epoch}/{epochs}  train error {errors}  "
        f"{records[0][-1]['images_per_sec']:.0f} img/s  ETA {loop.format_eta(per_epoch * (epochs - epoch))}")
  ckpt.close()
  out["members"] = [{"learning_rate": lr, "seed": seed, "records": records[m]} for m, (lr, seed) in enumerate(members)]
  common.write_json(path, out)
  return {**out, "members": [{**m, "records": trained(m["records"][:epochs], stop, target)}
                             for m in out["members"]]}


# ---------------------------------------------------------------------------------------------------------------
# Analysis: epochs to target, the rate search, ratios with bounds.


def rate_table(rounds: list[dict], target: float, max_epochs: int) -> list[dict]:
  """Per rate tried (sorted): epochs to target per seed, their mean with misses counted as max_epochs + 1 (the
  search's score), whether any seed diverged, and the mean final training error."""
  rows = []
  for r, round_ in enumerate(rounds):
    for lr in round_["settings"]["rates"]:
      members = [m for m in round_["members"] if m["learning_rate"] == lr]
      epochs = [epochs_to_target(m["records"], target) for m in members]
      rows.append({"learning_rate": lr, "round": r, "seeds": [m["seed"] for m in members], "epochs_to_target": epochs,
                   "score": float(np.mean([max_epochs + 1 if e is None else e for e in epochs])),
                   "diverged": any(rec["diverged"] for m in members for rec in m["records"]),
                   "final_train_error": float(np.mean([m["records"][-1]["train_error"] for m in members]))})
  return sorted(rows, key=lambda row: row["learning_rate"])


def choose_rate(table: list[dict]) -> tuple[float | None, str | None]:
  """(the fastest rate: fewest mean epochs to target, then lowest final error, then the lower rate; the end of the
  rates tried it lies at, 'low' / 'high', or None when interior). (None, 'low') when every rate diverged."""
  ok = [row for row in table if not row["diverged"]]
  if not ok:
    return None, "low"
  best = min(ok, key=lambda row: (row["score"], row["final_train_error"], row["learning_rate"]))["learning_rate"]
  rates = [row["learning_rate"] for row in table]
  return best, "low" if best == rates[0] else "high" if best == rates[-1] else None


def next_rate(table: list[dict], side: str) -> float:
  """One grid step beyond the `side` end of the rates tried (the ratio of the two rates there; 3 for one rate)."""
  rates = [row["learning_rate"] for row in table]
  if side == "high":
    return rates[-1] * (rates[-1] / rates[-2] if len(rates) > 1 else 3.0)
  return rates[0] / (rates[1] / rates[0] if len(rates) > 1 else 3.0)


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
  lrs = ", ".join(f"{a} {per_act[a]['learning_rate']:g}" + ("" if results["search"][a]["interior"] else
                                                             f" (at the {results['search'][a]['edge']} edge of "
                                                             "the rates tried)") for a in acts)
  tried = "; ".join(f"{a}: " + ", ".join(f"{row['learning_rate']:g}" for row in results["search"][a]["rates"])
                    for a in acts)
  text = [f"Data: {results['data']}. The four-layer CIFAR ConvNet (Krizhevsky et al. 2012 Fig. 1; no LRN, no "
          f"regularisation), {s['init']} init, {s['optimizer']} (momentum {s['momentum']:g}), batch "
          f"{s['batch']}, each activation at its fastest rate to the target (rates tried: {tried}): {lrs}."]
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
  """Training error vs epochs at the chosen rates: first activation solid, second dashed, target line."""
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
         title=f"Four-layer ConvNet, {results['data_title']}, {results['train_examples']} training examples, "
               f"{results['settings']['init']} init")
  ax.title.set_fontsize(10)
  ax.legend(fontsize=8)
  common.save_figure(fig, path)


def plot_search(results: dict, path: str) -> None:
  """Left: mean epochs to target against the rate, per activation; a rate some seed never got there with is drawn
  hollow (a lower bound), a diverged rate as x at the top, the chosen rate as a star. Right: the mean final
  training error per rate, the tie-break between rates that miss the target alike."""
  s = results["settings"]
  top = s["max_epochs"] + 1
  fig, (ax, ax_err) = common.plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
  for i, act in enumerate(s["activations"]):
    rows = results["search"][act]["rates"]
    color = f"C{i}"
    ok = [r for r in rows if not r["diverged"]]
    ax.plot([r["learning_rate"] for r in ok], [r["score"] for r in ok], LINESTYLES[i % len(LINESTYLES)],
            color=color, label=act)
    ax_err.plot([r["learning_rate"] for r in ok], [r["final_train_error"] for r in ok],
                LINESTYLES[i % len(LINESTYLES)], marker="o", color=color, label=act)
    for r in ok:
      full = all(e is not None for e in r["epochs_to_target"])
      ax.plot([r["learning_rate"]], [r["score"]], "o", color=color, markerfacecolor=color if full else "white")
    gone = [r["learning_rate"] for r in rows if r["diverged"]]
    if gone:
      ax.plot(gone, [top] * len(gone), "x", color=color, markersize=9)
    chosen = next(r for r in rows if r["learning_rate"] == results["activations"][act]["learning_rate"])
    ax.plot([chosen["learning_rate"]], [chosen["score"]], "*", color="k", markersize=14)
    ax_err.plot([chosen["learning_rate"]], [chosen["final_train_error"]], "*", color="k", markersize=14)
  ax.axhline(top, color="gray", linewidth=0.8, linestyle=":")
  ax.set(ylabel=f"epochs to {s['target_error']:.0%} training error (mean)", ylim=(0, top + 1),
         title=f"rate search (star: chosen; hollow: some seed missed it within {s['max_epochs']}, "
               f"counted as {top}; x: diverged)")
  ax_err.axhline(s["target_error"], color="gray", linewidth=0.8, linestyle=":", label=f"target {s['target_error']:g}")
  ax_err.set(ylabel="final training error (mean over seeds)", ylim=(0, None),
             title="tie-break: training error at the last epoch trained (a member stops at the target)")
  tried = sorted({r["learning_rate"] for act in s["activations"] for r in results["search"][act]["rates"]})
  for a in (ax, ax_err):
    a.set(xscale="log", xlabel="learning rate")
    a.set_xticks(tried, [f"{lr:.3g}" for lr in tried])
    a.set_xticks([], minor=True)
    a.title.set_fontsize(9)
    a.legend()
  common.save_figure(fig, path)


def run_study(study: dict, workdir: str, *, overwrite: bool = False, log=print) -> dict:
  """The rate searches, the speed-up and the statistics at initialisation; writes every output to `workdir`
  and returns results.json's dict. `study` holds the study's settings (see `validate`; `seeds`: the seeds)."""
  study = validate(study)
  runs_dir = os.path.join(workdir, "runs")
  if overwrite and os.path.isdir(runs_dir):
    shutil.rmtree(runs_dir)
  os.makedirs(workdir, exist_ok=True)
  common.write_json(os.path.join(workdir, "settings.json"), study)
  lazy_data = LazyData(study, log)
  acts, seeds, target, max_epochs = study["activations"], study["seeds"], study["target_error"], study["max_epochs"]

  search, rounds_by_act = {}, {}
  for act in acts:
    rounds, rates = [], study["lr_grid"]
    while True:
      label = f"[{act} round {len(rounds)}]"
      rounds.append(train_round(study, act, rates, os.path.join(runs_dir, f"{act}_round{len(rounds)}"), lazy_data,
                                log, label))
      table = rate_table(rounds, target, max_epochs)
      chosen, side = choose_rate(table)
      if chosen is None:
        raise ValueError(f"every learning rate tried for {act} diverged ({[r['learning_rate'] for r in table]}); "
                         "use smaller study.lr_grid rates")
      if side is None or len(rounds) > study["widen_rounds"]:
        break
      rates = [next_rate(table, side)]
      log(f"{act}: the fastest rate {chosen:g} is the {'lowest' if side == 'low' else 'highest'} tried; widening "
          f"the search to {rates[0]:g}")
    search[act] = {"rates": table, "chosen": chosen, "interior": side is None, "edge": side, "rounds": len(rounds)}
    rounds_by_act[act] = rounds
    where = "interior" if side is None else f"still at the {side} edge after {len(rounds) - 1} widening round(s)"
    log(f"learning rate for {act}: {chosen:g} ({where}; " + ", ".join(
        f"{r['learning_rate']:g}: {r['score']:.1f} epochs" + (" (diverged)" if r["diverged"] else "") for r in table)
        + ")")

  runs, curves = [], {}
  for seed in seeds:
    for act in acts:
      lr = search[act]["chosen"]
      r, member = next((r, m) for r, round_ in enumerate(rounds_by_act[act]) for m in round_["members"]
                       if m["learning_rate"] == lr and m["seed"] == seed)
      round_ = rounds_by_act[act][r]
      curve = {"records": member["records"], "steps_per_epoch": round_["steps_per_epoch"]}
      runs.append(summarize_run(curve, act, seed, lr, target, os.path.join("runs", f"{act}_round{r}")))
      curves[(act, seed)] = member["records"]

  first = rounds_by_act[acts[0]][0]
  source, n = first["data_source"], first["train_examples"]
  title = data_title(source)
  dataset = lazy_data.get()
  init_stats = [row for act in acts for row in init_statistics(study, act, dataset)]
  results = {
      "claim": ("Krizhevsky et al. 2012 Fig. 1: a four-layer CNN with ReLUs reaches 25% training error on "
                "CIFAR-10 six times faster than the same network with tanh"),
      "data": f"{title}, first {n} of {first['train_examples_total']} training examples" if n != first[
          "train_examples_total"] else f"{title}, all {n} training examples",
      "data_title": title, "data_source": source, "train_examples": n,
      "train_examples_total": first["train_examples_total"],
      "steps_per_epoch": first["steps_per_epoch"], "target_error": target, "settings": study,
      "learning_rates": {a: search[a]["chosen"] for a in acts}, "search": search, "runs": runs,
      "activations": {a: summarize_activation([r for r in runs if r["activation"] == a]) for a in acts},
      "reference": acts[0], "paper_speedup": PAPER_SPEEDUP, "init_stats": init_stats,
  }
  results["speedups"] = {a: summarize_speedup([r for r in runs if r["activation"] == a],
                                              [r for r in runs if r["activation"] == acts[0]]) for a in acts[1:]}
  main = results["speedups"].get(acts[1]) if len(acts) > 1 else None
  results["speedup"] = main["mean"] if main else None
  results["speedup_std"] = main["std"] if main else None
  results["speedup_kind"] = main["kind"] if main else None
  results["verdict"] = verdict(results)

  header = ["activation", "learning_rate", "seed", "chosen", "epoch", "step", "train_error", "train_loss",
            "step_loss", "cum_train_seconds", "diverged"]
  rows = [[a, m["learning_rate"], m["seed"], m["learning_rate"] == search[a]["chosen"], r["epoch"], r["step"],
           r["train_error"], r["train_loss"], r["step_loss"], r["cum_train_seconds"], r["diverged"]]
          for a in acts for round_ in rounds_by_act[a] for m in round_["members"] for r in m["records"]]
  common.write_csv(os.path.join(workdir, "curves.csv"), header, rows)
  rate_rows = [[a, row["round"], row["learning_rate"], seed, epochs if epochs is not None else "not reached",
                row["diverged"], row["learning_rate"] == search[a]["chosen"]]
               for a in acts for row in search[a]["rates"] for seed, epochs in zip(row["seeds"],
                                                                                  row["epochs_to_target"])]
  common.write_csv(os.path.join(workdir, "rates.csv"),
                   ["activation", "round", "learning_rate", "seed", "epochs_to_target", "diverged", "chosen"],
                   rate_rows)
  stat_keys = ["activation", "layer", "weight_std", "output_std", "saturated_or_dead", "weight_grad_std",
               "grad_to_weight"]
  common.write_csv(os.path.join(workdir, "init_stats.csv"), stat_keys, [[r[k] for k in stat_keys]
                                                                        for r in init_stats])
  plot_curves(results, curves, os.path.join(workdir, "training_error.png"))
  plot_search(results, os.path.join(workdir, "lr_search.png"))
  common.write_json(os.path.join(workdir, "results.json"), results)
  return results


CONFIG = None


def define_flags() -> None:
  """Defines the flags; called by `run` only, so importing this module (tests) clashes with no other binary."""
  global CONFIG
  CONFIG = config_lib.define_config_flag("relu_vs_tanh", "relu_vs_tanh.py")
  flags.DEFINE_string("workdir", "runs/relu_vs_tanh", "Output folder; holds one sub-folder per population.")
  flags.DEFINE_bool("overwrite", False, "Discard every population in --workdir first.")


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
  try:
    results = run_study(study, FLAGS.workdir, overwrite=FLAGS.overwrite,
                        log=lambda message: print(message, flush=True))
  except ValueError as e:
    sys.exit(f"error: {e}")
  rows = [[r["activation"], r["seed"], r["learning_rate"],
           "not reached" if r["epochs_to_target"] is None else r["epochs_to_target"],
           "-" if r["steps_to_target"] is None else r["steps_to_target"], r["best_train_error"],
           r["epochs_trained"]] for r in results["runs"]]
  print("\n" + common.format_table(["activation", "seed", "lr", "epochs to target", "steps", "best train error",
                                    "epochs run"], rows))
  print("\nat initialisation (first seed, 256 training images):")
  print(common.format_table(["activation", "layer", "weight std", "output std", "saturated/dead", "weight grad std",
                             "grad / weight"],
                            [[r["activation"], r["layer"], r["weight_std"], r["output_std"],
                              "-" if r["saturated_or_dead"] is None else r["saturated_or_dead"],
                              r["weight_grad_std"], r["grad_to_weight"]] for r in results["init_stats"]]))
  for act, sp in results["speedups"].items():
    print(f"{act}/{results['reference']} epochs to target: {_pm(sp['mean'], sp['std'], 2)} ({sp['kind']})")
  print(f"\n{results['verdict']}\n")
  print(f"wrote {FLAGS.workdir}/results.json, curves.csv, rates.csv, init_stats.csv, training_error.png, "
        f"lr_search.png (this invocation took {time.perf_counter() - start:.0f} s)")


def run():
  define_flags()
  common.run_main(main, __name__)


if __name__ == "__main__":
  run()
