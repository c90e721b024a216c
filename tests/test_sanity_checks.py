"""cs231n's sanity checks (dlcore.sanity, experiments/sanity_checks.py): every check passes on a correct small MLP,
each fails on the model broken the way it is meant to catch (10x init scale; a penalty that reaches no weight; a
model that ignores its input, or learning rate 0; a layer cut off by stop_gradient), the expected values equal
their closed forms, the kink bound of dlcore.gradcheck is exact, and bad configs are refused naming the key."""

import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dlcore import data, gradcheck, initializers, losses, models, sanity
from experiments import config_lib, sanity_checks
from experiments.configs import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = data.synthetic(train_size=256, test_size=8, validation_size=0)
BATCH = {"image": DATASET.train.images[:128], "label": DATASET.train.labels[:128]}


def _first(n):
  return {k: v[:n] for k, v in BATCH.items()}


PIXELS = int(np.prod(DATASET.image_shape))


def _kernel(fan_in, fan_out, gain=1.0):
  """N(0, gain / fan_in) weights (LeCun normal; gain 2: He normal) drawn in numpy: variables without an init
  program to compile, so the tests stay fast."""
  return np.random.default_rng(fan_in + fan_out).normal(0.0, (gain / fan_in) ** 0.5, (fan_in, fan_out)).astype(
      np.float32)


def _mlp_variables(widths, gain):
  """Variables of models.MLP(hidden=widths[1:-1]) on inputs of widths[0] features, kernels from `_kernel`."""
  names = [f"layer{i}" for i in range(len(widths) - 2)] + ["classifier"]
  return {"params": {name: {"linear": {"kernel": _kernel(a, b, gain), "bias": np.zeros(b, np.float32)}}
                     for name, a, b in zip(names, widths, widths[1:])}, "batch_stats": {}}


MLP = models.MLP(hidden=(32,))  # relu, He normal
MLP_VARIABLES = _mlp_variables((PIXELS, 32, 10), gain=2.0)
TANH_MLP = models.MLP(hidden=(32, 32), activation="tanh", initializer="lecun_normal")
TANH_MLP_VARIABLES = _mlp_variables((PIXELS, 32, 32, 10), gain=1.0)


class TanhMLP(nn.Module):
  """A one-hidden-layer tanh MLP; `detach` cuts the hidden layer's output off from the gradient (stop_gradient)."""
  detach: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = jnp.tanh(nn.Dense(32, name="hidden")(x.reshape((x.shape[0], -1))))
    return nn.Dense(10, name="classifier")(jax.lax.stop_gradient(h) if self.detach else h)

  VARIABLES = {"params": {"hidden": {"kernel": _kernel(PIXELS, 32), "bias": np.zeros(32, np.float32)},
                          "classifier": {"kernel": _kernel(32, 10), "bias": np.zeros(10, np.float32)}}}


class IgnoresInput(nn.Module):
  """Logits that are one learned vector for every example: it can learn the majority class, nothing more."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    return jnp.broadcast_to(self.param("bias", nn.initializers.zeros, (10,)), (x.shape[0], 10))

  VARIABLES = {"params": {"bias": np.zeros(10, np.float32)}}


class NoKernels(nn.Module):
  """A linear classifier whose weight is not named 'kernel', so no penalty reaches it (dlcore.masks)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    return x @ self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 10))

  VARIABLES = {"params": {"w": _kernel(PIXELS, 10)}}


# --- expected values against closed forms --------------------------------------------------------------------


def test_expected_initial_loss_is_the_loss_of_equal_scores():
  for num_classes in (2, 10, 100):
    assert sanity.expected_initial_loss("cross_entropy", num_classes) == math.log(num_classes)
    assert sanity.expected_initial_loss("softmax", num_classes, label_smoothing=0.1) == math.log(num_classes)
    assert sanity.expected_initial_loss("hinge", num_classes, delta=0.5) == (num_classes - 1) * 0.5
    assert sanity.expected_initial_loss("svm", num_classes) == num_classes - 1
  zeros, labels = np.zeros((7, 10), np.float32), np.arange(7)  # dlcore's losses at equal scores agree
  np.testing.assert_allclose(losses.cross_entropy(zeros, labels, label_smoothing=0.1), math.log(10), rtol=1e-6)
  np.testing.assert_allclose(losses.hinge(zeros, labels, delta=0.5), 9 * 0.5, rtol=1e-6)


