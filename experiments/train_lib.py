"""train_and_evaluate(config, workdir): one training run, shared by the trainer and the study binaries.

`config` is the trainer's ConfigDict (`configs.schema.train`: groups data, model, loss, optimizer, schedule,
loop, parallel, ensemble, transfer). `validate` checks all of it before any data is read or file written. The
run writes to `workdir`: config.json (loadable back as --config), metrics.jsonl, tensorboard/, checkpoints/,
curves.png (and diagnostics.png with loop.diagnostics) and results.json; started again with the same workdir and
config it resumes from the latest checkpoint, extends a finished run whose step budget grew, and leaves a
finished run untouched.

Transfer (`transfer.init_from` = a finished run's workdir): a new run starts from the params and BatchNorm
statistics of that run's last checkpoint (not its optimiser state), except the `transfer.reinit` layers, which
keep this run's fresh initialisation; the `transfer.freeze` layers get zero updates (and keep the source's
BatchNorm statistics), the other transferred layers train at `transfer.lr_scale` times the learning rate
(`dlcore.transfer`). init_from only seeds the start: a resumed run restores its own checkpoint.
"""

import dataclasses
import glob
import io
import math
import os
import shutil
import time

import jax
import numpy as np

from dlcore import (activations, checkpoint, checks, data, diagnostics, ensemble, initializers, loop, losses, models,
                    optim, parallel, state as state_lib, summaries, train, transfer)
from . import common, config_lib
from .configs import schema

__all__ = ["BINARY", "LENGTH_KEYS", "MODEL_KEYS", "RESUMABLE_KEYS", "Interrupted", "build_model", "build_state",
           "check_workdir", "last_checkpoint", "layer_names", "learning_rate_schedule", "load_dataset",
           "make_train_step", "momentum_schedule", "num_classes", "plan_steps", "train_and_evaluate",
           "training_source", "transfer_start", "validate", "validate_transfer"]

BINARY = "train"
# Keys that may differ when a run is resumed: they change where or how often, not what is computed.
RESUMABLE_KEYS = ("data.data_dir", "data.download", "data.resident", "loop.log_every", "loop.keep_checkpoints",
                  "loop.checkpoint_every", "loop.steps_per_call", "parallel.num_devices", "ensemble.members")
# Keys that set the run's length: raising them extends a run (check_workdir).
LENGTH_KEYS = ("loop.steps", "loop.epochs")
# model.<key> -> the option's name in dlcore.models.
MODEL_KEYS = {"hidden": "hidden", "activation": "activation", "init": "initializer", "init_scale": "init_scale",
              "batchnorm": "batchnorm", "bn_momentum": "bn_momentum", "bn_running_var": "bn_running_var",
              "keep_prob": "keep_prob", "input_keep_prob": "input_keep_prob", "dropout_mode": "dropout_mode",
              "shortcut": "shortcut", "dtype": "dtype"}
def _length_dependent(config) -> bool:
  """Whether the learning rate at a step depends on the run's total length."""
  return config.schedule.name == "warmup_cosine" or (config.schedule.name == "linear"
                                                      and config.schedule.decay_steps is None)


class Interrupted(Exception):
  """A run stopped on SIGTERM/SIGINT after checkpointing; re-running the same command resumes it."""

  def __init__(self, signal_name: str, step: int, workdir: str):
    super().__init__(f"{signal_name}: stopped after step {step} and checkpointed it; re-run the same command "
                     f"to resume from there ({workdir})")
    self.signal_name, self.step = signal_name, step


def _changed(config, key: str) -> bool:
  return config_lib.flat(config)[key] != config_lib.flat(schema.train())[key]


