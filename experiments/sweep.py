r"""Coarse-to-fine random hyperparameter search (cs231n), every stage one population trained by one program.

Stage 1 draws study.stage_sizes[0] settings from study.space (per hyperparameter: log-uniform, uniform or a choice;
`dlcore.search`) and trains them study.stage_epochs[0] epochs at once as one population (`dlcore.population`). Each
next stage draws study.stage_sizes[i] settings from ranges narrowed around the study.top_k best of the stage before
(in log space for log hyperparameters) and trains them study.stage_epochs[i] epochs. The final stage trains the
study.final_top best settings of the last stage with study.final_seeds seeds each for study.final_epochs epochs
and evaluates them on the test set; the best setting is the one with the highest mean validation accuracy.
Members are ranked by validation accuracy at the end of their stage; a member whose loss or parameters go
non-finite is frozen there, reported, and ranked last.

Every member is exactly a trainer run (`experiments.train`) with its hyperparameters and length: the search
stages give every member seed `seed` (the same initial weights and data order, so only the settings differ), the
final stage seeds seed, seed+1, ... each with its own data order. best_config.json is the best setting as a
trainer config: `python -m experiments.train --config=WORKDIR/best_config.json` repeats its first-seed run.

  python -m experiments.sweep --workdir=runs/sweep     # Fashion-MNIST MLP: learning rate x weight decay
  python -m experiments.sweep --config.study.space='learning_rate=log:1e-3:1, momentum=uniform:0.5:0.99' \
      --config.study.stage_sizes='(16, 8)' --config.study.stage_epochs='(1, 2)' --workdir=runs/sweep_momentum

Config: experiments/configs/sweep.py (keys: configs/schema.py `sweep`); searchable: learning_rate, momentum,
weight_decay, penalty_strength, label_smoothing, init_scale. Writes to --workdir: config.json,
stages/stage_<i>.json and stages/final.json (each when its stage ends: running the command again skips finished
stages, so a killed sweep resumes at the start of the stage it was in), members.csv (every member of every
stage), results.json, best_config.json, scatter.png (validation accuracy against each hyperparameter coloured by
stage, and the first two hyperparameters against each other coloured by accuracy) and curves.png (validation
accuracy of every member against epochs, a panel per stage). Members are evaluated on the validation split at
every epoch's end and at least 4 times per stage; a curve point's train_loss is the mean training loss of the
steps since the point before.

Edges: when a stage's best setting lies within study.edge (a fraction of the range, in the range's own scale) of
an end of a numeric range, the sweep says so and the next stage's range reaches past that end. When the final
best lies at an edge of the last stage's range, the verdict says which range to widen in study.space.
"""

import json
import math
import os
import sys
import time

from absl import flags
import jax
import numpy as np

from dlcore import data, loop, population, search
from . import common, config_lib, train_lib
from .configs import schema

BINARY = "sweep"
# Keys that may change when a sweep is resumed: they change where data is read or how often progress is shown.
RESUMABLE_KEYS = ("data.data_dir", "data.download", "loop.log_every", "parallel.num_devices")
# Searchable hyperparameters: (config group, key) and the values each may take (low, low_open, high, high_open).
KEYS = {"learning_rate": ("optimizer", "learning_rate"), "momentum": ("optimizer", "momentum"),
        "weight_decay": ("optimizer", "weight_decay"), "penalty_strength": ("loss", "penalty_strength"),
        "label_smoothing": ("loss", "label_smoothing"), "init_scale": ("model", "init_scale")}
BOUNDS = {"learning_rate": (0.0, True, math.inf, True), "momentum": (0.0, False, 1.0, True),
          "weight_decay": (0.0, False, math.inf, True), "penalty_strength": (0.0, False, math.inf, True),
          "label_smoothing": (0.0, False, 1.0, True), "init_scale": (0.0, True, math.inf, True)}
STAGE_COLORS = ("C0", "C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9")
FINAL_COLOR = "C3"

FLAGS = flags.FLAGS


# ---------------------------------------------------------------------------------------------------------------
# Settings.


def trainer_config(config, hparams: dict, *, epochs: float, seed: int):
  """The trainer's config of one member: the sweep's groups, the member's hyperparameters, length and seed."""
  c = schema.train()
  c.seed = seed
  for group in ("data", "model", "loss", "optimizer", "schedule", "parallel"):
    c[group].update(config[group].to_dict())
  c.loop.update(batch_size=config.loop.batch_size, log_every=config.loop.log_every, epochs=float(epochs), steps=0)
  for name, value in hparams.items():
    group, key = KEYS[name]
    c[group][key] = float(value)
  return c


