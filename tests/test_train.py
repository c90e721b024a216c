"""TrainState and the pure train/eval steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlcore import models, optim, state as state_lib, train


def _data(n=64, d=20, classes=10, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.standard_normal((n, d)).astype(np.float32),
          "label": rng.integers(0, classes, n).astype(np.int32)}


def _state(model, batch, lr=1e-2, name="adam", seed=0):
  return state_lib.create(model, optim.optimizer(name, lr), batch["image"], seed)


def _run(state, batch, steps, step_fn):
  step = jax.jit(step_fn, donate_argnums=0)
  for _ in range(steps):
    state, metrics = step(state, batch)
  return state, metrics


def test_one_sgd_step_equals_numpy_softmax_regression_gradient_with_l2():
  batch = _data(n=32, d=6, classes=4)
  model = models.MLP(hidden=(), num_classes=4, initializer="normal", init_scale=0.3)
  st = _state(model, batch, lr=0.5, name="sgd")
  w = np.asarray(st.params["classifier"]["linear"]["kernel"], np.float64)
  b = np.asarray(st.params["classifier"]["linear"]["bias"], np.float64)
  new, metrics = _run(st, batch, 1, train.make_train_step("cross_entropy", penalty="l2", penalty_strength=0.1))
  x, y = batch["image"].astype(np.float64), batch["label"]
  logits = x @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  onehot = np.eye(4)[y]
  grad_w = x.T @ (p - onehot) / 32 + 0.1 * w  # L2 is 0.5 * strength * ||w||^2; the bias is not penalised
  grad_b = (p - onehot).mean(0)
  np.testing.assert_allclose(new.params["classifier"]["linear"]["kernel"], w - 0.5 * grad_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.params["classifier"]["linear"]["bias"], b - 0.5 * grad_b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], -np.log(p[np.arange(32), y]).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["penalty"], 0.05 * np.sum(w ** 2), rtol=1e-5)
  assert int(new.step) == 1


def test_same_seed_is_bit_identical_and_seed_matters():
  batch = _data()
  model = models.MLP(hidden=(32, 32), num_classes=10, batchnorm="before", keep_prob=0.7)
  step = train.make_train_step()
  a, ma = _run(_state(model, batch, seed=1), batch, 5, step)
  b, mb = _run(_state(model, batch, seed=1), batch, 5, step)
  c, _ = _run(_state(model, batch, seed=2), batch, 5, step)
  for x, y in zip(jax.tree.leaves((a.params, a.batch_stats)), jax.tree.leaves((b.params, b.batch_stats))):
    np.testing.assert_array_equal(x, y)
  assert float(ma["loss"]) == float(mb["loss"])
  assert not np.array_equal(a.params["layer0"]["linear"]["kernel"], c.params["layer0"]["linear"]["kernel"])


def test_dropout_mask_changes_from_step_to_step():
  batch = _data()
  model = models.MLP(hidden=(64,), num_classes=10, keep_prob=0.5)
  st = _state(model, batch)
  f = lambda s: s.apply_fn(s.variables(), batch["image"], train=True,
                           rngs={"dropout": jax.random.fold_in(s.rng, s.step)})
  assert not np.allclose(f(st), f(st.replace(step=st.step + 1)))


def test_small_mlp_overfits_64_examples():
  # The lectures' sanity check: with no regularisation a small net drives training accuracy to 100%.
  batch = _data(n=64, d=20)
  model = models.MLP(hidden=(100,), num_classes=10)
  st, metrics = _run(_state(model, batch, lr=1e-2), batch, 150, train.make_train_step())
  assert float(metrics["accuracy"]) == 1.0
  assert float(metrics["loss"]) < 0.05


def test_batch_stats_change_in_train_mode_only():
  batch = _data()
  model = models.MLP(hidden=(16,), num_classes=10, batchnorm="before")
  st = _state(model, batch)
  before = jax.tree.map(np.asarray, st.batch_stats)
  eval_step = jax.jit(train.make_eval_step())
  eval_step(st, batch)
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(st.batch_stats)):
    np.testing.assert_array_equal(x, y)
  new, _ = _run(st, batch, 1, train.make_train_step())
  mean = new.batch_stats["layer0"]["bn_before"]["bn"]["mean"]
  assert not np.allclose(mean, 0.0)


def test_running_mean_after_one_step_is_momentum_average_of_batch_mean():
  batch = _data()
  model = models.MLP(hidden=(16,), num_classes=10, batchnorm="before")
  st = _state(model, batch, name="sgd")
  kernel = np.asarray(st.params["layer0"]["linear"]["kernel"], np.float64)
  new, _ = _run(st, batch, 1, train.make_train_step())
  batch_mean = (batch["image"].astype(np.float64) @ kernel).mean(0)
  np.testing.assert_allclose(new.batch_stats["layer0"]["bn_before"]["bn"]["mean"], 0.1 * batch_mean, rtol=1e-4,
                             atol=1e-6)


def test_stronger_regularisation_gives_higher_data_loss():
  batch = _data()
  model = models.MLP(hidden=(64,), num_classes=10)
  final = []
  for strength in (0.0, 1e-2, 1e-1):
    _, metrics = _run(_state(model, batch), batch, 60, train.make_train_step(penalty="l2",
                                                                            penalty_strength=strength))
    final.append(float(metrics["loss"]))
  assert final[0] < final[1] < final[2]


def test_eval_step_sums_honour_the_padding_mask():
  batch = _data(n=10)
  model = models.MLP(hidden=(8,), num_classes=10)
  st = _state(model, batch)
  eval_step = jax.jit(train.make_eval_step())
  full = train.summarize(eval_step(st, batch))
  padded = {"image": np.concatenate([batch["image"], np.zeros((6, 20), np.float32)]),
            "label": np.concatenate([batch["label"], np.zeros(6, np.int32)]),
            "mask": np.concatenate([np.ones(10), np.zeros(6)]).astype(np.float32)}
  padded_summary = train.summarize(eval_step(st, padded))
  assert padded_summary == pytest.approx(full, rel=1e-6)
  logits = st.apply_fn(st.variables(), batch["image"], train=False)
  assert full["accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == batch["label"])))


def test_bad_step_arguments_name_the_argument():
  with pytest.raises(ValueError, match="valid names"):
    train.make_train_step("nope")
  with pytest.raises(ValueError, match="penalty"):
    train.make_train_step(penalty="l3")
  with pytest.raises(ValueError, match="penalty_strength"):
    train.make_train_step(penalty="l2", penalty_strength=-1.0)


def test_bfloat16_compute_trains_like_float32_with_float32_state():
  batch = _data(n=64, d=20)
  step = train.make_train_step("cross_entropy")
  losses, states = {}, {}
  for name in ("float32", "bfloat16"):
    st = _state(models.MLP(hidden=(32,), dtype=models.compute_dtype(name)), batch, lr=1e-2)
    st, first = _run(st, batch, 1, step)
    states[name], last = _run(st, batch, 40, step)
    losses[name] = float(first["loss"]), float(last["loss"])
  floats = [a for a in jax.tree.leaves((states["bfloat16"].params, states["bfloat16"].opt_state))
            if jnp.issubdtype(a.dtype, jnp.floating)]
  assert floats and all(a.dtype == jnp.float32 for a in floats)  # master weights and Adam moments stay float32
  (f_first, f_last), (b_first, b_last) = losses["float32"], losses["bfloat16"]
  assert b_first == pytest.approx(f_first, rel=0.02)
  assert b_last < 0.5 * b_first and b_last == pytest.approx(f_last, rel=0.1)
