"""The ReLU-vs-tanh binary (Krizhevsky et al. 2012 Fig. 1): end to end on a tiny JPEG image folder, rerun reuse,
bit-exact resume, and the epochs-to-target / speed-up arithmetic with its bounds."""

import csv
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dlcore import data
from experiments import relu_vs_tanh as rvt
from experiments.configs import schema
from experiments import train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ARGS = ["--config.study.lr_grid=(0.01, 0.03)", "--config.study.sweep_epochs=1", "--config.study.max_epochs=4",
        "--config.loop.batch_size=20", "--config.study.seeds=2"]


def _image_folder(root, per_class=12):
  """train/<class>/*.jpg and test/<class>/*.jpg: a noisy colour per class, 32x32, saved at PIL's quality 75."""
  rng = np.random.default_rng(0)
  colours = rng.uniform(0.1, 0.9, (len(CLASSES), 3))
  for split, n in (("train", per_class), ("test", 2)):
    for k, name in enumerate(CLASSES):
      os.makedirs(root / split / name)
      for i in range(n):
        image = np.clip(colours[k] + 0.15 * rng.standard_normal((32, 32, 3)), 0, 1)
        Image.fromarray((image * 255).astype(np.uint8)).save(root / split / name / f"{i:04d}.jpg")
  return root


def _binary(workdir, data_dir, *extra):
  cmd = [sys.executable, "-m", "experiments.relu_vs_tanh", f"--config.data.data_dir={data_dir}", f"--workdir={workdir}",
         *ARGS, *extra]
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout + proc.stderr, time.perf_counter() - start


def _study(data_dir, **overrides):
  study = {"activations": ["relu", "tanh"], "init": "lecun_normal", "lr_grid": [0.01, 0.03], "sweep_epochs": 1,
           "target_error": 0.25, "dataset": "cifar10", "data_dir": str(data_dir), "subset": 0,
           "preprocess": "mean_image", "max_epochs": 4, "batch": 20, "optimizer": "momentum", "momentum": 0.9,
           "seeds": [0, 1], "stop_at_target": False, "resident": True, "steps_per_call": 0}
  return {**study, **overrides}


def _curves(workdir):
  """{(activation, seed): [(epoch, step, train_error), ...]} from curves.csv."""
  curves = {}
  with open(os.path.join(workdir, "curves.csv")) as f:
    for row in csv.DictReader(f):
      curves.setdefault((row["activation"], int(row["seed"])), []).append(
          (int(row["epoch"]), int(row["step"]), float(row["train_error"])))
  return curves


