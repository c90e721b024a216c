"""train_and_evaluate(config, workdir): one training run, shared by the trainer and the study binaries.

`config` is a flat dict whose keys are the trainer's flag names (DEFAULTS lists them all). The run writes to
`workdir`: config.json, metrics.jsonl, tensorboard/, checkpoints/, curves.png and results.json; started again
with the same workdir and config it resumes from the latest checkpoint.
"""

import glob
import io
import json
import math
import os
import shutil
import time

import jax
import numpy as np

from dlcore import checkpoint, data, ensemble, loop, models, optim, parallel, state as state_lib, summaries, train
from . import common

DEFAULTS = {
    "dataset": "fashion_mnist", "data_dir": None, "download": False, "validation_size": -1, "preprocess": "none", "augment": "",
    "model": "mlp", "hidden": [512, 512], "activation": "relu", "init": "he_normal", "init_scale": None,
    "batchnorm": None, "bn_momentum": 0.9, "bn_running_var": "biased", "keep_prob": 1.0,
    "dropout_mode": "inverted", "shortcut": "projection",
    "loss": "cross_entropy", "label_smoothing": 0.0, "hinge_delta": 1.0,
    "penalty": "none", "penalty_strength": 0.0, "l1_ratio": 0.5,
    "optimizer": "momentum", "learning_rate": 0.1, "momentum": 0.9, "weight_decay": 0.0,
    "weight_decay_mode": "decoupled", "clip_norm": None, "schedule": "warmup_cosine", "schedule_params": {},
    "batch_size": 128, "epochs": 5.0, "steps": 0, "eval_every": 0, "log_every": 100, "checkpoint_every": 0,
    "keep_checkpoints": 3, "patience": 0, "seed": 0, "snapshot_ensemble": False, "ensemble": [],
    "num_devices": None, "bn_stats": "global", "dtype": "float32",
}
# Keys that may differ when a run is resumed: they change where or how often, not what is computed.
RESUMABLE_KEYS = ("log_every", "num_devices", "data_dir", "download", "ensemble")


# Config keys that are model options: key -> the option's name in `dlcore.models`.
MODEL_KEYS = {"hidden": "hidden", "activation": "activation", "init": "initializer", "init_scale": "init_scale",
              "batchnorm": "batchnorm", "bn_momentum": "bn_momentum", "bn_running_var": "bn_running_var",
              "keep_prob": "keep_prob", "dropout_mode": "dropout_mode", "shortcut": "shortcut", "dtype": "dtype"}


def build_model(config: dict, num_classes: int):
  """The model `config` names, with every model key it sets; a key set away from its default that the model
  does not take, or that has no effect in this configuration, is a ValueError naming the key."""
  config = {**DEFAULTS, **config}
  name = config["model"]
  takes = models.options(name)
  kwargs = {"num_classes": num_classes}
  for key, option in MODEL_KEYS.items():
    value = config[key]
    if option in takes:
      if value is not None or key != "batchnorm":  # batchnorm None: the model's own default
        kwargs[option] = {"hidden": tuple, "dtype": models.compute_dtype}.get(key, lambda v: v)(value)
    elif value != DEFAULTS[key]:
      raise ValueError(f"{key}={value!r} has no effect on model {name!r}; its options are: {', '.join(takes)}")
  model = models.get(name, **kwargs)
  idle = {"dropout_mode": model.keep_prob == 1.0, "bn_momentum": model.batchnorm == "none",
          "bn_running_var": model.batchnorm == "none"}
  for key, is_idle in idle.items():
    if is_idle and config[key] != DEFAULTS[key]:
      reason = "keep_prob is 1 (no dropout)" if key == "dropout_mode" else "the model has no BatchNorm"
      raise ValueError(f"{key}={config[key]!r} has no effect: {reason}")
  return model


