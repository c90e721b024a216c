"""The Srivastava et al. Table 2 binary: the paper's rows, the momentum ramp against its closed form, max-norm on
the trained weights, reuse and exact extension of finished runs, and the verdicts recomputed from the runs."""

import csv
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from dlcore import checkpoint, data
from experiments import config_lib, dropout_mnist as dm, train_lib
from experiments.configs import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(rows, *, epochs=1.0, seeds=1, max_norm=1.0):
  config = schema.dropout_mnist()
  config.data.dataset = "synthetic"
  config.study.rows = tuple(rows)
  config.study.seeds = seeds
  config.loop.update(epochs=epochs, batch_size=250, log_every=5)
  config.optimizer.update(momentum_ramp_epochs=1.0, max_norm=max_norm)
  return config


def _params(run_dir):
  config = config_lib.load(str(run_dir), "train")
  dataset = data.load("synthetic", validation_size=0)
  template = train_lib.build_state(config, dataset, dataset.train.images[:250])
  with checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
    return ckpt.restore(template, log=lambda m: None)[0].params


def _kernels(params):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params) if getattr(path[-1], "key", "") == "kernel"}


def test_rows_are_the_papers_architectures_and_settings():
  config = schema.dropout_mnist()
  assert config.study.rows == tuple(r.key for r in dm.ROWS)
  expected = {  # key: (hidden, activation, paper MNIST error %, dropout, max-norm)
      "standard_2x800_logistic": ((800, 800), "sigmoid", 1.60, False, False),
      "dropout_3x1024_logistic": ((1024,) * 3, "sigmoid", 1.35, True, False),
      "dropout_3x1024_relu": ((1024,) * 3, "relu", 1.25, True, False),
      "dropout_3x1024_relu_original": ((1024,) * 3, "relu", 1.25, True, False),
      "dropout_maxnorm_3x1024_relu": ((1024,) * 3, "relu", 1.06, True, True),
      "control_3x1024_relu": ((1024,) * 3, "relu", None, False, False)}
  assert {r.key: (r.hidden, r.activation, r.paper_error, r.dropout, r.max_norm) for r in dm.ROWS} == expected
  assert [(r.key, s) for r, s in dm.runs(config)] == [
      ("standard_2x800_logistic", 0), ("dropout_3x1024_logistic", 0), ("dropout_3x1024_relu", 0),
      ("dropout_3x1024_relu", 1), ("dropout_3x1024_relu_original", 0), ("dropout_3x1024_relu_original", 1),
      ("dropout_maxnorm_3x1024_relu", 0), ("control_3x1024_relu", 0)]
  for row in dm.ROWS:
    tc = dm.trainer_config(config, row, 0, "mnist")
    train_lib.validate(tc)
    model = train_lib.build_model(tc, 10)
    keep = (0.8, 0.5) if row.dropout else (1.0, 1.0)
    assert (model.hidden, model.activation, model.input_keep_prob, model.keep_prob) == (row.hidden, row.activation,
                                                                                         *keep)
    assert model.dropout_mode == ("original" if row.key.endswith("_original") else "inverted")
    assert tc.optimizer.max_norm == (2.0 if row.max_norm else None)
    assert (tc.optimizer.name, tc.optimizer.initial_momentum, tc.optimizer.momentum) == ("momentum", 0.5, 0.95)
    assert tc.schedule.name == "exponential" and tc.data.validation_size == 0


def test_momentum_ramp_and_learning_rate_follow_their_closed_forms():
  config = schema.dropout_mnist()
  tc = dm.trainer_config(config, dm.ROWS[0], 0, "mnist")
  mu = train_lib.momentum_schedule(tc, 60000)
  lr = train_lib.learning_rate_schedule(tc, 60000)
  ramp = config.optimizer.momentum_ramp_epochs * 600  # 600 steps of 100 per epoch
  for t in (0, 1, 599, 3000, ramp - 1, ramp, ramp + 1, 50000):
    np.testing.assert_allclose(float(mu(t)), 0.5 + 0.45 * min(t / ramp, 1.0), rtol=1e-6)
    np.testing.assert_allclose(float(lr(t)), 0.05 * 0.98 ** (t / 600), rtol=1e-5)