def build_model(config, num_classes: int):
  """The model `config.model` names, with every model key it sets; a key changed from its default that the
  model does not take, or that has no effect in this configuration, is a ValueError naming the key."""
  spec, defaults = config.model, schema.train().model
  takes = models.options(spec.name)
  kwargs = {"num_classes": num_classes}
  for key, option in MODEL_KEYS.items():
    value = spec[key]
    if option in takes:
      if value is not None or key != "batchnorm":  # batchnorm None: the model's own default
        kwargs[option] = {"hidden": tuple, "dtype": models.compute_dtype}.get(key, lambda v: v)(value)
    elif value != defaults[key]:
      keys = [f"model.{k}" for k, o in MODEL_KEYS.items() if o in takes]
      raise ValueError(f"model.{key}={value!r} has no effect on model {spec.name!r}; the model keys it reads: "
                       f"{', '.join(keys)}")
  model = models.get(spec.name, **kwargs)
  idle = {"dropout_mode": model.keep_prob == 1.0 and getattr(model, "input_keep_prob", 1.0) == 1.0,
          "bn_momentum": model.batchnorm == "none",
          "bn_running_var": model.batchnorm == "none"}
  for key, is_idle in idle.items():
    if is_idle and spec[key] != defaults[key]:
      reason = ("keep_prob is 1 and input_keep_prob is 1 (no dropout)" if key == "dropout_mode"
                else "the model has no BatchNorm")
      raise ValueError(f"model.{key}={spec[key]!r} has no effect: {reason}")
  return model


def _schedule_params(config) -> dict:
  return {k: v for k, v in config.schedule.items() if k != "name" and v is not None}


def num_classes(config) -> int | None:
  """The number of classes the run trains on: len(data.classes) when set, else None (the dataset's)."""
  return len(config.data.classes) or None


def layer_names(config) -> tuple[str, ...]:
  """The layer names (top-level params entries, `dlcore.transfer`) of the model `config` builds."""
  return transfer.layer_names(_layer_params(config))


def _layer_params(config):
  """The shapes of the model's params, initialised abstractly on a stand-in input (the layer names, which is
  what they are read for, do not depend on the input's shape)."""
  model = build_model(config, num_classes(config) or 10)
  sample = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
  return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)}, x,
                                             train=False), sample)["params"]


def last_checkpoint(workdir: str) -> int | None:
  """The step of the newest checkpoint folder in WORKDIR/checkpoints (None when there is none), read from the
  folder names without opening anything (a run that failed may hold a broken one)."""
  folder = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
  return max(steps, default=None)


def validate_transfer(config) -> None:
  """The transfer group's checks: the source is a finished run with a checkpoint, the layer names exist in this
  model and freeze and reinit do not contradict (ValueError naming the key and what is allowed)."""
  t = config.transfer
  if t.init_from is None:
    for key in ("reinit", "freeze", "lr_scale"):
      if _changed(config, f"transfer.{key}"):
        raise ValueError(f"transfer.{key}={t[key]!r} has no effect: transfer.init_from is not set")
    return
  checks.positive("transfer.lr_scale", t.lr_scale)
  source = t.init_from
  if not os.path.isdir(source):
    raise ValueError(f"transfer.init_from: {source} is not a folder (give a finished trainer run's --workdir)")
  for name in ("config.json", "results.json"):
    if not os.path.isfile(os.path.join(source, name)):
      raise ValueError(f"transfer.init_from: {source} holds no {name}; give a finished trainer run's --workdir")
  if last_checkpoint(source) is None:
    raise ValueError(f"transfer.init_from: {source} holds no checkpoint in checkpoints/")
  try:
    label_tree = transfer.labels(_layer_params(config), reinit=tuple(t.reinit), freeze=tuple(t.freeze))
  except ValueError as e:
    raise ValueError(f"transfer.{e}") from None
  if t.lr_scale != 1.0 and "transferred" not in jax.tree.leaves(label_tree):
    raise ValueError(f"transfer.lr_scale={t.lr_scale!r} has no effect: every layer is frozen or re-initialised")