def check_workdir(workdir: str, config: dict, overwrite: bool) -> None:
  """Refuses a workdir holding a run with another config, unless `overwrite` (which clears it)."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diff = sorted(k for k in set(old) | set(config)
                  if k not in RESUMABLE_KEYS and old.get(k) != config.get(k))
    if diff and not overwrite:
      changes = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
      raise ValueError(f"--workdir {workdir} holds a run with a different config ({changes}); pass --overwrite "
                       "to discard it, or use another --workdir")
    if overwrite:
      shutil.rmtree(workdir)
  os.makedirs(workdir, exist_ok=True)


def plot_curves(metrics_path: str, out_path: str, eval_name: str) -> None:
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


def plan_steps(config: dict, train_size: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps): --steps if set, else --epochs worth of full batches."""
  config = {**DEFAULTS, **config}
  if config["batch_size"] > train_size:
    raise ValueError(f"--batch_size {config['batch_size']} is larger than the training set ({train_size} examples)")
  steps_per_epoch = train_size // config["batch_size"]
  return steps_per_epoch, config["steps"] or max(1, math.ceil(config["epochs"] * steps_per_epoch))


def build_state(config: dict, dataset: data.Dataset, sample: np.ndarray) -> state_lib.TrainState:
  """The initial TrainState of a run: model, optimiser and schedule as `config` says, initialised on `sample`."""
  config = {**DEFAULTS, **config}
  steps_per_epoch, total_steps = plan_steps(config, len(dataset.train))
  lr = optim.schedule(config["schedule"], config["learning_rate"], steps_per_epoch=steps_per_epoch,
                      total_steps=total_steps, **config["schedule_params"])
  tx = optim.optimizer(config["optimizer"], lr, momentum=config["momentum"],
                       weight_decay=config["weight_decay"], weight_decay_mode=config["weight_decay_mode"],
                       clip_norm=config["clip_norm"])
  model = build_model(config, dataset.num_classes)
  return state_lib.create(model, tx, sample, config["seed"], lsuv_batch=sample)