def _stage_plan(study) -> list[tuple[int, float]]:
  members, epochs = list(study.stage_sizes), list(study.stage_epochs)
  if not members:
    raise ValueError("study.stage_sizes must list the members of at least one stage, e.g. (32, 16)")
  if len(members) != len(epochs):
    raise ValueError(f"study.stage_sizes {tuple(members)} and study.stage_epochs {tuple(epochs)} must have one "
                     "entry per stage")
  for i, (k, e) in enumerate(zip(members, epochs)):
    if not isinstance(k, int) or k < 1:
      raise ValueError(f"study.stage_sizes[{i}] must be a positive integer, got {k!r}")
    if not e > 0:
      raise ValueError(f"study.stage_epochs[{i}] must be > 0, got {e!r}")
  return list(zip(members, [float(e) for e in epochs]))


def validate(config) -> tuple[dict, list[tuple[int, float]]]:
  """(the search space, [(members, epochs)] per search stage), every check that needs no data done: ValueError
  naming the key and what is allowed."""
  study = config.study
  space = search.parse(study.space, BOUNDS, arg="study.space")
  plan = _stage_plan(study)
  checks_ = {"study.top_k": study.top_k, "study.final_top": study.final_top, "study.final_seeds": study.final_seeds}
  for key, value in checks_.items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{key} must be a positive integer, got {value!r}")
  for i, (k, _) in enumerate(plan[:-1]):
    if study.top_k > k:
      raise ValueError(f"study.top_k {study.top_k} is more than the {k} members of stage {i + 1} (study.stage_sizes)")
  if study.final_top > plan[-1][0]:
    raise ValueError(f"study.final_top {study.final_top} is more than the {plan[-1][0]} members of the last stage")
  if not study.final_epochs > 0:
    raise ValueError(f"study.final_epochs must be > 0, got {study.final_epochs!r}")
  if not 0 < study.edge < 0.5:
    raise ValueError(f"study.edge must be in (0, 0.5) (a fraction of a range's width), got {study.edge!r}")
  if config.model.init.lower() == "lsuv":
    raise ValueError("model.init='lsuv' is not supported by the sweep (its init depends on data per member); "
                     "choose another model.init")
  train_lib.validate(trainer_config(config, {}, epochs=plan[0][1], seed=config.seed))
  for name, dim in space.items():  # a searched hyperparameter must act on this run
    value = dim.choices[0] if dim.kind == "choice" else dim.low
    try:
      train_lib.validate(trainer_config(config, {name: value + 1e-3 * (value == 0)}, epochs=1.0, seed=0))
    except ValueError as e:
      raise ValueError(f"study.space searches {name}, but {e}") from None
  devices = config.parallel.num_devices or jax.device_count()
  if devices > jax.device_count():
    raise ValueError(f"parallel.num_devices {devices} is more than the {jax.device_count()} devices here")
  sizes = {f"study.stage_sizes[{i}]": k for i, (k, _) in enumerate(plan)}
  sizes["study.final_top x study.final_seeds"] = study.final_top * study.final_seeds
  for key, k in sizes.items():
    if k % devices:
      raise ValueError(f"{key} = {k} members do not divide over the {devices} devices of the 'pop' mesh axis; "
                       "use a multiple of it or set parallel.num_devices")
  return space, plan


# ---------------------------------------------------------------------------------------------------------------
# Training one stage: one population.


class Progress:
  """Progress lines with an ETA over the whole sweep, from member-steps done in training so far."""

  def __init__(self, total_member_steps: int):
    self.total, self.done, self.seconds = total_member_steps, 0, 0.0

  def add(self, member_steps: int, seconds: float) -> None:
    self.done += member_steps
    self.seconds += seconds

  def rate(self) -> float:
    """Member-steps per second of training so far."""
    return self.done / max(self.seconds, 1e-9)

  def eta(self) -> str:
    if not self.done:
      return "?"
    return loop.format_eta((self.total - self.done) * self.seconds / self.done)