def test_a_zero_initialised_model_scores_exactly_the_expected_loss():
  zeros = jax.tree.map(np.zeros_like, MLP_VARIABLES)
  for loss, kwargs in (("cross_entropy", {}), ("hinge", {"delta": 2.0})):
    check = sanity.initial_loss(MLP, zeros, BATCH, loss=loss, **kwargs)
    assert check.passed and check.values["logit_std"] == 0.0
    np.testing.assert_allclose(check.values["loss"], check.expected["loss"], rtol=1e-6)
  assert check.expected["loss"] == 18.0 and check.expected["formula"] == "(10 - 1) * 2"


def test_expected_initial_loss_refuses_what_has_no_chance_level():
  with pytest.raises(ValueError, match="loss 'mse' has no chance-level initial value"):
    sanity.expected_initial_loss("mse", 10)
  with pytest.raises(ValueError, match="delta .* must be > 0"):
    sanity.expected_initial_loss("hinge", 10, delta=0.0)
  with pytest.raises(ValueError, match="unknown loss 'l2'"):
    sanity.expected_initial_loss("l2", 10)


# --- 1. initial loss -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model,variables,loss", [
    (MLP, MLP_VARIABLES, "cross_entropy"), (MLP, MLP_VARIABLES, "hinge"),
    (TANH_MLP, TANH_MLP_VARIABLES, "cross_entropy")],
    ids=["relu_he-cross_entropy", "relu_he-hinge", "tanh_lecun-cross_entropy"])
def test_initial_loss_passes_at_he_or_lecun_init_and_fails_at_ten_times_the_scale(model, variables, loss):
  good = sanity.initial_loss(model, variables, BATCH, loss=loss)
  assert good.passed, good.values
  # init_scale is a gain on the scheme's std: init_scale=10 draws the kernels times 10 (biases start at 0).
  key = jax.random.key(3)
  np.testing.assert_allclose(initializers.get(model.initializer, 10.0)(key, (5, 4)),
                             10.0 * initializers.get(model.initializer)(key, (5, 4)), rtol=1e-6)
  bad = sanity.initial_loss(model, jax.tree.map(lambda w: 10.0 * w, variables), BATCH, loss=loss)
  assert not bad.passed and bad.values["ratio_to_expected"] > sanity.INITIAL_LOSS_FACTOR, bad.values
  assert bad.values["logit_std"] > 5 * good.values["logit_std"]


# --- 2. loss against penalty strength ------------------------------------------------------------------------


@pytest.mark.parametrize("penalty", ["l1", "l2"])
def test_initial_total_loss_rises_with_the_penalty_strength(penalty):
  variables = MLP_VARIABLES
  check = sanity.penalty_raises_loss(MLP, variables, BATCH, (1e-3, 1e-2, 1.0), penalty=penalty)
  assert check.passed and check.verdict == "PASS"
  rows = check.values["by_strength"]
  assert [r["strength"] for r in rows] == [0.0, 1e-3, 1e-2, 1.0]
  unit = float(losses.penalty(penalty, variables["params"], 1.0))
  for r in rows:
    np.testing.assert_allclose(r["penalty"], r["strength"] * unit, rtol=1e-6)
    assert r["total_loss"] == r["data_loss"] + r["penalty"]


def test_a_penalty_that_reaches_no_weight_fails():
  check = sanity.penalty_raises_loss(NoKernels(), NoKernels.VARIABLES, BATCH, (0.1, 1.0))
  assert not check.passed and check.verdict == "FAIL"
  assert [r["penalty"] for r in check.values["by_strength"]] == [0.0, 0.0, 0.0]