def validate(config) -> None:
  """Every check that needs no data: names, ranges, and keys that would have no effect (ValueError naming the
  key and what is allowed). Run before anything is loaded or written."""
  c = config
  for group in ("model", "loss", "optimizer", "schedule"):  # names are case-insensitive: compare them lower-case
    c[group].name = c[group].name.lower()
  checks.non_negative("seed", c.seed)
  checks.lookup("data.dataset", {n: n for n in data.NAMES}, c.data.dataset)
  checks.one_of("data.preprocess", c.data.preprocess, data.preprocess.METHODS)
  data.augment.make(c.data.augment)
  if c.data.validation_size < -1:
    raise ValueError(f"data.validation_size must be >= -1 (-1: the dataset's default), got {c.data.validation_size}")
  checks.non_negative("data.subset", c.data.subset)
  checks.non_negative("data.per_class", c.data.per_class)
  classes = c.data.classes
  if classes and (len(classes) < 2 or len(set(classes)) != len(classes)
                  or not all(isinstance(k, int) and k >= 0 for k in classes)):
    raise ValueError(f"data.classes must be at least two distinct labels >= 0 (or () for all), got {classes!r}")
  for i, width in enumerate(c.model.hidden):
    if not isinstance(width, int) or width <= 0:
      raise ValueError(f"model.hidden[{i}] must be a positive integer, got {width!r} (model.hidden={c.model.hidden!r})")
  activations.get(c.model.activation)
  initializers.get(c.model.init, c.model.init_scale)
  models.compute_dtype(c.model.dtype)
  build_model(c, num_classes(c) or 10)
  losses.get(c.loss.name)
  checks.one_of("loss.penalty", c.loss.penalty, losses.PENALTIES)
  checks.in_range("loss.label_smoothing", c.loss.label_smoothing, 0.0, 1.0, high_open=True)
  checks.non_negative("loss.hinge_delta", c.loss.hinge_delta)
  checks.non_negative("loss.penalty_strength", c.loss.penalty_strength)
  checks.in_range("loss.l1_ratio", c.loss.l1_ratio, 0.0, 1.0)
  idle = {"loss.label_smoothing": (c.loss.name != "cross_entropy", f"loss.name is {c.loss.name!r}"),
          "loss.hinge_delta": (c.loss.name != "hinge", f"loss.name is {c.loss.name!r}"),
          "loss.penalty_strength": (c.loss.penalty == "none", "loss.penalty is 'none'"),
          "loss.l1_ratio": (c.loss.penalty != "elastic_net", f"loss.penalty is {c.loss.penalty!r}"),
          "optimizer.momentum": (c.optimizer.name not in ("momentum", "momentum_ema", "nesterov"),
                                 f"optimizer.name is {c.optimizer.name!r}"),
          "optimizer.initial_momentum": (c.optimizer.name not in ("momentum", "nesterov"),
                                         f"optimizer.name is {c.optimizer.name!r} (the ramp needs 'momentum' or "
                                         "'nesterov')"),
          "optimizer.momentum_ramp_epochs": (c.optimizer.initial_momentum is None,
                                             "optimizer.initial_momentum is unset (no ramp)"),
          "ensemble.snapshot": (c.schedule.name != "sgdr", "snapshots are taken at the ends of the cycles of "
                                "schedule.name='sgdr'")}
  for key, (is_idle, reason) in idle.items():
    if is_idle and _changed(c, key):
      raise ValueError(f"{key}={config_lib.flat(c)[key]!r} has no effect: {reason}")
  if c.optimizer.initial_momentum is not None:
    checks.in_range("optimizer.initial_momentum", c.optimizer.initial_momentum, 0.0, 1.0, high_open=True)
    checks.positive("optimizer.momentum_ramp_epochs", c.optimizer.momentum_ramp_epochs)
  optim.optimizer(c.optimizer.name, c.optimizer.learning_rate, momentum=c.optimizer.momentum,
                  weight_decay=c.optimizer.weight_decay, weight_decay_mode=c.optimizer.weight_decay_mode,
                  clip_norm=c.optimizer.clip_norm, max_norm=c.optimizer.max_norm)
  allowed = optim.schedule_params(checks.lookup("schedule.name", {n: n for n in optim.SCHEDULES}, c.schedule.name))
  for key in _schedule_params(c):
    if key not in allowed:
      raise ValueError(f"schedule.{key} has no effect with schedule.name={c.schedule.name!r}; it takes: "
                       f"{', '.join(allowed) or 'no parameters'}")
  try:  # the schedule's own checks (required and ranged parameters), on a stand-in length
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in _schedule_params(c).items()}
    optim.schedule(c.schedule.name, c.optimizer.learning_rate, steps_per_epoch=1,
                   total_steps=c.loop.steps or 10**6, **params)
  except ValueError as e:
    raise ValueError(f"schedule: {e}") from None
  checks.positive("loop.batch_size", c.loop.batch_size)
  if c.loop.steps < 0 or (c.loop.steps == 0 and not c.loop.epochs > 0):
    raise ValueError(f"the run needs loop.steps > 0 or loop.epochs > 0; got steps={c.loop.steps}, "
                     f"epochs={c.loop.epochs}")
  for key in ("eval_every", "log_every", "checkpoint_every", "patience", "steps_per_call"):
    checks.non_negative(f"loop.{key}", c.loop[key])
  checks.positive("loop.log_every", c.loop.log_every)
  checks.positive("loop.keep_checkpoints", c.loop.keep_checkpoints)
  if c.parallel.num_devices is not None:
    checks.positive("parallel.num_devices", c.parallel.num_devices)
  checks.one_of("parallel.bn_stats", c.parallel.bn_stats, parallel.BN_STATS)
  validate_transfer(c)
  for other in c.ensemble.members or ():
    if not os.path.isfile(os.path.join(other, "config.json")) or not os.path.isdir(os.path.join(other, "checkpoints")):
      raise ValueError(f"ensemble.members: {other} is not a finished run's workdir (no config.json and checkpoints/)")


