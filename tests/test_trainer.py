"""The general trainer: outputs, resume after SIGKILL or SIGTERM, logs true across restarts, extending a finished
run, workdir safety, early stopping, NaN guard, ensembles."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest


def _umask():
  mask = os.umask(0o022)
  os.umask(mask)
  return mask

from dlcore import checkpoint, data, ensemble, loop, optim, state as state_lib, train
from experiments import config_lib, train_lib
from experiments.configs import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--config.data.dataset=synthetic", "--config.model.hidden=(64,)", "--config.loop.batch_size=64",
        "--config.optimizer.learning_rate=0.05", "--config.schedule.name=constant", "--config.loop.log_every=10"]


def _config(**groups):
  """The trainer's config with {group: {key: value}} (or seed=...) changed."""
  config = schema.train()
  for group, values in groups.items():
    if isinstance(values, dict):
      config[group].update(values)
    else:
      config[group] = values
  return config


def _trainer(workdir, *extra, devices=1):
  cmd = [sys.executable, "-m", "experiments.train", *BASE, f"--workdir={workdir}", *extra]
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _final_params(workdir):
  config = config_lib.load(str(workdir), "train")
  dataset = data.load("synthetic")
  template = train_lib.build_state(config, dataset, dataset.train.images[:64])
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  restored, _ = ckpt.restore(template)
  ckpt.close()
  return restored


def test_trainer_end_to_end_writes_every_output(tmp_path):
  proc = _trainer(tmp_path, "--config.loop.steps=90", "--config.loop.eval_every=30")
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, out
  assert "img/s" in out and "ETA" in out and "test accuracy" in out
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["steps"] == 90 and results["test_accuracy"] > 0.9
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["split"] == "validation"] == [30, 60, 90]
  assert [r["step"] for r in records if r["split"] == "train"] == list(range(10, 91, 10))
  assert results["evals"][-1]["accuracy"] == [r for r in records if r["split"] == "validation"][-1]["accuracy"]
  assert json.loads((tmp_path / "config.json").read_text())["model"]["hidden"] == [64]
  assert [r["learning_rate"] for r in records if r["split"] == "train"] == pytest.approx([0.05] * 9)  # float32
  for name in ("config.json", "results.json", "metrics.jsonl", "curves.png"):  # readable by collaborators
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name
  assert (tmp_path / "curves.png").stat().st_size > 0
  assert any(name.startswith("events") for name in os.listdir(tmp_path / "tensorboard"))


def test_sigkill_then_resume_reaches_the_uninterrupted_parameters(tmp_path, devices=1):
  # 4 devices: the SIGTERM test in test_runs.py resumes on 4 devices through the same restore path.
  args = ["--config.loop.steps=600", "--config.loop.eval_every=100", "--config.loop.checkpoint_every=100",
          "--config.model.batchnorm=before", "--config.model.keep_prob=0.8"]
  reference = _trainer(tmp_path / "reference", *args, devices=devices)
  out, _ = reference.communicate(timeout=300)
  assert reference.returncode == 0, out
  assert f"on {devices} device(s)" in out

  killed = _trainer(tmp_path / "killed", *args, devices=devices)
  metrics = tmp_path / "killed" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline:
    if metrics.exists() and any(json.loads(l)["step"] >= 250 for l in metrics.read_text().splitlines()[:-1]):
      break
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert not (tmp_path / "killed" / "results.json").exists(), "the run finished before it was killed"

  resumed = _trainer(tmp_path / "killed", *args, devices=devices)
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out
  assert "resumed from step" in out
  a, b = _final_params(tmp_path / "reference"), _final_params(tmp_path / "killed")
  assert int(a.step) == int(b.step) == 600
  for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.opt_state)),
                  jax.tree.leaves((b.params, b.batch_stats, b.opt_state))):
    np.testing.assert_array_equal(x, y)
  ref = json.loads((tmp_path / "reference" / "results.json").read_text())
  res = json.loads((tmp_path / "killed" / "results.json").read_text())
  assert ref["test_loss"] == res["test_loss"]
  steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if json.loads(l)["split"] == "train"]
  assert steps == sorted(set(steps)), "metrics.jsonl must not repeat steps after a resume"