def test_study_end_to_end_reuses_finished_runs(tmp_path):
  rows = ("dropout_3x1024_relu", "dropout_3x1024_relu_original", "dropout_maxnorm_3x1024_relu")
  config = _config(rows)
  dm.validate(config)
  logs = []
  results = dm.run_study(config, str(tmp_path), log=logs.append)
  assert results["dataset"] == "synthetic" and results["data_note"] is None
  run_dirs = {name: tmp_path / "runs" / name for name in
              ("dropout_3x1024_relu_seed0", "dropout_3x1024_relu_original_seed0", "dropout_maxnorm_3x1024_relu_seed0")}
  errors = {name: 1.0 - json.loads((d / "results.json").read_text())["test_accuracy"] for name, d in run_dirs.items()}
  assert [results["rows"][r]["errors"] for r in rows] == [[errors[f"{r}_seed0"]] for r in rows]
  with open(tmp_path / "results.csv") as f:
    csv_rows = list(csv.DictReader(f))
  assert [(r["row"], float(r["test_error"])) for r in csv_rows] == [(r, errors[f"{r}_seed0"]) for r in rows]
  # The forms verdict: one seed each, so the noise is the binomial one of 500 test images.
  inv, orig = errors["dropout_3x1024_relu_seed0"], errors["dropout_3x1024_relu_original_seed0"]
  p = (inv + orig) / 2
  se = math.sqrt(p * (1 - p) / 500 * 2)
  forms = results["forms"]
  assert forms["seed_se"] is None and forms["seeds"] == [1, 1]
  np.testing.assert_allclose([forms["difference"], forms["binomial_se"]], [orig - inv, se], rtol=1e-9)
  assert forms["same_within_noise"] == (abs(orig - inv) <= 2 * se)
  order = results["ordering"]["pairs"]
  assert order == [{"above": "dropout_3x1024_relu", "below": "dropout_maxnorm_3x1024_relu",
                    "holds": errors["dropout_maxnorm_3x1024_relu_seed0"] < inv}]
  assert (tmp_path / "errors.png").stat().st_size > 10000
  assert "Srivastava et al. 2014 Table 2 on synthetic" in (tmp_path / "table.txt").read_text()

  # Max-norm holds on the trained weights (c = 1 binds He-initialised columns, of norm about sqrt(2)); the run
  # without it keeps longer columns.
  for name, bound in (("dropout_maxnorm_3x1024_relu_seed0", True), ("dropout_3x1024_relu_seed0", False)):
    norms = np.concatenate([np.sqrt((k.astype(np.float64) ** 2).sum(axis=0))
                            for k in _kernels(_params(run_dirs[name])).values()])
    if bound:
      assert norms.max() <= 1.0 + 1e-5 and np.mean(norms > 0.99) > 0.5
    else:
      assert norms.max() > 1.2

  # The same command again trains nothing: every run is finished, its files untouched, the results the same.
  before = {name: (d / "metrics.jsonl").read_bytes() for name, d in run_dirs.items()}
  logs.clear()
  again = dm.run_study(config, str(tmp_path), log=logs.append)
  assert sum("; finished;" in line for line in logs) == 3
  assert {name: (d / "metrics.jsonl").read_bytes() for name, d in run_dirs.items()} == before
  assert again["rows"] == results["rows"] and again["forms"] == results["forms"]


def test_extending_the_study_equals_the_longer_run(tmp_path):
  rows = ("standard_2x800_logistic",)  # the smallest net; the extension is the trainer's, whatever the row
  dm.run_study(_config(rows, epochs=1.0), str(tmp_path / "short"), log=lambda m: None)
  extended = dm.run_study(_config(rows, epochs=2.0), str(tmp_path / "short"), log=lambda m: None)
  straight = dm.run_study(_config(rows, epochs=2.0), str(tmp_path / "long"), log=lambda m: None)
  assert extended["rows"] == straight["rows"] and extended["curves"] == straight["curves"]
  name = "standard_2x800_logistic_seed0"
  a, b = _kernels(_params(tmp_path / "short" / "runs" / name)), _kernels(_params(tmp_path / "long" / "runs" / name))
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("change, message", [
    (dict(rows=("dropout_3x1024_relu", "bogus")), "study.rows must be one of"),
    (dict(rows=()), "study.rows is empty"),
    (dict(seeds=0), "study.seeds must be > 0"),
])
def test_validate_names_the_key(change, message):
  config = _config(("dropout_3x1024_relu",))
  config.study.update(change)
  with pytest.raises(ValueError, match=message):
    dm.validate(config)
  config = _config(("dropout_3x1024_relu",))
  config.data.data_dir = "/somewhere"
  with pytest.raises(ValueError, match="data.data_dir must be unset for data.dataset='synthetic'"):
    dm.validate(config)


@pytest.mark.parametrize("changes, message", [
    ({"optimizer.name": "adam", "optimizer.initial_momentum": 0.5},
     "optimizer.initial_momentum=0.5 has no effect: optimizer.name is 'adam'"),
    ({"optimizer.momentum_ramp_epochs": 2.0}, "optimizer.momentum_ramp_epochs=2.0 has no effect: "
                                              "optimizer.initial_momentum is unset"),
    ({"optimizer.initial_momentum": 0.5}, "optimizer.momentum_ramp_epochs must be > 0"),
    ({"optimizer.initial_momentum": 1.0, "optimizer.momentum_ramp_epochs": 1.0}, "optimizer.initial_momentum"),
    ({"optimizer.max_norm": 0.0}, "max_norm must be > 0"),
    ({"model.name": "lenet5", "model.input_keep_prob": 0.8},
     "model.input_keep_prob=0.8 has no effect on model 'lenet5'"),
    ({"model.dropout_mode": "original"}, "model.dropout_mode='original' has no effect: keep_prob is 1 and "
                                         "input_keep_prob is 1"),
    ({"model.input_keep_prob": 0.0}, "input_keep_prob must be in (0.0, 1.0], got 0.0"),
])
def test_trainer_refuses_new_keys_that_would_do_nothing(changes, message):
  config = schema.train()
  for key, value in changes.items():
    group, name = key.split(".")
    config[group][name] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    train_lib.validate(config)


def test_trainer_takes_input_dropout_alone_with_either_mode():
  config = schema.train()
  config.model.update(input_keep_prob=0.8, dropout_mode="original")
  train_lib.validate(config)
  assert train_lib.build_model(config, 10).input_keep_prob == 0.8


def test_epochs_flag_is_the_config_key_and_refuses_a_disagreement(tmp_path):
  def run(*args):
    return subprocess.run([sys.executable, "-m", "experiments.dropout_mnist", f"--workdir={tmp_path}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  both = run("--epochs=2", "--config.loop.epochs=3")
  assert both.returncode != 0 and "--epochs=2 and --config.loop.epochs=3 disagree" in both.stderr
  zero = run("--epochs=0")  # reaches the config: the trainer's own check names the key
  assert zero.returncode != 0 and "loop.epochs must be > 0, got 0.0" in zero.stderr, zero.stderr
  assert not os.listdir(tmp_path)