def plan_steps(config, train_size: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps): loop.steps if set, else loop.epochs worth of full batches."""
  batch_size = config.loop.batch_size
  if batch_size > train_size:
    raise ValueError(f"loop.batch_size {batch_size} is larger than the training set ({train_size} examples)")
  steps_per_epoch = train_size // batch_size
  return steps_per_epoch, config.loop.steps or max(1, math.ceil(config.loop.epochs * steps_per_epoch))


def learning_rate_schedule(config, train_size: int):
  """The run's learning rate as a function of the step: schedule.* at optimizer.learning_rate over its length."""
  steps_per_epoch, total_steps = plan_steps(config, train_size)
  params = _schedule_params(config)
  if "boundaries" in params:
    params["boundaries"] = list(params["boundaries"])
  return optim.schedule(config.schedule.name, config.optimizer.learning_rate, steps_per_epoch=steps_per_epoch,
                        total_steps=total_steps, **params)


def momentum_schedule(config, train_size: int) -> optim.Momentum:
  """optimizer.momentum, or with optimizer.initial_momentum set the linear ramp from it to optimizer.momentum
  over optimizer.momentum_ramp_epochs (rounded to whole steps, at least one)."""
  o = config.optimizer
  if o.initial_momentum is None:
    return o.momentum
  steps_per_epoch, _ = plan_steps(config, train_size)
  return optim.momentum_ramp(o.initial_momentum, o.momentum, max(1, round(o.momentum_ramp_epochs * steps_per_epoch)))


def build_state(config, dataset: data.Dataset, sample: np.ndarray,
                learning_rate: optim.LearningRate | None = None) -> state_lib.TrainState:
  """The initial TrainState of a run: model, optimiser and schedule as `config` says, initialised on `sample`;
  `learning_rate` replaces the config's schedule (the learning-rate range test sweeps its own)."""
  o, t = config.optimizer, config.transfer
  if learning_rate is None:
    learning_rate = learning_rate_schedule(config, len(dataset.train))
  momentum = momentum_schedule(config, len(dataset.train))
  make = lambda lr, clip_norm=o.clip_norm: optim.optimizer(
      o.name, lr, momentum=momentum, weight_decay=o.weight_decay, weight_decay_mode=o.weight_decay_mode,
      clip_norm=clip_norm, max_norm=o.max_norm)
  if t.init_from is None:
    tx = make(learning_rate)
  else:  # frozen / transferred / new layers (the labels of the params tree)
    label_fn = lambda params: transfer.labels(params, reinit=tuple(t.reinit), freeze=tuple(t.freeze))
    tx = transfer.optimizer(lambda lr: make(lr, None), learning_rate, label_fn, lr_scale=t.lr_scale,
                            clip_norm=o.clip_norm)
  return state_lib.create(build_model(config, dataset.num_classes), tx, sample, config.seed, lsuv_batch=sample)