def test_different_config_is_refused_unless_overwrite(tmp_path):
  first = _trainer(tmp_path, "--config.loop.steps=5")
  assert first.wait(timeout=120) == 0
  clash = _trainer(tmp_path, "--config.loop.steps=5", "--config.optimizer.learning_rate=0.1")
  out, _ = clash.communicate(timeout=120)
  assert clash.returncode != 0 and "optimizer.learning_rate: 0.05 -> 0.1" in out and "--overwrite" in out
  over = _trainer(tmp_path, "--config.loop.steps=5", "--config.optimizer.learning_rate=0.1", "--overwrite")
  assert over.wait(timeout=120) == 0
  assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["learning_rate"] == 0.1


def test_bad_config_values_fail_with_the_key_named(tmp_path):
  proc = _trainer(tmp_path, "--config.loop.steps=5", "--config.loop.batch_size=5000")
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0 and "loop.batch_size 5000 is larger than the training set" in out
  proc = _trainer(tmp_path / "b", "--config.model.name=nope")
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0 and "lenet5" in out
  proc = _trainer(tmp_path / "c", "--config.model.dtype=float16")
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0 and "'float16'" in out and "bfloat16" in out
  assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_bfloat16_run_trains_and_checkpoints_float32_params(tmp_path):
  proc = _trainer(tmp_path, "--config.loop.steps=90", "--config.loop.eval_every=30", "--config.model.dtype=bfloat16")
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, out
  assert json.loads((tmp_path / "config.json").read_text())["model"]["dtype"] == "bfloat16"
  assert json.loads((tmp_path / "results.json").read_text())["test_accuracy"] > 0.9  # as float32 in the same 90 steps
  restored = _final_params(tmp_path)
  assert {a.dtype for a in jax.tree.leaves(restored.params)} == {np.dtype(np.float32)}


def _fit(tmp_path, lr, patience, steps=40, eval_every=5):
  dataset = data.load("synthetic")
  model = train_lib.build_model(_config(model={"hidden": (32,)}), dataset.num_classes)
  st = state_lib.create(model, optim.optimizer("sgd", lr), dataset.train.images[:2], 0)
  ckpt = checkpoint.Checkpointer(os.path.join(tmp_path, "ckpt"), keep=2)
  result = loop.fit(st, jax.jit(train.make_train_step()), jax.jit(train.make_eval_step()),
                    data.TrainBatches(dataset.train, 32), data.EvalBatches(dataset.validation, 100),
                    loop.LoopConfig(steps, log_every=5, eval_every=eval_every, patience=patience),
                    checkpointer=ckpt, log=lambda s: None)
  return result, ckpt


def test_early_stopping_restores_the_best_checkpoint(tmp_path):
  # lr so small that accuracy cannot improve on the first evaluation: stop after `patience` more evaluations.
  result, ckpt = _fit(tmp_path, lr=1e-9, patience=2)
  assert result.stopped_early
  assert [e["step"] for e in result.evals] == [5, 10, 15]
  assert result.best_step == 5 and int(result.state.step) == 5
  best, _ = ckpt.restore(result.state, step=5)
  for x, y in zip(jax.tree.leaves(best.params), jax.tree.leaves(result.state.params)):
    np.testing.assert_array_equal(x, y)
  ckpt.close()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  with pytest.raises(FloatingPointError, match=r"(at|after) step \d+.*last good checkpoint: step"):
    _fit(tmp_path, lr=1e12, patience=0, steps=40, eval_every=1)
  ckpt = checkpoint.Checkpointer(os.path.join(tmp_path, "ckpt"))
  assert ckpt.all_steps(), "the checkpoints saved before the NaN must be complete on disk"
  for step in ckpt.all_steps():
    restored, meta = ckpt.restore(_fit_template(), step=step)
    assert all(np.isfinite(e["loss"]) for e in meta["evals"])
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored.params))
  ckpt.close()


def _fit_template():
  dataset = data.load("synthetic")
  model = train_lib.build_model(_config(model={"hidden": (32,)}), dataset.num_classes)
  return state_lib.create(model, optim.optimizer("sgd", 0.1), dataset.train.images[:2], 0)


