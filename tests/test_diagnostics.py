"""Training diagnostics (dlcore.diagnostics): per-layer norms and update/weight ratios against numpy, dead and
saturated units against hand-built layers, the default step untouched, and the trainer's logs and picture."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dlcore import diagnostics, models, optim, state as state_lib, train
from experiments import train_lib
from experiments.configs import schema

BASE_METRICS = {"loss", "penalty", "total_loss", "accuracy", "grad_norm"}


def _mlp_state(activation="relu", lr=0.1, hidden=(16, 8), seed=0, optimizer="sgd"):
  model = models.get("mlp", hidden=hidden, activation=activation, num_classes=3)
  x = jax.random.normal(jax.random.PRNGKey(1), (12, 5))
  y = jnp.arange(12) % 3
  state = state_lib.create(model, optim.optimizer(optimizer, lr), x, seed)
  return model, state, {"image": x, "label": y}


def _relu_mlp_numpy(params, x):
  """The relu MLP's forward pass in float64 numpy: hidden activations and logits."""
  h, hidden = np.asarray(x, np.float64), []
  for name in ("layer0", "layer1"):
    p = params[name]["linear"]
    h = np.maximum(h @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64), 0.0)
    hidden.append(h)
  p = params["classifier"]["linear"]
  return hidden, h @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def test_norms_and_update_ratio_match_numpy_for_sgd():
  """For plain SGD the update is lr * g, so the ratio is lr * ||g_W|| / ||W||; gradients from float64 numpy."""
  model, state, batch = _mlp_state(lr=0.1)
  layer_acts = diagnostics.layer_activations(model, state.variables(), batch["image"])
  assert layer_acts == {"layer0": "relu", "layer1": "relu", "classifier": "identity"}
  step = jax.jit(train.make_train_step(diagnostics=layer_acts))
  new_state, metrics = step(state, batch)

  params = jax.tree.map(np.asarray, state.params)
  hidden, logits = _relu_mlp_numpy(params, batch["image"])
  y = np.asarray(batch["label"])
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  delta = (p - np.eye(3)[y]) / len(y)  # dL/dlogits of the mean cross-entropy
  inputs = [np.asarray(batch["image"], np.float64), *hidden]
  kernel_grads = {}
  for name, a in zip(("classifier", "layer1", "layer0"), reversed(inputs)):
    kernel_grads[name] = a.T @ delta
    if name != "layer0":
      delta = (delta @ np.asarray(params[name]["linear"]["kernel"], np.float64).T) * (a > 0)
  for name, g in kernel_grads.items():
    w = np.asarray(params[name]["linear"]["kernel"], np.float64)
    np.testing.assert_allclose(metrics[f"param_norm/{name}"], np.linalg.norm(w), rtol=1e-5)
    np.testing.assert_allclose(metrics[f"grad_norm/{name}"], np.linalg.norm(g), rtol=1e-4)
    np.testing.assert_allclose(metrics[f"update_ratio/{name}"], 0.1 * np.linalg.norm(g) / np.linalg.norm(w),
                               rtol=1e-4)
    moved = np.asarray(new_state.params[name]["linear"]["kernel"], np.float64) - w
    np.testing.assert_allclose(np.linalg.norm(moved), 0.1 * np.linalg.norm(g), rtol=1e-4)
  for name, h in zip(("layer0", "layer1"), hidden):
    np.testing.assert_allclose(metrics[f"dead/{name}"], np.mean(np.all(h == 0, axis=0)), atol=1e-7)


def test_ratio_is_the_step_taken_including_momentum_and_weight_decay():
  model, state, batch = _mlp_state()
  tx = optim.optimizer("momentum", 0.05, momentum=0.9, weight_decay=0.01)
  state = state_lib.create(model, tx, batch["image"], 0)
  step = jax.jit(train.make_train_step(diagnostics=diagnostics.layer_activations(model, state.variables(),
                                                                                 batch["image"])))
  for _ in range(3):  # momentum makes the step differ from lr * g after the first
    old = state
    state, metrics = step(state, batch)
  for name in ("layer0", "layer1", "classifier"):
    w = np.asarray(old.params[name]["linear"]["kernel"], np.float64)
    moved = np.asarray(state.params[name]["linear"]["kernel"], np.float64) - w
    np.testing.assert_allclose(metrics[f"update_ratio/{name}"], np.linalg.norm(moved) / np.linalg.norm(w),
                               rtol=1e-4)


