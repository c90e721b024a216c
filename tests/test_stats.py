"""stats.py and the activation-statistics binary against numpy float64 and the lecture's published numbers."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dlcore import models, stats
from experiments import activation_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NP_ACT = {"tanh": np.tanh, "relu": lambda x: np.maximum(x, 0.0)}


def numpy_forward(variables, x, nonlinearity):
  """Post-activations of a bias-free MLP recomputed in float64 from the same kernels."""
  h = np.asarray(x, np.float64)
  posts = []
  for i in range(len(variables["params"])):
    h = NP_ACT[nonlinearity](h @ np.asarray(variables["params"][f"layer{i}"]["linear"]["kernel"], np.float64))
    posts.append(h)
  return posts


@pytest.mark.parametrize("nonlinearity,init,scale", [("tanh", "normal", 0.01), ("tanh", "normal", 1.0),
                                                     ("relu", "he_normal", None), ("tanh", "lecun_normal", None)])
def test_run_case_matches_numpy_forward(nonlinearity, init, scale):
  x = jax.random.normal(jax.random.key(0), (200, 60))
  case = activation_stats.Case(nonlinearity, init, scale)
  result = activation_stats.run_case(case, x, hidden=(60,) * 4, seed=3, grads=False)
  model = models.MLP(hidden=(60,) * 4, num_classes=0, activation=nonlinearity, initializer=init,
                     init_scale=scale, use_bias=False)
  variables = models.init_variables(model, jax.random.key(3), x)
  expected = numpy_forward(variables, x, nonlinearity)
  assert len(result["layers"]) == 4
  for record, post in zip(result["layers"], expected):
    np.testing.assert_allclose(record["mean"], post.mean(), atol=1e-5)
    np.testing.assert_allclose(record["std"], post.std(), rtol=1e-4)
    np.testing.assert_allclose(record["p50"], np.percentile(post, 50), atol=1e-5)


def test_lecture_tanh_small_gaussian_stds_collapse_as_published():
  # cs231n: 1000 x 500 unit-Gaussian inputs, W = 0.01 * randn(500, 500), tanh: 0.213, 0.0476, 0.0106, 0.00238.
  x = jax.random.normal(jax.random.key(0), (1000, 500))
  result = activation_stats.run_case(activation_stats.Case("tanh", "normal", 0.01), x, (500,) * 4, 1, False)
  np.testing.assert_allclose([r["std"] for r in result["layers"]], [0.213, 0.0476, 0.0106, 0.00238], rtol=0.03)


def test_lecture_relu_he_keeps_mean_and_std_in_every_layer():
  # Closed form for relu(N(0, 2)): mean = sqrt(2) / sqrt(2 pi) = 0.564, std = sqrt(1 - 1/pi) = 0.826.
  x = jax.random.normal(jax.random.key(0), (1000, 500))
  result = activation_stats.run_case(activation_stats.Case("relu", "he_normal"), x, (500,) * 6, 1, False)
  for record in result["layers"]:
    assert abs(record["mean"] - 1 / np.sqrt(np.pi)) < 0.05
    assert abs(record["std"] - np.sqrt(1 - 1 / np.pi)) < 0.06


def test_lecture_relu_lecun_halves_variance_per_layer():
  x = jax.random.normal(jax.random.key(0), (1000, 500))
  layers = activation_stats.run_case(activation_stats.Case("relu", "lecun_normal"), x, (500,) * 6, 1, False)["layers"]
  second_moments = [r["std"] ** 2 + r["mean"] ** 2 for r in layers]
  np.testing.assert_allclose(np.array(second_moments[1:]) / second_moments[:-1], 0.5, rtol=0.1)


def test_tanh_unit_gaussian_saturates_and_batchnorm_rescues():
  x = jax.random.normal(jax.random.key(0), (500, 300))
  big = activation_stats.run_case(activation_stats.Case("tanh", "normal", 1.0), x, (300,) * 3, 1, False)
  assert all(r["saturated"] > 0.85 for r in big["layers"])
  bn = activation_stats.run_case(activation_stats.Case("tanh", "normal", 0.01, "before"), x, (300,) * 6, 1, False)
  # BatchNorm before tanh: pre-activations are unit Gaussian, so post std = std(tanh(N(0,1))) = 0.6278.
  tanh_std = np.tanh(np.random.default_rng(0).standard_normal(2_000_000)).std()
  for record in bn["layers"]:
    assert abs(record["pre"]["std"] - 1.0) < 1e-3
    assert abs(record["std"] - tanh_std) < 0.01


def test_gradients_match_numpy_backprop():
  x = jax.random.normal(jax.random.key(0), (30, 8))
  model = models.MLP(hidden=(8, 8, 8), num_classes=0, activation="tanh", initializer="lecun_normal",
                     use_bias=False)
  variables = models.init_variables(model, jax.random.key(1), x)
  grads = stats.gradients(model, variables, x, jax.random.key(2))
  upstream = np.asarray(jax.random.normal(jax.random.key(2), (30, 8)), np.float64)
  kernels = [np.asarray(variables["params"][f"layer{i}"]["linear"]["kernel"], np.float64) for i in range(3)]
  hs, posts = [np.asarray(x, np.float64)], []
  for w in kernels:
    posts.append(np.tanh(hs[-1] @ w))
    hs.append(posts[-1])
  d_post = upstream
  for i in reversed(range(3)):
    np.testing.assert_allclose(grads[i]["grad"], d_post, rtol=1e-4, atol=1e-6)
    d_pre = d_post * (1 - posts[i] ** 2)
    np.testing.assert_allclose(grads[i]["weight_grad"], hs[i].T @ d_pre, rtol=1e-4, atol=1e-5)
    d_post = d_pre @ kernels[i].T


def test_gradients_come_back_in_layer_order_beyond_ten_layers():
  # Sorted keys would put 'layer10' before 'layer2'; in call order the last layer's activation gradient is
  # exactly the upstream gradient.
  x = jax.random.normal(jax.random.key(0), (64, 16))
  model = models.MLP(hidden=(16,) * 12, num_classes=0, activation="tanh", initializer="normal", init_scale=1.0,
                     use_bias=False)
  variables = models.init_variables(model, jax.random.key(1), x)
  grads = stats.gradients(model, variables, x, jax.random.key(2))
  assert [g["name"] for g in grads] == [f"layer{i}" for i in range(12)]
  upstream = jax.random.normal(jax.random.key(2), (64, 16))
  np.testing.assert_allclose(grads[-1]["grad"], upstream)


def test_summarize_and_saturation_against_numpy():
  x = np.random.default_rng(0).standard_normal((100, 7))
  s = stats.summarize(x)
  assert s["mean"] == pytest.approx(x.mean()) and s["std"] == pytest.approx(x.std())
  assert s["p15"] == pytest.approx(np.percentile(x, 15)) and s["p85"] == pytest.approx(np.percentile(x, 85))
  t = np.tanh(3 * x)
  assert stats.saturation(t, "tanh") == pytest.approx(np.mean(np.abs(t) > 0.99))
  assert stats.saturation(np.maximum(x, 0), "relu") == pytest.approx(np.mean(x <= 0))


def test_case_parse_rejects_bad_names():
  assert activation_stats.Case.parse("relu:normal:0.5:before") == activation_stats.Case("relu", "normal", 0.5,
                                                                                        "before")
  with pytest.raises(ValueError, match="valid names"):
    activation_stats.Case.parse("relu:nope")
  with pytest.raises(ValueError, match="neither an init_scale"):
    activation_stats.Case.parse("relu:normal:bogus")


def test_binary_end_to_end(tmp_path):
  cmd = [sys.executable, "-m", "experiments.activation_stats", "--config.model.hidden=(40, 40, 40)",
         "--config.study.input_dim=40", "--config.study.num_inputs=100", f"--workdir={tmp_path}",
         "--config.study.cases=('tanh:normal:0.01', 'relu:he_normal', 'tanh:lsuv')"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert "std of each hidden layer" in out
  results = json.loads((tmp_path / "results.json").read_text())
  assert [c["case"] for c in results["cases"]] == ["tanh normal(0.01)", "relu he_normal", "tanh lsuv"]
  for case in results["cases"]:
    assert len(case["layers"]) == 3
    assert all({"mean", "std", "grad_std", "weight_grad_std"} <= set(layer) for layer in case["layers"])
  # LSUV makes every pre-activation unit-variance on the very batch the binary uses.
  assert all(abs(layer["pre"]["std"] - 1) < 0.01 for layer in results["cases"][2]["layers"])
  for name in ("config.json", "results.csv", "mean_std.png", "histograms_tanh_lsuv.png"):
    assert (tmp_path / name).stat().st_size > 0
  assert json.loads((tmp_path / "config.json").read_text())["binary"] == "activation_stats"
  bad = subprocess.run(cmd[:3] + ["--config.study.compare=False", "--config.model.activation=nope",
                                  f"--workdir={tmp_path / 'bad'}"], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode != 0 and "relu" in bad.stderr and not (tmp_path / "bad").exists()