def test_snapshot_ensemble_averages_the_sgdr_cycle_ends(tmp_path):
  # log_every 25: the cycle ends 20 and 40 fall inside resident calls, which must end there for the snapshots
  config = _config(data={"dataset": "synthetic"}, model={"hidden": (32,)}, loop={"batch_size": 64, "steps": 60,
                   "log_every": 25}, schedule={"name": "sgdr", "first_period": 20}, ensemble={"snapshot": True})
  results = train_lib.train_and_evaluate(config, str(tmp_path), log=lambda s: None)
  members = results["ensemble"]["members"]
  assert list(members) == ["snapshot@20", "snapshot@40", "snapshot@60"]
  labels = data.load("synthetic").test.labels
  probs = [np.load(tmp_path / "snapshots" / f"step_{s:08d}.npy") for s in (20, 40, 60)]
  expected = np.mean(np.argmax(np.mean(probs, axis=0), -1) == labels)
  assert results["ensemble"]["ensemble"]["accuracy"] == pytest.approx(expected)
  # The last snapshot is the final model: its accuracy is the run's test accuracy.
  assert members["snapshot@60"]["accuracy"] == pytest.approx(results["test_accuracy"])


def test_resident_and_host_data_paths_give_the_same_run_and_say_which_runs(tmp_path, monkeypatch):
  groups = dict(model={"hidden": (32,)}, loop={"batch_size": 64, "steps": 45, "log_every": 10},
                schedule={"name": "constant"})
  results, logs = {}, {}
  for name, resident in (("host", False), ("resident", True)):
    logs[name] = []
    config = _config(data={"dataset": "synthetic", "resident": resident}, **groups)
    results[name] = train_lib.train_and_evaluate(config, str(tmp_path / name), log=logs[name].append)
  assert "data path: host batches (data.resident=False)" in logs["host"]
  assert any(line.startswith("data path: device-resident (") for line in logs["resident"])
  assert "device-resident data: 32 step(s) per call (the cpu default)" in logs["resident"]
  for key in ("test_accuracy", "test_loss", "evals"):
    assert results["resident"][key] == results["host"][key]
  train_log = lambda name: [line.split(" img/s")[0].rsplit("  ", 1)[0] for line in logs[name] if " img/s" in line]
  assert train_log("resident") == train_log("host") and len(train_log("host")) == 5
  monkeypatch.setattr(data.resident, "fits_on_device", lambda nbytes, mesh: (False, "too big"))
  logged = []
  train_lib.train_and_evaluate(_config(data={"dataset": "synthetic"}, **groups), str(tmp_path / "big"),
                               log=logged.append)
  assert "data path: host batches: the training set does not fit on the device (too big)" in logged


def test_seed_ensemble_of_runs(tmp_path):
  groups = dict(data={"dataset": "synthetic"}, model={"hidden": (32,)},
                loop={"batch_size": 64, "steps": 30, "log_every": 10})
  train_lib.train_and_evaluate(_config(seed=1, **groups), str(tmp_path / "s1"), log=lambda s: None)
  results = train_lib.train_and_evaluate(_config(seed=2, ensemble={"members": (str(tmp_path / "s1"),)}, **groups),
                                         str(tmp_path / "s2"), log=lambda s: None)
  report = results["ensemble"]
  assert len(report["members"]) == 2
  assert min(m["accuracy"] for m in report["members"].values()) <= report["ensemble"]["accuracy"] + 0.02


def test_ensemble_scores_against_numpy():
  rng = np.random.default_rng(0)
  a, b = rng.dirichlet(np.ones(3), 50), rng.dirichlet(np.ones(3), 50)
  labels = rng.integers(0, 3, 50)
  report = ensemble.report({"a": a, "b": b}, labels)
  mean = (a + b) / 2
  assert report["ensemble"]["accuracy"] == pytest.approx(np.mean(mean.argmax(1) == labels))
  assert report["ensemble"]["loss"] == pytest.approx(-np.mean(np.log(mean[np.arange(50), labels])))
  with pytest.raises(ValueError, match="same examples"):
    ensemble.average({"a": a, "b": b[:10]})
