"""The learning-rate range test: its schedule and suggestions against closed forms, a run on synthetic data end to
end (files, smoothing, the divergence stop), and bad configs refused naming the key with nothing written."""

import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dlcore import optim
from experiments import config_lib, lr_finder
from experiments.configs import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**study):
  config = schema.lr_finder()
  config.data.dataset = "synthetic"
  config.model.hidden = (32,)
  config.loop.batch_size = 64
  config.study.update(ramp_steps=50, **study)
  return config


def _closed_form(min_lr, max_lr, steps):
  return min_lr * (max_lr / min_lr) ** (np.arange(steps) / (steps - 1))


def test_schedule_is_the_exponential_sweep_and_drives_the_optimiser():
  min_lr, max_lr, steps = 1e-6, 10.0, 200
  expected = _closed_form(min_lr, max_lr, steps)
  schedule = lr_finder.exponential_schedule(min_lr, max_lr, steps)
  np.testing.assert_allclose(jax.jit(schedule)(np.arange(steps)), expected, rtol=2e-5)
  np.testing.assert_allclose([lr_finder.sweep_rate(min_lr, max_lr, steps, t) for t in range(steps)], expected,
                             rtol=1e-12)
  tx = optim.optimizer("sgd", schedule)  # update t is -lr_t * gradient
  opt_state, updates = tx.init(np.zeros(1, np.float32)), []
  for _ in range(5):
    update, opt_state = tx.update(np.ones(1, np.float32), opt_state)
    updates.append(-float(update[0]))
  np.testing.assert_allclose(updates, expected[:5], rtol=2e-5)


def test_suggestions_on_a_curve_with_a_known_steepest_point():
  lrs = _closed_form(1e-6, 10.0, 141)  # 20 points per decade: 1e-2 is lrs[80]
  x, x0, x1 = np.log(lrs), np.log(1e-2), np.log(1.0)
  # -tanh falls fastest in log(lr) at x0; central differences on a grid through x0 are steepest there. The rising
  # term (the divergence) has slope below 1e-9 near x0.
  curve = 2.0 - np.tanh(x - x0) + np.exp(5.0 * (x - x1))
  got = lr_finder.suggest(lrs, curve)
  assert got["steepest"] == pytest.approx(1e-2, rel=1e-9)
  assert got["minimum"] == lrs[np.argmin(curve)] and 1e-2 < got["minimum"] < 1.0
  assert got["minimum_over_10"] == pytest.approx(got["minimum"] / 10)
  with_nan_tail = lr_finder.suggest(lrs, np.concatenate([curve[:120], [np.nan] * 21]))
  assert with_nan_tail == lr_finder.suggest(lrs[:120], curve[:120])  # non-finite values end the curve
  rising = lr_finder.suggest(lrs, np.exp(x))
  assert rising["steepest"] is None and rising["minimum"] == lrs[0]
  assert lr_finder.suggest(lrs, np.full(141, np.nan)) == {"steepest": None, "minimum": None, "minimum_over_10": None}


def _read_csv(path):
  with open(path) as f:
    rows = list(csv.DictReader(f))
  return {key: np.array([float(r[key]) for r in rows]) for key in ("step", "lr", "loss", "smoothed")}


def test_end_to_end_on_synthetic_writes_every_file(tmp_path):
  config = _config(min_lr=1e-4, max_lr=1.0, smooth=0.9)
  lines = []
  results = lr_finder.range_test(config, str(tmp_path), log=lines.append)
  out = "\n".join(lines)
  assert "step 10/50" in out and "suggested learning rate" in out and "minimum / 10" in out
  assert results["stopped"] == "completed" and results["steps_run"] == 50

  rows = _read_csv(tmp_path / "lr_finder.csv")
  np.testing.assert_array_equal(rows["step"], np.arange(50))
  np.testing.assert_allclose(rows["lr"], _closed_form(1e-4, 1.0, 50), rtol=1e-12)
  beta, t = 0.9, np.arange(50)
  weights = (1 - beta) * beta ** (t[:, None] - t[None, :]) * (t[None, :] <= t[:, None])
  np.testing.assert_allclose(rows["smoothed"], weights @ rows["loss"] / (1 - beta ** (t + 1)), rtol=1e-12)
  assert rows["smoothed"][-1] < rows["smoothed"][0]  # the tiny MLP learns within the sweep
  assert results["suggestions"] == lr_finder.suggest(rows["lr"], rows["smoothed"])
  assert results["suggested_lr"] == results["suggestions"]["steepest"] is not None

  assert json.loads((tmp_path / "results.json").read_text()) == results
  assert config_lib.flat(config_lib.load(str(tmp_path), "lr_finder")) == config_lib.flat(config)
  assert (tmp_path / "lr_finder.png").stat().st_size > 10_000


def test_a_huge_max_lr_stops_when_the_smoothed_loss_diverges(tmp_path):
  results = lr_finder.range_test(_config(max_lr=1e6), str(tmp_path), log=lambda message: None)
  assert results["stopped"] in ("diverged", "non_finite") and results["steps_run"] < 50, results
  rows = _read_csv(tmp_path / "lr_finder.csv")
  assert len(rows["step"]) == results["steps_run"]
  smoothed = rows["smoothed"]
  # Only the last step breaks the rule: smoothed > stop_factor x the minimum so far, or a non-finite loss.
  ok = np.isfinite(rows["loss"][:-1]) & (smoothed[:-1] <= 4.0 * np.minimum.accumulate(smoothed[:-1]))
  assert ok.all()
  assert not np.isfinite(rows["loss"][-1]) or smoothed[-1] > 4.0 * smoothed[:-1].min()
  assert results["suggestions"]["minimum"] < results["last_lr"]


@pytest.mark.parametrize("key,value,match", [
    ("min_lr", 0.0, r"study.min_lr must be in \(0.0, inf\)"),
    ("max_lr", 1e-7, r"study.max_lr must be finite and > study.min_lr=1e-06"),
    ("max_lr", float("inf"), r"study.max_lr must be finite"),
    ("ramp_steps", 1, r"study.ramp_steps must be >= 2"),
    ("smooth", 1.0, r"study.smooth must be in \[0.0, 1.0\)"),
    ("stop_factor", 1.0, r"study.stop_factor must be in \(1.0, inf\)")])
def test_bad_study_values_name_the_key(key, value, match, tmp_path):
  config = _config()
  config.study[key] = value
  with pytest.raises(ValueError, match=match):
    lr_finder.range_test(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_the_trainers_checks_apply_to_the_shared_groups(tmp_path):
  config = _config()
  config.loss.hinge_delta = 2.0
  with pytest.raises(ValueError, match="loss.hinge_delta=2.0 has no effect"):
    lr_finder.validate(config)
  config = _config()
  config.loop.batch_size = 10**5
  with pytest.raises(ValueError, match="loop.batch_size 100000 is larger than the training set"):
    lr_finder.range_test(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_binary_reports_a_bad_value_in_one_line_and_writes_nothing(tmp_path):
  cmd = [sys.executable, "-m", "experiments.lr_finder", "--config.study.ramp_steps=1", f"--workdir={tmp_path / 'w'}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0
  assert proc.stderr.strip() == "error: study.ramp_steps must be >= 2 (the sweep's first and last rate), got 1"
  assert not (tmp_path / "w").exists()