def test_end_to_end_then_rerun_reuses_every_run(tmp_path):
  data_dir = _image_folder(tmp_path / "images")
  workdir = tmp_path / "study"
  out, first_seconds = _binary(workdir, data_dir)
  assert "CIFAR-10 (JPEG q75 proxy)" in out and "img/s" in out and "ETA" in out
  results = json.loads((workdir / "results.json").read_text())
  for key in ("speedup", "speedup_std", "speedup_kind", "speedups", "learning_rates", "sweep", "runs",
              "activations", "verdict", "data", "data_source", "target_error", "settings", "steps_per_epoch"):
    assert key in results, key
  assert results["data"].startswith("CIFAR-10 (JPEG q75 proxy)") and results["steps_per_epoch"] == 6
  assert results["verdict"] in out

  # The chosen rate is the one with the lowest training error after study.sweep_epochs (sweep.csv).
  with open(workdir / "sweep.csv") as f:
    sweep = list(csv.DictReader(f))
  for act in ("relu", "tanh"):
    errors = {float(r["learning_rate"]): float(r["train_error"]) for r in sweep if r["activation"] == act}
    assert set(errors) == {0.01, 0.03}
    assert results["learning_rates"][act] == min(errors, key=lambda lr: (errors[lr], lr))

  # Epochs (and steps) to target are the first logged epoch at or below the target; the ratio pairs seeds.
  curves = _curves(workdir)
  assert set(curves) == {(a, s) for a in ("relu", "tanh") for s in (0, 1)}
  epochs = {}
  for (act, seed), rows in curves.items():
    assert [r[0] for r in rows] == [1, 2, 3, 4] and [r[1] for r in rows] == [6, 12, 18, 24]
    epochs[act, seed] = next((e for e, _, err in rows if err <= 0.25), None)
    run = next(r for r in results["runs"] if (r["activation"], r["seed"]) == (act, seed))
    assert run["epochs_to_target"] == epochs[act, seed]
    assert run["steps_to_target"] == (None if epochs[act, seed] is None else 6 * epochs[act, seed])
    assert run["best_train_error"] == min(err for _, _, err in rows)
    assert run["learning_rate"] == results["learning_rates"][act]
  for act in ("relu", "tanh"):
    assert results["activations"][act]["epochs_to_target"] == [epochs[act, 0], epochs[act, 1]]
  per_seed = results["speedups"]["tanh"]["per_seed"]
  for seed, entry in zip((0, 1), per_seed):
    t, r = epochs["tanh", seed], epochs["relu", seed]
    expected = (t / r if t and r else (4 + 1) / r if r else t / (4 + 1) if t else None)
    assert entry["ratio"] == pytest.approx(expected) if expected is not None else entry["ratio"] is None
  if results["speedup_kind"] == "exact":
    assert results["speedup"] == pytest.approx(np.mean([p["ratio"] for p in per_seed]))
    assert results["speedup_std"] == pytest.approx(np.std([p["ratio"] for p in per_seed], ddof=1))
  png = (workdir / "training_error.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and (workdir / "lr_sweep.png").stat().st_size > 0
  assert json.loads((workdir / "runs" / f"relu_seed0_lr{results['learning_rates']['relu']:g}" / "curve.json")
                    .read_text())["records"][0]["epoch"] == 1

  # The same command again trains nothing and writes the same results.json.
  before = (workdir / "results.json").read_bytes()
  out2, second_seconds = _binary(workdir, data_dir)
  assert out2.count("reusing it") == 8 and " epoch 1/" not in out2
  assert (workdir / "results.json").read_bytes() == before
  assert second_seconds < first_seconds / 2, (first_seconds, second_seconds)

  # Another target / fewer epochs: analysed from the logged runs, no training. Nothing is at 1% after 1 epoch.
  logs = []
  short = rvt.run_study(_study(data_dir, max_epochs=1, target_error=0.01), str(workdir), log=logs.append)
  assert not any(" epoch 1/" in line for line in logs)
  assert short["speedup"] is None and short["speedup_kind"] == "undetermined"
  assert all(not r["reached_target"] and r["epochs_trained"] == 1 for r in short["runs"])
  assert short["activations"]["relu"]["epochs_kind"] == "lower_bound"
  assert "undetermined" in short["verdict"] and "best training errors" in short["verdict"]


def test_resumed_runs_equal_uninterrupted_ones_and_other_configs_are_refused(tmp_path):
  data_dir = _image_folder(tmp_path / "images")
  one = dict(activations=["relu"], lr_grid=[0.03])
  # Seed 1 trains 3 epochs in one go (the sweep uses seed 0).
  whole = rvt.run_study(_study(data_dir, seeds=[0, 1], max_epochs=3, **one), str(tmp_path / "whole"), log=print)
  # Seed 1 alone: 1 sweep epoch, resumed to 2, then to 3.
  logs = []
  rvt.run_study(_study(data_dir, seeds=[1], max_epochs=2, **one), str(tmp_path / "split"), log=logs.append)
  split = rvt.run_study(_study(data_dir, seeds=[1], max_epochs=3, **one), str(tmp_path / "split"),
                        log=logs.append)
  assert sum("resumed from epoch" in line for line in logs) == 2
  read = lambda d: json.loads((tmp_path / d / "runs" / "relu_seed1_lr0.03" / "curve.json").read_text())["records"]
  keys = ("epoch", "step", "train_error", "train_loss", "step_loss")
  assert [[r[k] for k in keys] for r in read("whole")] == [[r[k] for k in keys] for r in read("split")]
  assert whole["runs"][1]["best_train_error"] == split["runs"][0]["best_train_error"]

  with pytest.raises(ValueError, match="subset: 0 -> 100"):
    rvt.run_study(_study(data_dir, seeds=[1], subset=100, **one), str(tmp_path / "split"), log=print)
  rvt.run_study(_study(data_dir, seeds=[1], subset=100, max_epochs=1, **one), str(tmp_path / "split"),
                overwrite=True, log=print)


def _records(errors, diverged_at=None):
  return [{"epoch": i + 1, "step": 10 * (i + 1), "train_error": e, "diverged": i + 1 == diverged_at,
           "cum_train_seconds": 2.0 * (i + 1)} for i, e in enumerate(errors)]


def _run(errors, target=0.25, **kw):
  return rvt.summarize_run({"records": _records(errors, **kw), "steps_per_epoch": 10}, "x", 0, 0.1, target, "d")


def test_epochs_to_target_is_the_first_epoch_at_or_below_it_and_ignores_diverged_records():
  assert rvt.epochs_to_target(_records([0.5, 0.25, 0.1]), 0.25) == 2
  assert rvt.epochs_to_target(_records([0.5, 0.3]), 0.25) is None
  assert rvt.epochs_to_target(_records([0.5, 0.1], diverged_at=2), 0.25) is None
  run = _run([0.5, 0.2, 0.3])
  assert (run["epochs_to_target"], run["steps_to_target"], run["seconds_to_target"]) == (2, 20, 4.0)
  assert (run["best_train_error"], run["best_epoch"], run["final_train_error"]) == (0.2, 2, 0.3)


def test_speedup_is_exact_a_bound_or_undetermined():
  fast, slow, never = _run([0.3, 0.2]), _run([0.5, 0.4, 0.3, 0.2]), _run([0.5, 0.4, 0.3])
  exact = rvt.summarize_speedup([slow, slow], [fast, _run([0.2])])
  assert [p["ratio"] for p in exact["per_seed"]] == [2.0, 4.0]
  assert (exact["mean"], exact["std"], exact["kind"]) == (3.0, pytest.approx(np.sqrt(2)), "exact")
  lower = rvt.summarize_speedup([slow, never], [fast, fast])  # never: 3 epochs run, so at least 4 / 2
  assert [p["kind"] for p in lower["per_seed"]] == ["exact", "lower_bound"]
  assert (lower["mean"], lower["kind"]) == (2.0, "lower_bound")
  upper = rvt.summarize_speedup([fast], [never])
  assert (upper["mean"], upper["kind"]) == (0.5, "upper_bound")
  assert rvt.summarize_speedup([never], [never])["mean"] is None
  mixed = rvt.summarize_speedup([never, fast], [fast, never])
  assert (mixed["mean"], mixed["kind"]) == (None, "undetermined")
  single = rvt.summarize_speedup([slow], [fast])
  assert (single["mean"], single["std"]) == (2.0, None)
  act = rvt.summarize_activation([fast, never])
  assert (act["epochs_to_target"], act["epochs_to_target_mean"], act["epochs_kind"]) == ([2, None], 3.0,
                                                                                          "lower_bound")
  assert act["seconds_to_target_mean"] is None and act["reached"] == 1


def test_finished_depends_on_the_request():
  records = _records([0.5, 0.2])
  assert rvt.finished(records, 2, False, 0.25) and not rvt.finished(records, 3, False, 0.25)
  assert rvt.finished(records, 3, True, 0.25) and not rvt.finished(records[:1], 3, True, 0.25)
  assert rvt.finished(_records([0.5, 0.9], diverged_at=2), 5, False, 0.25)


def test_run_config_pins_a_constant_rate_and_no_regularisation_whatever_the_trainer_defaults(monkeypatch):
  original = schema.train

  def odd_defaults():
    config = original()
    config.schedule.name = "sgdr"
    config.optimizer.update(weight_decay=0.1, clip_norm=0.001)
    config.model.update(keep_prob=0.5, batchnorm="before", init_scale=3.0)
    config.data.augment = "flip"
    return config
  monkeypatch.setattr(rvt.schema, "train", odd_defaults)
  config = rvt.run_config(_study("/x"), "tanh", 3, 0.05)
  assert (config.model.batchnorm, config.model.keep_prob, config.optimizer.weight_decay, config.model.init_scale,
          config.optimizer.clip_norm, config.data.augment, config.schedule.name) == ("none", 1.0, 0.0, None, None,
                                                                                    "", "constant")
  dataset = data.synthetic(image_shape=(4, 4, 1), train_size=64, validation_size=0)
  # The optimiser as build_state makes it (a one-unit MLP keeps the eager init cheap).
  config.model.update(name="mlp", hidden=(1,))
  state = train_lib.build_state(config, dataset, dataset.train.images[:16])
  grads = jax.tree.map(jnp.ones_like, state.params)
  opt_state, update, step = state.opt_state, None, jax.jit(state.tx.update)
  for _ in range(200):  # constant rate, momentum 0.9: the update of a constant gradient tends to -lr / (1 - mu)
    update, opt_state = step(grads, opt_state, state.params)
  np.testing.assert_allclose(np.asarray(update["classifier"]["linear"]["bias"]), -0.5, rtol=1e-4)


@pytest.mark.parametrize("override, message", [
    ({"activations": ["relu", "nope"]}, "study.activations: unknown activation 'nope'"),
    ({"activations": ["relu", "relu"]}, "study.activations lists an activation twice"),
    ({"lr_grid": ["0.1", "fast"]}, "study.lr_grid entry 'fast' is not a number"),
    ({"lr_grid": [0.1, -1.0]}, "study.lr_grid entry must be > 0"),
    ({"target_error": 1.5}, "study.target_error must be in"),
    ({"max_epochs": 0}, "study.max_epochs must be > 0"),
    ({"subset": 10, "batch": 20}, "loop.batch_size 20 is larger than data.subset 10"),
    ({"optimizer": "lbfgs"}, "optimizer.name must be one of"),
])
def test_validate_names_the_config_key(override, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    rvt.validate(_study("/nowhere", **override))