def test_penalty_check_arguments_are_validated():
  with pytest.raises(ValueError, match="strengths must be positive and increasing"):
    sanity.penalty_raises_loss(MLP, MLP_VARIABLES, BATCH, (1.0, 0.1))
  with pytest.raises(ValueError, match="penalty must be one of 'l1', 'l2', 'elastic_net'; got 'none'"):
    sanity.penalty_raises_loss(MLP, MLP_VARIABLES, BATCH, (1.0,), penalty="none")


# --- 3. overfitting a small subset ---------------------------------------------------------------------------


def test_overfitting_32_examples_reaches_100_percent():
  check = sanity.overfit_subset(MLP, MLP_VARIABLES, _first(32), optax.sgd(0.1, momentum=0.9), steps=300)
  assert check.passed, check.values
  assert check.values["accuracy"] == 1.0 and 0 < check.values["updates"] < 300
  assert check.values["loss_last"] < check.values["loss_first"]


@pytest.mark.parametrize("case", ["ignores_input", "learning_rate_0"])
def test_overfitting_fails_without_a_model_that_can_learn(case):
  model = IgnoresInput() if case == "ignores_input" else MLP
  tx = optax.sgd(0.1, momentum=0.9) if case == "ignores_input" else optax.sgd(0.0)
  variables = IgnoresInput.VARIABLES if case == "ignores_input" else MLP_VARIABLES
  check = sanity.overfit_subset(model, variables, _first(32), tx, steps=50)
  assert not check.passed and check.values["updates"] == 50
  majority = np.bincount(BATCH["label"][:32]).max() / 32
  assert check.values["accuracy"] <= majority if case == "ignores_input" else check.values["accuracy"] < 1.0
  if case == "learning_rate_0":
    assert check.values["loss_last"] == check.values["loss_first"]


# --- 4. gradient check ---------------------------------------------------------------------------------------


def test_a_detached_layer_fails_the_gradient_check_naming_its_arrays():
  check = sanity.gradient_check(TanhMLP(), TanhMLP.VARIABLES, _first(4), num_checks=4)
  assert check.passed and check.values["max_relative_error"] < 1e-6, check.values
  check = sanity.gradient_check(TanhMLP(detach=True), TanhMLP.VARIABLES, _first(4), num_checks=4)
  assert not check.passed and check.verdict == "FAIL"
  assert check.values["arrays_over_tolerance"] == ["hidden/bias", "hidden/kernel"]
  np.testing.assert_allclose(check.values["max_relative_error"], 1.0)  # the gradient there is 0
  assert check.values["errors"]["classifier/kernel"] < 1e-6


def test_kink_bound_is_exact_for_one_kink():
  # f = sum relu(x): at x = 0 jax takes relu'(0) = 0 while the central difference reads 1/2; at x = h/2 the
  # difference reads 3/4 against 1. Both gaps equal the bound |f(x+h) - 2f(x) + f(x-h)| / 2h.
  h = 1e-3
  x = np.array([0.0, 0.5 * h, -0.25 * h, 1.0, -1.0])
  c = gradcheck.compare(lambda v: jnp.sum(jax.nn.relu(v)), x, eps=h)
  np.testing.assert_allclose(c.analytic, [0, 1, 0, 1, 0])
  np.testing.assert_allclose(c.numeric, [0.5, 0.75, 0.375, 1, 0], atol=1e-12)
  np.testing.assert_allclose(c.kink_bound, np.abs(c.analytic - c.numeric), atol=1e-12)


def test_compare_params_indexes_each_array_and_agrees_with_check_params():
  params = {"a": {"kernel": np.linspace(0.5, 1.0, 6).reshape(2, 3)}, "b": {"bias": np.linspace(-1.0, -0.5, 4)}}
  f = lambda p: jnp.sum(p["a"]["kernel"] ** 3) + jnp.sum(jnp.sin(p["b"]["bias"]))
  result = gradcheck.compare_params(f, params, num_checks=3, seed=2)
  assert set(result) == {"a/kernel", "b/bias"}
  for path, leaf, grad in (("a/kernel", params["a"]["kernel"], 3 * params["a"]["kernel"] ** 2),
                           ("b/bias", params["b"]["bias"], np.cos(params["b"]["bias"]))):
    c = result[path]
    assert len(c.index) == 3 and c.index.max() < leaf.size
    np.testing.assert_allclose(c.analytic, grad.ravel()[c.index], rtol=1e-12)
  assert gradcheck.check_params(f, params, num_checks=3, seed=2) == {
      path: float(c.error.max()) for path, c in result.items()}