def test_dead_units_are_the_ones_no_example_activates():
  model, state, batch = _mlp_state(hidden=(10, 6))
  params = jax.tree.map(np.array, state.params)
  x = np.abs(np.asarray(batch["image"]))  # non-negative inputs: a unit with w <= 0 and b < 0 never fires
  params["layer0"]["linear"]["kernel"][:, :4] = -np.abs(params["layer0"]["linear"]["kernel"][:, :4])
  params["layer0"]["linear"]["bias"][:4] = -1.0
  state = state.replace(params=jax.tree.map(jnp.asarray, params))
  batch = {**batch, "image": jnp.asarray(x)}
  layer_acts = diagnostics.layer_activations(model, state.variables(), batch["image"])
  _, metrics = jax.jit(train.make_train_step(diagnostics=layer_acts))(state, batch)
  hidden, _ = _relu_mlp_numpy(params, x)
  expected = np.mean(np.all(hidden[0] == 0, axis=0))
  assert expected >= 0.4  # the four units built dead, plus any the data leaves off
  np.testing.assert_allclose(metrics["dead/layer0"], expected, atol=1e-7)
  assert "saturated/layer0" not in metrics and "dead/classifier" not in metrics


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_saturated_fraction_matches_numpy(activation):
  model, state, batch = _mlp_state(activation=activation, hidden=(20,))
  params = jax.tree.map(np.array, state.params)
  params["layer0"]["linear"]["kernel"] *= 6.0  # push a good part of the units to the flat ends
  state = state.replace(params=jax.tree.map(jnp.asarray, params))
  layer_acts = diagnostics.layer_activations(model, state.variables(), batch["image"])
  assert layer_acts["layer0"] == activation
  _, metrics = jax.jit(train.make_train_step(diagnostics=layer_acts))(state, batch)
  p = params["layer0"]["linear"]
  pre = np.asarray(batch["image"], np.float64) @ p["kernel"] + p["bias"]
  post = np.tanh(pre) if activation == "tanh" else 1 / (1 + np.exp(-pre))
  bounds = (np.abs(post) > 0.99) if activation == "tanh" else ((post < 0.01) | (post > 0.99))
  assert 0.1 < bounds.mean() < 0.95
  np.testing.assert_allclose(metrics["saturated/layer0"], bounds.mean(), atol=1e-6)
  assert not any(k.startswith("dead/") for k in metrics)


def test_resnet_layers_own_their_weights_and_identity_units_get_no_unit_statistic():
  model = models.get("resnet8", num_classes=10)
  x = jnp.ones((2, 8, 8, 3))
  variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.PRNGKey(0))
  acts = diagnostics.layer_activations(model, variables, x)
  assert acts["stage0_block0/conv1"] == "relu" and acts["stage0_block0/conv2"] == "identity"
  assert acts["stage1_block0/shortcut"] == "identity" and acts["stage0_block0"] == "relu"
  forward = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats", "intermediates"])[1])
  params = variables["params"]
  moved = jax.tree.map(lambda p: 1.01 * p, params)
  metrics = jax.jit(lambda *a: diagnostics.step_metrics(*a, acts))(params, params, moved,
                                                                   forward(variables)["intermediates"])
  with_kernels = {k.partition("/")[2] for k in metrics if k.startswith("param_norm/")}
  assert with_kernels == set(acts) - {f"stage{s}_block0" for s in range(3)}  # blocks own no kernel of their own
  dead = {k.partition("/")[2] for k in metrics if k.startswith("dead/")}
  assert dead == {name for name, a in acts.items() if a == "relu"}
  shortcut = np.asarray(params["stage1_block0"]["shortcut"]["linear"]["kernel"])
  np.testing.assert_allclose(metrics["param_norm/stage1_block0/shortcut"], np.linalg.norm(shortcut), rtol=1e-5)
  for name in with_kernels:  # W -> 1.01 W: the ratio is 0.01 whatever the layer
    np.testing.assert_allclose(metrics[f"update_ratio/{name}"], 0.01, rtol=1e-4)


def test_callable_activation_is_named_and_unknown_callable_is_none():
  model = models.get("mlp", hidden=(4,), activation=jax.nn.relu, num_classes=2)
  x = jnp.ones((3, 5))
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  assert diagnostics.layer_activations(model, variables, x)["layer0"] == "relu"
  model = models.get("mlp", hidden=(4,), activation=lambda v: v * 2, num_classes=2)
  assert diagnostics.layer_activations(model, variables, x)["layer0"] is None


def test_default_step_has_no_diagnostics_and_diagnostics_do_not_change_training():
  model, state, batch = _mlp_state(optimizer="momentum")
  plain = jax.jit(train.make_train_step())
  watched = jax.jit(train.make_train_step(diagnostics=diagnostics.layer_activations(model, state.variables(),
                                                                                    batch["image"])))
  a = b = state
  for _ in range(5):
    a, ma = plain(a, batch)
    b, mb = watched(b, batch)
    np.testing.assert_allclose(mb["loss"], ma["loss"], rtol=1e-6)
  assert set(ma) == BASE_METRICS
  assert set(mb) > BASE_METRICS
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), a.params, b.params)


def _run(tmp_path, name, **loop):
  config = schema.train()
  config.data.dataset = "synthetic"
  config.model.hidden = (32,)
  config.schedule.name = "constant"
  config.loop.update(steps=20, log_every=5, batch_size=32, **loop)
  workdir = str(tmp_path / name)
  train_lib.train_and_evaluate(config, workdir, log=lambda m: None)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return workdir, [json.loads(line) for line in f if '"train"' in line]


def test_trainer_logs_diagnostics_at_every_log_step_only_when_asked(tmp_path):
  workdir, records = _run(tmp_path, "on", diagnostics=True)
  assert [r["step"] for r in records] == [5, 10, 15, 20]
  for r in records:
    for key in ("param_norm", "grad_norm", "update_ratio"):
      assert {f"{key}/layer0", f"{key}/classifier"} <= set(r)
    assert 0.0 <= r["dead/layer0"] <= 1.0 and r["update_ratio/layer0"] > 0 and "learning_rate" in r
  assert os.path.getsize(os.path.join(workdir, "diagnostics.png")) > 10_000
  workdir, records = _run(tmp_path, "off")
  assert not any("/" in k for r in records for k in r)
  assert not os.path.exists(os.path.join(workdir, "diagnostics.png"))