def transfer_start(config, state: state_lib.TrainState, log=print) -> state_lib.TrainState:
  """`state` with the params and BatchNorm statistics of the last checkpoint of `transfer.init_from`, except the
  `transfer.reinit` layers (ValueError naming a layer whose shapes differ)."""
  t = config.transfer
  with checkpoint.Checkpointer(os.path.join(t.init_from, "checkpoints")) as ckpt:
    step = ckpt.latest_step()
    source = ckpt.restore_variables(step)
  variables = transfer.transfer_variables(source, state.variables(), reinit=tuple(t.reinit))
  labels = transfer.labels(state.params, reinit=tuple(t.reinit), freeze=tuple(t.freeze))
  by_label = {k: [n for n in state.params if jax.tree.leaves(labels[n])[0] == k] for k in transfer.LABELS}
  log(f"transfer: from {t.init_from} (step {step}): transferred {', '.join(by_label['transferred']) or 'none'} "
      f"(lr x {t.lr_scale:g}), frozen {', '.join(by_label['frozen']) or 'none'}, re-initialised "
      f"{', '.join(by_label['new']) or 'none'}")
  return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])


def check_workdir(workdir: str, config, *, overwrite: bool = False, extend_schedule: bool = False,
                  binary: str = BINARY) -> str:
  """What to do with `workdir`: 'new', 'resume', or 'finished' (results.json exists and nothing changed).

  A run with another config is refused unless `overwrite` (which clears it). Raising loop.steps or loop.epochs
  resumes and extends it, unless its schedule depends on the total length: then `extend_schedule` must ask to
  continue with the schedule of the new length from the current step. Nothing is written here.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} exists and is not a folder")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return "new"
  if overwrite:  # everything but the lock the caller may hold
    for name in os.listdir(workdir):
      if name != ".lock":
        path = os.path.join(workdir, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    return "new"
  try:
    old = config_lib.flat(config_lib.load(path, binary))
  except config_lib.ConfigError as e:
    raise ValueError(f"--workdir {workdir} holds a config.json that cannot be read ({e}); pass --overwrite to "
                     "discard it, or use another --workdir") from None
  new = config_lib.flat(config)
  diff = sorted(k for k in new if k not in RESUMABLE_KEYS and old[k] != new[k])
  length = [k for k in diff if k in LENGTH_KEYS]
  others = [k for k in diff if k not in LENGTH_KEYS]
  if others:
    changes = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in others)
    raise ValueError(f"--workdir {workdir} holds a run with a different config ({changes}); pass --overwrite "
                     "to discard it, or use another --workdir")
  if length:
    shorter = (old["loop.steps"] and new["loop.steps"] and new["loop.steps"] < old["loop.steps"]) or (
        not old["loop.steps"] and not new["loop.steps"] and new["loop.epochs"] < old["loop.epochs"])
    mixed = bool(old["loop.steps"]) != bool(new["loop.steps"])
    if shorter or mixed:
      changes = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in length)
      raise ValueError(f"--workdir {workdir}: {changes} does not extend the run (only a longer run of the same "
                       "kind does); use another --workdir, or --overwrite")
    if _length_dependent(config) and not extend_schedule:
      raise ValueError(f"--workdir {workdir}: changing {', '.join(length)} changes schedule "
                       f"{config.schedule.name!r}, which depends on the run's length; pass --extend_schedule to "
                       "continue with the schedule of the new length from the current step, or use another "
                       "--workdir")
    return "resume"
  return "finished" if os.path.exists(os.path.join(workdir, "results.json")) else "resume"


def plot_curves(metrics_path: str, out_path: str, eval_name: str) -> None:
  """Loss and accuracy against step for the train and evaluation records of metrics.jsonl."""
  records = summaries.read(metrics_path)
  fig, (ax_loss, ax_acc) = common.plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
  for split, style in (("train", "-"), (eval_name, "o-")):
    rows = [r for r in records if r["split"] == split]
    if rows:
      steps = [r["step"] for r in rows]
      ax_loss.plot(steps, [r["loss"] for r in rows], style, label=split)
      ax_acc.plot(steps, [r["accuracy"] for r in rows], style, label=split)
  ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
  ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy")
  ax_acc.legend()
  common.save_figure(fig, out_path)


_DIAGNOSTIC_PANELS = (("learning_rate", "learning rate", "log"), ("param_norm", "||W||", "log"),
                      ("grad_norm", "||dL/dW||", "log"), ("update_ratio", "||W_new - W|| / ||W||", "log"),
                      ("dead", "dead units in the batch (fraction)", "linear"),
                      ("saturated", "saturated outputs (fraction)", "linear"))


def plot_diagnostics(metrics_path: str, out_path: str) -> None:
  """The train records' diagnostics against step: the learning rate, and per layer the weight and gradient
  norms, the update/weight ratio (with the lectures' 1e-3) and the dead or saturated fraction."""
  rows = [r for r in summaries.read(metrics_path) if r["split"] == "train"]
  panels = [(key, label, scale) for key, label, scale in _DIAGNOSTIC_PANELS
            if any(k == key or k.startswith(key + "/") for r in rows for k in r)]
  fig, axes = common.plt.subplots(2, 3, figsize=(15, 7.5), layout="constrained", squeeze=False)
  steps = [r["step"] for r in rows]
  layers = sorted({k.partition("/")[2] for r in rows for k in r if "/" in k})
  colors = {layer: common.plt.cm.tab10(i % 10) for i, layer in enumerate(layers)}  # one colour per layer
  for ax, (key, label, scale) in zip(axes.flat, panels):
    if any(key in r for r in rows):  # the run-wide value (the learning rate; the global gradient norm)
      ax.plot(steps, [r.get(key, float("nan")) for r in rows], color="k", label="all parameters" if layers else None)
    for layer in layers:
      if any(f"{key}/{layer}" in r for r in rows):
        ax.plot(steps, [r.get(f"{key}/{layer}", float("nan")) for r in rows], color=colors[layer], label=layer)
    if key == "update_ratio":
      ax.axhline(1e-3, color="gray", linestyle="--", linewidth=1, label="1e-3")
    ax.set(xlabel="step", ylabel=label, yscale=scale, title=label)
    if scale == "linear":
      ax.set_ylim(-0.02, 1.02)
    if ax.get_legend_handles_labels()[1] and key != "learning_rate":
      ax.legend(fontsize=7, ncol=1 + len(layers) // 10)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  common.save_figure(fig, out_path)


def load_dataset(config, *, full: data.Dataset | None = None) -> data.Dataset:
  """The dataset `config.data` names, with its validation split, classes and training subset (not
  preprocessed); `full`: that dataset already loaded with the validation split (callers training several runs
  on parts of one dataset load it once)."""
  c = config.data
  validation = None if c.validation_size < 0 else c.validation_size
  dataset = full or data.load(c.dataset, data_dir=c.data_dir, validation_size=validation, tfds_download=c.download)
  if c.classes or c.per_class:
    try:
      dataset = data.select_classes(dataset, c.classes or range(dataset.num_classes), per_class=c.per_class,
                                    seed=config.seed)
    except ValueError as e:
      raise ValueError(f"data.classes / data.per_class: {e}") from None
  if c.subset:
    if c.subset > len(dataset.train):
      raise ValueError(f"data.subset {c.subset} is larger than the training set ({len(dataset.train)} examples)")
    train_split = data.Split(dataset.train.images[:c.subset], dataset.train.labels[:c.subset])
    dataset = dataclasses.replace(dataset, train=train_split)
  return dataset


def _loss_kwargs(config) -> dict:
  return {"cross_entropy": {"label_smoothing": config.loss.label_smoothing},
          "hinge": {"delta": config.loss.hinge_delta}}.get(config.loss.name, {})


def make_train_step(config, layer_activations: dict | None = None):
  """The pure `train_step(state, batch)` of `config`'s loss, penalty and augmentation (dlcore.train), with the
  per-layer diagnostics of `layer_activations` (dlcore.diagnostics.layer_activations) when it is given."""
  augment = data.augment.make(config.data.augment) if config.data.augment else None
  step = train.make_train_step(config.loss.name, config.loss.penalty, config.loss.penalty_strength,
                               config.loss.l1_ratio, augment=augment, diagnostics=layer_activations,
                               **_loss_kwargs(config))
  freeze = tuple(config.transfer.freeze) if config.transfer.init_from is not None else ()
  if not freeze:
    return step

  def frozen_stats_step(state, batch):  # frozen layers keep the source's BatchNorm statistics
    new, metrics = step(state, batch)
    return new.replace(batch_stats=transfer.keep_frozen_stats(state.batch_stats, new.batch_stats, freeze)), metrics

  return frozen_stats_step


def training_source(batches: data.TrainBatches, mesh, *, resident: bool, steps_per_call: int, log):
  """`batches` on the device(s) (`resident` and it fits: a DeviceBatches running `steps_per_call` steps per call,
  0: the backend's default) or on the host; logs which (the config keys data.resident, loop.steps_per_call)."""
  if not resident:
    log("data path: host batches (data.resident=False)")
    return batches
  fits, why = data.resident.fits_on_device(sum(a.nbytes for a in batches.arrays().values()), mesh)
  if not fits:
    log(f"data path: host batches: the training set does not fit on the device ({why})")
    return batches
  log(f"data path: device-resident ({why})")
  return data.DeviceBatches(batches, mesh, steps_per_call=steps_per_call or None)


def train_and_evaluate(config, workdir: str, *, dataset: data.Dataset | None = None, log=print,
                       should_stop=lambda: None) -> dict:
  """Trains as `config` says, evaluates on the test split and returns (and writes) results.json's dict.

  `dataset` may be passed in by callers that load once and train several runs. `should_stop()` returns a reason
  (e.g. 'SIGTERM') to stop after the current step: the run checkpoints and raises `Interrupted`.
  Call `check_workdir` first; a finished run is not trained again.
  """
  validate(config)
  is_main = jax.process_index() == 0
  if not is_main:
    log = lambda message: None
  start = time.perf_counter()

  if dataset is None:
    dataset = load_dataset(config)
  log(f"data: {dataset.source} | train {len(dataset.train)}, {dataset.eval_split_name} "
      f"{len(dataset.eval_split)}, test {len(dataset.test)}, image {dataset.image_shape}")
  if config.data.preprocess != "none":
    dataset, _ = data.preprocess.preprocess_dataset(dataset, config.data.preprocess)

  mesh = parallel.make_mesh(config.parallel.num_devices)
  batch_size = config.loop.batch_size
  parallel.check_batch_size(batch_size, mesh)
  steps_per_epoch, total_steps = plan_steps(config, len(dataset.train))
  procs = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_batches = data.TrainBatches(dataset.train, batch_size, seed=config.seed, **procs)
  eval_batches = data.EvalBatches(dataset.eval_split, batch_size, **procs)
  test_batches = data.EvalBatches(dataset.test, batch_size, **procs)

  sample = train_batches.batch_at(0)["image"]
  state = build_state(config, dataset, sample)
  if config.transfer.init_from is not None and last_checkpoint(workdir) is None:
    state = transfer_start(config, state, log)  # a resumed run restores its own checkpoint instead
  layer_acts = None
  if config.loop.diagnostics:
    layer_acts = diagnostics.layer_activations(build_model(config, dataset.num_classes), state.variables(), sample)
    log("diagnostics (loop.diagnostics): per-layer norms and update/weight ratios of " + ", ".join(layer_acts) +
        "; dead units of relu layers, saturated units of tanh/sigmoid layers")
  step_fn = make_train_step(config, layer_acts)
  learning_rate = learning_rate_schedule(config, len(dataset.train))

  def train_step(st, batch):  # the step, plus the learning rate its update used
    new, metrics = step_fn(st, batch)
    return new, {**metrics, "learning_rate": learning_rate(st.step)}

  eval_step = train.make_eval_step(config.loss.name, **_loss_kwargs(config))
  state = parallel.replicate(state, mesh)
  train_step = parallel.compile_train_step(train_step, mesh, state, bn_stats=config.parallel.bn_stats)
  eval_step = parallel.compile_eval_step(eval_step, mesh)
  put_batch = lambda batch: parallel.shard_batch(batch, mesh)
  train_source = training_source(train_batches, mesh, resident=config.data.resident,
                                 steps_per_call=config.loop.steps_per_call, log=log)
  log(f"model {config.model.name}: {sum(x.size for x in jax.tree.leaves(state.params)):,} params | "
      f"{total_steps} steps of {batch_size} ({total_steps / steps_per_epoch:.2f} epochs) on {mesh.size} device(s)")

  snapshot_steps = set()
  if config.ensemble.snapshot:
    snapshot_steps = set(optim.sgdr_cycle_ends(config.schedule.first_period, config.schedule.period_mult or 1,
                                               total_steps))
  snapshot_dir = os.path.join(workdir, "snapshots")

  def take_snapshot(step, st):
    if step in snapshot_steps:
      probs = loop.predict(st, test_batches, put_batch)
      if is_main:
        common.atomic_write(os.path.join(snapshot_dir, f"step_{step:08d}.npy"), _npy_bytes(probs))

  hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config_lib.flat(config).items()}
  writer = summaries.MetricWriter(workdir, enabled=is_main, hparams=hparams)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.loop.keep_checkpoints)
  if is_main:
    common.write_json(os.path.join(workdir, "config.json"), config_lib.to_json_dict(config, BINARY))
    if os.path.exists(os.path.join(workdir, "results.json")):  # an extension: the old results no longer hold
      os.remove(os.path.join(workdir, "results.json"))
  loop_config = loop.LoopConfig(total_steps, log_every=config.loop.log_every,
                                eval_every=config.loop.eval_every or steps_per_epoch,
                                checkpoint_every=config.loop.checkpoint_every, patience=config.loop.patience)
  try:
    result = loop.fit(state, train_step, eval_step, train_source, eval_batches, loop_config, checkpointer=ckpt,
                      writer=writer, put_batch=put_batch, eval_split=dataset.eval_split_name, log=log,
                      on_step=take_snapshot if snapshot_steps else None, call_ends=snapshot_steps,
                      should_stop=should_stop)
  except BaseException:
    writer.close()
    ckpt.close()
    raise
  if result.stopped_by is not None:
    writer.close()
    ckpt.close()
    raise Interrupted(result.stopped_by, int(result.state.step), workdir)
  state = result.state

  test = loop.evaluate(state, eval_step, test_batches, put_batch)
  writer.write(int(state.step), "test", test)
  train_records = [r for r in summaries.read(writer.path) if r["split"] == "train"] if is_main else []
  results = {
      "test_accuracy": test["accuracy"], "test_loss": test["loss"], "steps": int(state.step),
      "epochs": int(state.step) / steps_per_epoch, "best_step": result.best_step,
      "best_eval_accuracy": max((e["accuracy"] for e in result.evals), default=None),
      "eval_split": dataset.eval_split_name, "stopped_early": result.stopped_early, "evals": result.evals,
      # The first window includes compilation; it counts only when it is the only one.
      "train_images_per_sec": float(np.median([r["images_per_sec"] for r in train_records[1:] or train_records]))
      if train_records else None,
      "wall_time_s": time.perf_counter() - start, "data_source": dataset.source, "devices": mesh.size,
  }

  members = {}
  if snapshot_steps:
    for path in sorted(glob.glob(os.path.join(snapshot_dir, "step_*.npy"))):
      members[f"snapshot@{int(os.path.basename(path)[5:13])}"] = np.load(path)
  if config.ensemble.members:
    members[f"this run ({workdir})"] = loop.predict(state, test_batches, put_batch)
    for other in config.ensemble.members:
      members[other] = _predict_other_run(other, config, state, test_batches, put_batch)
  if members:
    results["ensemble"] = ensemble.report(members, dataset.test.labels)
    rows = [[name, s["accuracy"], s["loss"]] for name, s in results["ensemble"]["members"].items()]
    rows.append(["ensemble (mean probabilities)", results["ensemble"]["ensemble"]["accuracy"],
                 results["ensemble"]["ensemble"]["loss"]])
    log("\n" + common.format_table(["member", "test accuracy", "test loss"], rows))

  if is_main:
    plot_curves(writer.path, os.path.join(workdir, "curves.png"), dataset.eval_split_name)
    if config.loop.diagnostics:
      plot_diagnostics(writer.path, os.path.join(workdir, "diagnostics.png"))
    common.write_json(os.path.join(workdir, "results.json"), results)
  writer.close()
  ckpt.close()
  return results


def _npy_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, array)
  return buf.getvalue()


def _predict_other_run(other: str, config, template, batches, put_batch) -> np.ndarray:
  """Test probabilities of another run's latest checkpoint; its data and model config must match this run's."""
  other_config = config_lib.flat(config_lib.load(other, BINARY))
  mine = config_lib.flat(config)
  keys = ("data.dataset", "data.preprocess", *(f"model.{k}" for k in MODEL_KEYS))
  diff = [k for k in keys if other_config[k] != mine[k]]
  if diff:
    raise ValueError(f"ensemble member {other} has a different {', '.join(diff)}; members must share the model")
  ckpt = checkpoint.Checkpointer(os.path.join(other, "checkpoints"))
  restored, _ = ckpt.restore(template)
  ckpt.close()
  return loop.predict(restored, batches, put_batch)