# --- the binary ------------------------------------------------------------------------------------------------


def _config(**study):
  config = schema.sanity_checks()
  config.data.dataset = "synthetic"
  config.model.hidden = (32,)
  config.study.update(**study)
  return config


def test_schema_defaults_are_the_library_tolerances_and_the_config_file_loads():
  study = schema.sanity_checks().study
  assert study.initial_loss_factor == sanity.INITIAL_LOSS_FACTOR
  assert study.gradcheck_tolerance == sanity.GRADCHECK_TOLERANCE
  path = os.path.join(config_lib.CONFIG_DIR, "sanity_checks.py")
  assert config_lib.flat(config_lib.load(path, "sanity_checks")) == config_lib.flat(schema.sanity_checks())


@pytest.mark.parametrize("group,key,value,match", [
    ("study", "subset_size", 0, "study.subset_size must be > 0"),
    ("study", "penalty_strengths", (0.1, 0.01), r"study.penalty_strengths must be positive and increasing"),
    ("study", "initial_loss_factor", 1.0, r"study.initial_loss_factor must be in \(1.0, inf\)"),
    ("loss", "penalty", "none", "loss.penalty must name the penalty whose strength the check raises"),
    ("loss", "name", "mse", "loss.name='mse' has no chance-level initial loss"),
    ("loss", "hinge_delta", 2.0, "loss.hinge_delta=2.0 has no effect"),
    ("model", "hidden", (0,), r"model.hidden\[0\] must be a positive integer"),
    ("optimizer", "learning_rate", 0.0, "learning_rate must be > 0")])
def test_bad_config_values_name_the_key(group, key, value, match):
  config = _config()
  config[group][key] = value
  with pytest.raises(ValueError, match=match):
    sanity_checks.validate(config)


def test_more_examples_than_the_training_set_names_the_key():
  with pytest.raises(ValueError, match=r"study.loss_examples 1000 is larger than the training set \(256 examples\)"):
    sanity_checks.examples(_config(loss_examples=1000), DATASET)


def test_binary_on_a_small_mlp_passes_three_checks_and_exits_nonzero_on_the_failed_one(tmp_path):
  # A correct MLP on synthetic data, given one update to overfit in: that check fails, the others pass.
  cmd = [sys.executable, "-m", "experiments.sanity_checks", "--config.data.dataset=synthetic",
         "--config.model.hidden=(32,)", "--config.study.overfit_steps=1", "--config.study.loss_examples=64",
         "--config.study.gradcheck_examples=2", "--config.study.gradcheck_coords=3", f"--workdir={tmp_path}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == sanity_checks.EXIT_FAILED, proc.stderr
  results = json.loads((tmp_path / "results.json").read_text())
  checks = results["checks"]
  assert [c["name"] for c in checks] == ["initial loss", "loss rises with l2 strength", "overfit 32 examples",
                                         "gradient check (float64)"]
  assert [c["verdict"] for c in checks] == ["PASS", "PASS", "FAIL", "PASS"] and not results["passed"]
  assert all(set(c) >= {"name", "verdict", "values", "expected"} for c in checks)
  assert checks[0]["expected"]["formula"] == "ln(10)" and checks[2]["values"]["updates"] == 1
  assert "some checks FAIL" in proc.stdout and "overfit 32 examples     FAIL" in proc.stdout
  assert config_lib.flat(config_lib.load(str(tmp_path), "sanity_checks"))["study.overfit_steps"] == 1


def test_binary_reports_a_bad_value_in_one_line_and_writes_nothing(tmp_path):
  cmd = [sys.executable, "-m", "experiments.sanity_checks", "--config.study.gradcheck_examples=0",
         f"--workdir={tmp_path / 'w'}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 1
  assert proc.stderr.strip() == "error: study.gradcheck_examples must be > 0, got 0"
  assert not (tmp_path / "w").exists()