def train_stage(config, dataset, mesh, settings: list[dict], seeds: list[int], epochs: float, *, label: str,
                per_member_data: bool, test: bool, progress: Progress, log) -> dict:
  """Trains one population (member k: settings[k] with seeds[k]) for `epochs` epochs; returns the stage's record
  with every member's validation curve (and test metrics if `test`)."""
  k = len(settings)
  first = trainer_config(config, settings[0], epochs=epochs, seed=seeds[0])
  steps_per_epoch, total = train_lib.plan_steps(first, len(dataset.train))
  shape = train_lib.learning_rate_schedule(trainer_config(config, {"learning_rate": 1.0}, epochs=epochs, seed=0),
                                           len(dataset.train))
  batch_size = config.loop.batch_size
  orders = [data.TrainBatches(dataset.train, batch_size, seed=s) for s in (seeds if per_member_data else seeds[:1])]
  base = {name: config[group][key] for name, (group, key) in KEYS.items()}  # the config's values
  hparams = {**base, **{name: [s[name] for s in settings] for name in settings[0]}}
  model = train_lib.build_model(first, dataset.num_classes)
  start = time.perf_counter()
  pop = population.create(model, orders[0].batch_at(0)["image"], optimizer=config.optimizer.name, schedule=shape,
                          size=k, seed=list(seeds), **hparams)

  def batch_at(step):
    if not per_member_data:
      return orders[0].batch_at(step)
    batches = [o.batch_at(step) for o in orders]
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}

  augment = data.augment.make(config.data.augment) if config.data.augment else None
  step_fn = population.make_train_step(loss=config.loss.name, penalty=config.loss.penalty,
                                       l1_ratio=config.loss.l1_ratio, augment=augment,
                                       per_member_batches=per_member_data)
  try:
    step_fn = population.compile_train_step(step_fn, mesh, pop, batch_at(0), per_member_batches=per_member_data)
  except ValueError as e:
    raise ValueError(f"{label} ({k} members): {e}") from None
  pop = jax.device_put(pop, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(population.POP_AXIS)))
  eval_step = population.compile_eval_step(population.make_eval_step(config.loss.name), mesh)
  validation = data.EvalBatches(dataset.validation, batch_size)
  log(f"{label} {k} members x {total} steps ({total / steps_per_epoch:.2f} epochs of {batch_size}); "
      f"setup and compile {time.perf_counter() - start:.1f} s")

  eval_every = min(steps_per_epoch, max(1, total // 4))  # every epoch, and at least 4 points per curve
  curves = [[] for _ in range(k)]
  losses_sum, since, last_eval, train_seconds = None, 0, 0, 0.0
  window_start = time.perf_counter()
  for step in range(total):
    pop, metrics = step_fn(pop, batch_at(step))
    losses_sum = metrics["loss"] if losses_sum is None else losses_sum + metrics["loss"]
    since += 1
    evaluate = (step + 1) % eval_every == 0 or step + 1 == total
    if evaluate or (step + 1) % config.loop.log_every == 0:
      jax.block_until_ready(pop)
      seconds = time.perf_counter() - window_start
      train_seconds += seconds
      progress.add(k * since, seconds)
      since = 0
      if evaluate:
        train_loss = np.asarray(losses_sum) / (step + 1 - last_eval)
        losses_sum, last_eval = None, step + 1
        for member, result in enumerate(population.evaluate(pop, eval_step, validation)):
          curves[member].append({"epoch": round((step + 1) / steps_per_epoch, 4), "step": step + 1,
                                 "train_loss": common.finite_or_none(train_loss[member]),
                                 "val_loss": common.finite_or_none(result["loss"]),
                                 "val_accuracy": result["accuracy"]})
        best = max(c[-1]["val_accuracy"] for c in curves)
        log(f"{label} epoch {(step + 1) / steps_per_epoch:.2f}: best validation accuracy {best:.4f} | "
            f"{progress.rate():.0f} member-steps/s | ETA {progress.eta()}")
      else:
        log(f"{label} step {step + 1}/{total} | {progress.rate():.0f} member-steps/s | "
            f"ETA {progress.eta()}")
      window_start = time.perf_counter()

  diverged = np.asarray(pop.diverged_at)
  tests = population.evaluate(pop, eval_step, data.EvalBatches(dataset.test, batch_size)) if test else [None] * k
  members = []
  for m in range(k):
    record = {"member": m, "seed": int(seeds[m]), "hparams": dict(settings[m]),
              "val_accuracy": curves[m][-1]["val_accuracy"], "val_loss": curves[m][-1]["val_loss"],
              "train_loss": curves[m][-1]["train_loss"],
              "diverged_at": int(diverged[m]) if diverged[m] >= 0 else None, "curve": curves[m]}
    if tests[m] is not None:
      record.update(test_accuracy=tests[m]["accuracy"], test_loss=common.finite_or_none(tests[m]["loss"]))
    members.append(record)
  return {"epochs": epochs, "steps": total, "steps_per_epoch": steps_per_epoch, "train_seconds": train_seconds,
          "members": members}


def ranked(members: list[dict]) -> list[dict]:
  """Best first: members that never diverged by validation accuracy (then loss); diverged members last."""
  return sorted(members, key=lambda m: (m["diverged_at"] is not None, -m["val_accuracy"],
                                        m["val_loss"] if m["val_loss"] is not None else math.inf, m["member"]))


def edges(space: dict, setting: dict, fraction: float) -> list[dict]:
  out = []
  for name, dim in space.items():
    side = search.edge(dim, setting[name], fraction)
    if side:
      out.append({"name": name, "side": side, "value": setting[name], "range": [dim.low, dim.high]})
  return out


# ---------------------------------------------------------------------------------------------------------------
# The sweep.


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def run_sweep(config, workdir: str, *, log=print) -> dict:
  """Every stage (reusing those finished before), the final stage, the outputs; returns results.json's dict."""
  start = time.perf_counter()
  space, plan = validate(config)
  study = config.study
  stages_dir = os.path.join(workdir, "stages")
  os.makedirs(stages_dir, exist_ok=True)
  final_k = study.final_top * study.final_seeds
  dataset = None
  mesh = population.make_mesh(config.parallel.num_devices or jax.device_count())

  def load_data():
    nonlocal dataset
    if dataset is None:
      dataset = train_lib.load_dataset(trainer_config(config, {}, epochs=1.0, seed=config.seed))
      if dataset.validation is None or not len(dataset.validation):
        raise ValueError("the sweep ranks members on a validation split: set data.validation_size > 0 (or -1, "
                         "the dataset's default)")
      if config.data.preprocess != "none":
        dataset, _ = data.preprocess.preprocess_dataset(dataset, config.data.preprocess)
      log(f"data: {dataset.source} | train {len(dataset.train)}, validation {len(dataset.validation)}, test "
          f"{len(dataset.test)}")
    return dataset

  stages, current = [], space
  pending = [i for i in range(len(plan)) if not os.path.exists(os.path.join(stages_dir, f"stage_{i + 1}.json"))]
  final_path = os.path.join(stages_dir, "final.json")
  total = 0  # member-steps left to train, for the ETA
  if pending or not os.path.exists(final_path):
    n = len(load_data().train)
    member_steps = lambda k, epochs: k * train_lib.plan_steps(trainer_config(config, {}, epochs=epochs, seed=0),
                                                              n)[1]
    total = sum(member_steps(*plan[i]) for i in pending) + (
        0 if os.path.exists(final_path) else member_steps(final_k, study.final_epochs))
  progress = Progress(total)

  for i, (k, epochs) in enumerate(plan):
    path = os.path.join(stages_dir, f"stage_{i + 1}.json")
    label = f"[stage {i + 1}/{len(plan)}]"
    if os.path.exists(path):
      stage = _read_json(path)
      log(f"{label} finished before: reusing {path}")
    else:
      log(f"{label} {k} settings from {search.to_text(current)}")
      settings = search.sample(current, k, np.random.default_rng([config.seed, i + 1]))
      stage = train_stage(config, load_data(), mesh, settings, [config.seed] * k, epochs, label=label,
                          per_member_data=False, test=False, progress=progress, log=log)
      stage.update(stage=i + 1, space=search.to_text(current))
    order = ranked(stage["members"])
    top = order[:study.top_k]
    stage["top"] = [m["member"] for m in top]
    stage["edges"] = edges(current, order[0]["hparams"], study.edge)
    if i + 1 < len(plan):
      current, widened = search.narrow(current, [m["hparams"] for m in top], BOUNDS, edge_fraction=study.edge)
      stage["widened"] = widened
      stage["next_space"] = search.to_text(current)
    if not os.path.exists(path):
      common.write_json(path, stage)
    for e in stage["edges"]:
      log(f"{label} the best {e['name']} {e['value']:.4g} lies at the {e['side']} edge of its range "
          f"[{e['range'][0]:.4g}, {e['range'][1]:.4g}]")
    for w in stage.get("widened", ()):
      log(f"{label} top {study.top_k} at the {w['side']} end of {w['name']}: the next range reaches past it, "
          f"{w['old']:.4g} -> {w['new']:.4g}")
    log(f"{label} best: " + _describe(order[0]))
    stages.append(stage)
    if i + 1 < len(plan):
      current = search.parse(stage["next_space"], BOUNDS, arg="stage space")

  last = stages[-1]
  last_space = search.parse(last["space"], BOUNDS, arg="stage space")
  if os.path.exists(final_path):
    final = _read_json(final_path)
    log(f"[final] finished before: reusing {final_path}")
  else:
    best_settings = [m["hparams"] for m in ranked(last["members"])[:study.final_top]]
    seeds = [config.seed + j for j in range(study.final_seeds)]
    settings = [s for s in best_settings for _ in seeds]
    final = train_stage(config, load_data(), mesh, settings, seeds * len(best_settings), study.final_epochs,
                        label="[final]", per_member_data=True, test=True, progress=progress, log=log)
    final["settings"] = best_settings
    common.write_json(final_path, final)

  results = _summarize(config, space, stages, final, last_space)
  results["wall_time_s"] = time.perf_counter() - start
  results["train_seconds"] = sum(s["train_seconds"] for s in stages) + final["train_seconds"]
  results["data"] = dataset.source if dataset is not None else None
  _write_outputs(config, workdir, results)
  return results


def _describe(member: dict) -> str:
  hp = ", ".join(f"{k}={v:.4g}" for k, v in member["hparams"].items())
  state = f"diverged at step {member['diverged_at']}" if member["diverged_at"] is not None else (
      f"validation accuracy {member['val_accuracy']:.4f}")
  return f"member {member['member']} ({hp}): {state}"


def _mean_std(values: list[float]) -> tuple[float, float | None]:
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def _summarize(config, space: dict, stages: list[dict], final: dict, last_space: dict) -> dict:
  study = config.study
  per_setting = []
  for j, setting in enumerate(final["settings"]):
    members = [m for m in final["members"] if m["member"] // study.final_seeds == j]
    ok = all(m["diverged_at"] is None for m in members)
    val = _mean_std([m["val_accuracy"] for m in members])
    test = _mean_std([m["test_accuracy"] for m in members])
    per_setting.append({"hparams": setting, "seeds": [m["seed"] for m in members], "diverged": not ok,
                        "val_accuracy_mean": val[0], "val_accuracy_std": val[1],
                        "test_accuracy_mean": test[0], "test_accuracy_std": test[1],
                        "test_accuracy": [m["test_accuracy"] for m in members]})
  best_index = max(range(len(per_setting)), key=lambda j: (not per_setting[j]["diverged"],
                                                          per_setting[j]["val_accuracy_mean"]))
  best = per_setting[best_index]
  top = [m["member"] for m in final["members"] if m["member"] // study.final_seeds == best_index]
  warnings = edges(last_space, best["hparams"], study.edge)
  verdict = (f"Best setting ({', '.join(f'{k}={v:.4g}' for k, v in best['hparams'].items())}): validation "
             f"accuracy {_pm(best['val_accuracy_mean'], best['val_accuracy_std'])}, test accuracy "
             f"{_pm(best['test_accuracy_mean'], best['test_accuracy_std'])} over {len(best['seeds'])} seed(s) of "
             f"{study.final_epochs:g} epochs.")
  for w in warnings:
    verdict += (f" Its {w['name']} {w['value']:.4g} lies at the {w['side']} edge of the last stage's range "
                f"[{w['range'][0]:.4g}, {w['range'][1]:.4g}]: widen that end of {w['name']} in study.space and run "
                "again")
    if w["side"] == "low" and last_space[w["name"]].kind == "log" and not BOUNDS[w["name"]][1]:
      verdict += f" (0 is allowed: {w['name']}=uniform:0:{w['range'][1]:.3g} includes it)"
    verdict += "."
  if not warnings:
    verdict += " Every searched value lies inside its last range."
  return {"space": search.to_text(space), "settings": config_lib.flat(config.study), "stages": stages,
          "final": {**final, "per_setting": per_setting, "top": top}, "best": best, "edge_warnings": warnings,
          "verdict": verdict}


def _pm(mean: float, std: float | None) -> str:
  return f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")


# ---------------------------------------------------------------------------------------------------------------
# Outputs.


def _rows(results: dict) -> tuple[list[str], list[list]]:
  names = list(search.parse(results["space"], BOUNDS).keys())
  header = ["stage", "member", "seed", *names, "val_accuracy", "val_loss", "train_loss", "diverged_at",
            "test_accuracy", "test_loss"]
  rows = []
  for label, stage in [*((str(s["stage"]), s) for s in results["stages"]), ("final", results["final"])]:
    for m in stage["members"]:
      rows.append([label, m["member"], m["seed"], *(m["hparams"][n] for n in names), m["val_accuracy"],
                   m["val_loss"], m["train_loss"], m["diverged_at"], m.get("test_accuracy"), m.get("test_loss")])
  return header, rows


def _floor(results: dict) -> float:
  """The lowest accuracy the plots show: 0.3 below the best (members further down are drawn at the floor)."""
  best = max(m["val_accuracy"] for s in results["stages"] for m in s["members"])
  return max(0.0, best - 0.3)


def plot_scatter(results: dict, path: str) -> None:
  """cs231n's plots: validation accuracy against each hyperparameter, coloured by stage; the first two
  hyperparameters against each other, coloured by accuracy."""
  space = search.parse(results["space"], BOUNDS)
  names = list(space)
  panels = len(names) + (len(names) >= 2)
  fig, axes = common.plt.subplots(1, panels, figsize=(4.6 * panels, 4), layout="constrained", squeeze=False)
  floor = _floor(results)
  groups = [(f"stage {s['stage']} ({s['epochs']:g} ep)", s["members"], STAGE_COLORS[i % len(STAGE_COLORS)], "o")
            for i, s in enumerate(results["stages"])]
  groups.append((f"final ({results['final']['epochs']:g} ep, each seed)", results["final"]["members"], FINAL_COLOR,
                 "*"))
  for ax, name in zip(axes[0], names):
    for label, members, color, marker in groups:
      x = [m["hparams"][name] for m in members]
      y = [max(m["val_accuracy"], floor) for m in members]
      ax.scatter(x, y, s=28 if marker == "o" else 80, c=color, marker=marker, alpha=0.75, label=label,
                 edgecolors="none")
      gone = [(xi, floor) for xi, m in zip(x, members) if m["diverged_at"] is not None]
      if gone:
        ax.scatter(*zip(*gone), s=40, c=color, marker="x")
    ax.set(xscale="log" if space[name].kind == "log" else "linear", xlabel=name, ylabel="validation accuracy",
           ylim=(floor - 0.01, None), title=f"accuracy vs {name}")
    ax.grid(alpha=0.3)
  fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=len(groups), fontsize=8)
  if len(names) >= 2:
    ax = axes[0][-1]
    a, b = names[:2]
    everyone = [m for _, members, _, _ in groups for m in members]
    best = max(m["val_accuracy"] for m in everyone)
    for label, members, _, marker in groups:
      points = ax.scatter([m["hparams"][a] for m in members], [m["hparams"][b] for m in members],
                          c=[m["val_accuracy"] for m in members], cmap="viridis", vmin=floor, vmax=best,
                          s=30 if marker == "o" else 90, marker=marker, edgecolors="k", linewidths=0.3)
    fig.colorbar(points, ax=ax, label="validation accuracy")
    ax.set(xscale="log" if space[a].kind == "log" else "linear", yscale="log" if space[b].kind == "log" else
           "linear", xlabel=a, ylabel=b, title=f"{a} x {b} (o: search stages, *: final)")
  fig.suptitle(f"Coarse-to-fine search: accuracies below {floor:.2f} drawn at {floor:.2f}, x: diverged")
  common.save_figure(fig, path)


def plot_curves(results: dict, path: str) -> None:
  """Validation accuracy per epoch of every member, a panel per stage; the stage's top members drawn bold."""
  stages = [*results["stages"], {**results["final"], "stage": "final"}]
  fig, axes = common.plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.6), layout="constrained",
                                  sharey=True, squeeze=False)
  floor = _floor(results)
  ceiling = max(c["val_accuracy"] for stage in stages for m in stage["members"] for c in m["curve"]) + 0.01
  for ax, stage in zip(axes[0], stages):
    for m in stage["members"]:
      top = m["member"] in stage["top"]
      ax.plot([c["epoch"] for c in m["curve"]], [max(c["val_accuracy"], floor) for c in m["curve"]], "o-",
              color="C3" if top else "C0", alpha=0.9 if top else 0.35, linewidth=1.8 if top else 0.8,
              markersize=4 if top else 3, zorder=3 if top else 2)
    title = f"stage {stage['stage']}" if stage["stage"] != "final" else "final (per seed)"
    ax.set(xlabel="epoch", title=f"{title}: {len(stage['members'])} members", xlim=(0, stage["epochs"] * 1.05),
           ylim=(floor - 0.01, ceiling))
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("validation accuracy")
  fig.suptitle(f"Validation accuracy per epoch (red: each stage's top {results['settings']['top_k']}, the best "
               f"setting's seeds in the final; below "
               f"{floor:.2f} drawn at {floor:.2f})")
  common.save_figure(fig, path)


def _write_outputs(config, workdir: str, results: dict) -> None:
  header, rows = _rows(results)
  common.write_csv(os.path.join(workdir, "members.csv"), header, rows)
  best = results["best"]
  best_config = trainer_config(config, best["hparams"], epochs=config.study.final_epochs, seed=best["seeds"][0])
  common.write_json(os.path.join(workdir, "best_config.json"), config_lib.to_json_dict(best_config, "train"))
  plot_scatter(results, os.path.join(workdir, "scatter.png"))
  plot_curves(results, os.path.join(workdir, "curves.png"))
  common.write_json(os.path.join(workdir, "results.json"), results)


def report(results: dict) -> str:
  """The tables: each stage's top members, the final settings, the verdict."""
  names = list(search.parse(results["space"], BOUNDS).keys())
  lines = []
  for stage in results["stages"]:
    top = [m for m in stage["members"] if m["member"] in stage["top"]]
    top.sort(key=lambda m: stage["top"].index(m["member"]))
    lines.append(f"\nstage {stage['stage']}: {len(stage['members'])} members x {stage['epochs']:g} epochs from "
                 f"{stage['space']}")
    lines.append(common.format_table(["rank", "member", *names, "val acc", "val loss"],
                                     [[r + 1, m["member"], *(m["hparams"][n] for n in names), m["val_accuracy"],
                                       m["val_loss"] if m["val_loss"] is not None else "nan"]
                                      for r, m in enumerate(top)]))
  final = results["final"]
  lines.append(f"\nfinal: {len(final['settings'])} setting(s) x {len(final['per_setting'][0]['seeds'])} seed(s) x "
               f"{final['epochs']:g} epochs")
  lines.append(common.format_table([*names, "val acc", "test acc", "test acc per seed"],
                                   [[*(s["hparams"][n] for n in names), _pm(s["val_accuracy_mean"],
                                                                            s["val_accuracy_std"]),
                                     _pm(s["test_accuracy_mean"], s["test_accuracy_std"]),
                                     " ".join(f"{a:.4f}" for a in s["test_accuracy"])]
                                    for s in final["per_setting"]]))
  lines.append("\n" + results["verdict"])
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The binary.


CONFIG = None


def define_flags() -> None:
  """Defines the flags; called by `run` only, so importing this module (tests) clashes with no other binary."""
  global CONFIG
  CONFIG = config_lib.define_config_flag(BINARY, "sweep.py")
  flags.DEFINE_string("workdir", "runs/sweep", "Output folder: config.json, stages/, results.json, plots.")
  flags.DEFINE_bool("overwrite", False, "Discard a sweep with another config in --workdir first.")


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
    results = common.run_study_locked(run_sweep, config, FLAGS.workdir, binary=BINARY, resumable_keys=RESUMABLE_KEYS,
                                      overwrite=FLAGS.overwrite, what="sweep", log=log)
  except (ValueError, common.WorkdirBusy) as e:
    sys.exit(f"error: {e}")
  print(report(results))
  print(f"\nwrote {FLAGS.workdir}/results.json, members.csv, best_config.json, scatter.png, curves.png "
        f"(this invocation took {results['wall_time_s']:.0f} s; training {results['train_seconds']:.0f} s in all "
        "stages)")


def run():
  define_flags()
  common.run_main(main, __name__)


if __name__ == "__main__":
  run()