def train_and_evaluate(config: dict, workdir: str, *, dataset: data.Dataset | None = None,
                       log=print) -> dict:
  """Trains as `config` says, evaluates on the test split and returns (and writes) results.json's dict.

  `dataset` may be passed in by callers that load once and train several runs.
  """
  config = {**DEFAULTS, **config}
  unknown = sorted(set(config) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"unknown config keys {unknown}; valid keys: {', '.join(sorted(DEFAULTS))}")
  is_main = jax.process_index() == 0
  if not is_main:
    log = lambda message: None
  start = time.perf_counter()

  if dataset is None:
    validation = None if config["validation_size"] < 0 else config["validation_size"]
    dataset = data.load(config["dataset"], data_dir=config["data_dir"], validation_size=validation,
                        tfds_download=config["download"])
  log(f"data: {dataset.source} | train {len(dataset.train)}, {dataset.eval_split_name} "
      f"{len(dataset.eval_split)}, test {len(dataset.test)}, image {dataset.image_shape}")
  if config["preprocess"] != "none":
    dataset, _ = data.preprocess.preprocess_dataset(dataset, config["preprocess"])

  mesh = parallel.make_mesh(config["num_devices"])
  parallel.check_batch_size(config["batch_size"], mesh)
  batch_size = config["batch_size"]
  steps_per_epoch, total_steps = plan_steps(config, len(dataset.train))
  procs = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_batches = data.TrainBatches(dataset.train, batch_size, seed=config["seed"], **procs)
  eval_batches = data.EvalBatches(dataset.eval_split, batch_size, **procs)
  test_batches = data.EvalBatches(dataset.test, batch_size, **procs)

  state = build_state(config, dataset, train_batches.batch_at(0)["image"])
  loss_kwargs = {"cross_entropy": {"label_smoothing": config["label_smoothing"]},
                 "hinge": {"delta": config["hinge_delta"]}}.get(config["loss"], {})
  augment = data.augment.make(config["augment"]) if config["augment"] else None
  train_step = train.make_train_step(config["loss"], config["penalty"], config["penalty_strength"],
                                     config["l1_ratio"], augment=augment, **loss_kwargs)
  eval_step = train.make_eval_step(config["loss"], **loss_kwargs)
  state = parallel.replicate(state, mesh)
  train_step = parallel.compile_train_step(train_step, mesh, state, bn_stats=config["bn_stats"])
  eval_step = parallel.compile_eval_step(eval_step, mesh)
  put_batch = lambda batch: parallel.shard_batch(batch, mesh)
  log(f"model {config['model']}: {sum(x.size for x in jax.tree.leaves(state.params)):,} params | "
      f"{total_steps} steps of {batch_size} ({total_steps / steps_per_epoch:.2f} epochs) on {mesh.size} device(s)")

  snapshot_steps = set()
  if config["snapshot_ensemble"]:
    if config["schedule"] != "sgdr":
      raise ValueError("--snapshot_ensemble needs --schedule=sgdr (snapshots are taken at the ends of its cycles)")
    params = config["schedule_params"]
    snapshot_steps = set(optim.sgdr_cycle_ends(params["first_period"], params.get("period_mult", 1), total_steps))
  snapshot_dir = os.path.join(workdir, "snapshots")

  def take_snapshot(step, st):
    if step in snapshot_steps:
      probs = loop.predict(st, test_batches, put_batch)
      if is_main:
        common.atomic_write(os.path.join(snapshot_dir, f"step_{step:08d}.npy"), _npy_bytes(probs))

  writer = summaries.MetricWriter(workdir, enabled=is_main)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config["keep_checkpoints"])
  if is_main:
    common.write_json(os.path.join(workdir, "config.json"), config)
  loop_config = loop.LoopConfig(total_steps, log_every=config["log_every"],
                                eval_every=config["eval_every"] or steps_per_epoch,
                                checkpoint_every=config["checkpoint_every"], patience=config["patience"])
  result = loop.fit(state, train_step, eval_step, train_batches, eval_batches, loop_config, checkpointer=ckpt,
                    writer=writer, put_batch=put_batch, eval_split=dataset.eval_split_name, log=log,
                    on_step=take_snapshot if snapshot_steps else None)
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
  if config["ensemble"]:
    members[f"this run ({workdir})"] = loop.predict(state, test_batches, put_batch)
    for other in config["ensemble"]:
      members[other] = _predict_other_run(other, config, state, test_batches, put_batch)
  if members:
    results["ensemble"] = ensemble.report(members, dataset.test.labels)
    rows = [[name, s["accuracy"], s["loss"]] for name, s in results["ensemble"]["members"].items()]
    rows.append(["ensemble (mean probabilities)", results["ensemble"]["ensemble"]["accuracy"],
                 results["ensemble"]["ensemble"]["loss"]])
    log("\n" + common.format_table(["member", "test accuracy", "test loss"], rows))

  if is_main:
    plot_curves(writer.path, os.path.join(workdir, "curves.png"), dataset.eval_split_name)
    common.write_json(os.path.join(workdir, "results.json"), results)
  writer.close()
  ckpt.close()
  return results


def _npy_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, array)
  return buf.getvalue()


def _predict_other_run(other: str, config: dict, template, batches, put_batch) -> np.ndarray:
  """Test probabilities of another run's latest checkpoint; its model config must match this run's."""
  with open(os.path.join(other, "config.json")) as f:
    other_config = json.load(f)
  model_keys = ("dataset", "preprocess", "model", *MODEL_KEYS)
  diff = [k for k in model_keys if other_config.get(k) != config.get(k)]
  if diff:
    raise ValueError(f"--ensemble member {other} has a different {', '.join(diff)}; members must share the model")
  ckpt = checkpoint.Checkpointer(os.path.join(other, "checkpoints"))
  restored, _ = ckpt.restore(template)
  ckpt.close()
  return loop.predict(restored, batches, put_batch)
