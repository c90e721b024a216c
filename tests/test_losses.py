"""Losses, penalties and accuracy against numpy float64 references and the lectures' worked example."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlcore import losses


def _np_log_softmax(s):
  s = np.asarray(s, np.float64)
  shifted = s - s.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _np_hinge(scores, labels, delta=1.0):
  """Weston-Watkins multiclass hinge, one example and one class at a time."""
  scores = np.asarray(scores, np.float64)
  total = 0.0
  for s, y in zip(scores, labels):
    for j in range(len(s)):
      if j != y:
        total += max(0.0, s[j] - s[y] + delta)
  return total / len(scores)


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=3.0, size=(8, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=8)
  return logits, labels


def test_cross_entropy_matches_numpy_log_softmax(batch):
  logits, labels = batch
  expected = -_np_log_softmax(logits)[np.arange(8), labels].mean()
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), expected, rtol=1e-6)


def test_cross_entropy_is_stable_for_huge_logits():
  logits = np.array([[1000., 0., -1000.], [1000., 1000., 0.], [-1000., -1000., -1000.]], np.float32)
  labels = np.array([0, 2, 1])
  # Row by row: lse - s_y = 0, (1000 + log 2) - 0, log 3.
  expected = (0.0 + 1000.0 + np.log(2.0) + np.log(3.0)) / 3
  loss, grad = jax.value_and_grad(losses.cross_entropy)(jnp.asarray(logits), labels)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert np.all(np.isfinite(grad))
  # d loss / d s = (softmax(s) - onehot(y)) / batch.
  softmax = np.exp(_np_log_softmax(logits))
  np.testing.assert_allclose(grad, (softmax - np.eye(3)[labels]) / 3, atol=1e-7)


def test_label_smoothing_matches_smoothed_targets(batch):
  logits, labels = batch
  eps, k = 0.1, logits.shape[-1]
  targets = (1 - eps) * np.eye(k)[labels] + eps / k
  expected = -(targets * _np_log_softmax(logits)).sum(-1).mean()
  np.testing.assert_allclose(losses.cross_entropy(logits, labels, label_smoothing=eps), expected, rtol=1e-6)


def test_label_smoothing_minimum_is_target_entropy():
  # With logits = log t the prediction equals the smoothed target t, and the loss is its entropy H(t) (closed form).
  eps, k, y = 0.2, 4, 1
  on, off = 1 - eps + eps / k, eps / k
  logits = np.log(np.where(np.arange(k) == y, on, off))[None]
  entropy = -on * np.log(on) - (k - 1) * off * np.log(off)
  np.testing.assert_allclose(losses.cross_entropy(logits, np.array([y]), label_smoothing=eps), entropy, rtol=1e-6)


def test_hinge_lecture_example():
  # Columns: cat, car, frog. Rows: the cat, car and frog images with their class scores.
  scores = np.array([[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]], np.float32)
  labels = np.array([0, 1, 2])
  per_image = [float(losses.hinge(scores[i:i + 1], labels[i:i + 1])) for i in range(3)]
  np.testing.assert_allclose(per_image, [2.9, 0.0, 12.9], atol=1e-5)
  mean = float(losses.hinge(scores, labels))
  np.testing.assert_allclose(mean, 15.8 / 3, rtol=1e-6)
  assert round(mean, 2) == 5.27


@pytest.mark.parametrize("delta", [0.0, 1.0, 2.5])
def test_hinge_matches_numpy_loop(batch, delta):
  logits, labels = batch
  np.testing.assert_allclose(losses.hinge(logits, labels, delta=delta), _np_hinge(logits, labels, delta),
                             rtol=1e-6)


def test_mse_against_one_hot_and_real_targets(batch):
  logits, labels = batch
  expected = ((logits.astype(np.float64) - np.eye(5)[labels]) ** 2).mean()
  np.testing.assert_allclose(losses.mse(logits, labels), expected, rtol=1e-6)
  targets = np.random.default_rng(1).normal(size=logits.shape).astype(np.float32)
  np.testing.assert_allclose(losses.mse(logits, targets), ((logits - targets.astype(np.float64)) ** 2).mean(),
                             rtol=1e-6)


def test_registry_and_aliases(batch):
  logits, labels = batch
  assert losses.LOSSES == ("cross_entropy", "hinge", "mse")
  assert losses.get("softmax") is losses.cross_entropy
  assert losses.get("SVM") is losses.hinge
  np.testing.assert_allclose(losses.get("hinge")(logits, labels, delta=2.0), _np_hinge(logits, labels, 2.0),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="unknown loss 'l3'.*cross_entropy, hinge, mse"):
    losses.get("l3")


def test_losses_jit_and_bad_labels_give_nan(batch):
  logits, labels = batch
  for name in losses.LOSSES:
    fn = losses.get(name)
    np.testing.assert_allclose(jax.jit(fn)(logits, labels), fn(logits, labels), rtol=1e-6)
    assert np.isnan(fn(logits[:1], np.array([5])))
    assert np.isnan(fn(logits[:1], np.array([-1])))


def test_accuracy(batch):
  logits, labels = batch
  np.testing.assert_allclose(losses.accuracy(logits, labels), np.mean(logits.argmax(-1) == labels))
  assert float(losses.accuracy(np.eye(3), np.array([0, 1, 0]))) == pytest.approx(2 / 3)


@pytest.mark.parametrize("call, arg", [
    (lambda l, y: losses.cross_entropy(l, y, label_smoothing=1.0), "label_smoothing"),
    (lambda l, y: losses.cross_entropy(l, y, label_smoothing=-0.1), "label_smoothing"),
    (lambda l, y: losses.hinge(l, y, delta=-1.0), "delta"),
    (lambda l, y: losses.cross_entropy(l, np.eye(5)[y]), "labels shape"),
    (lambda l, y: losses.hinge(l, y.astype(np.float32)), "integer"),
])
def test_loss_validation_names_the_argument(batch, call, arg):
  with pytest.raises(ValueError, match=arg):
    call(*batch)


@pytest.fixture
def params():
  """Kernels, biases and BatchNorm scale/bias, as flax names them: only the kernels are weights."""
  rng = np.random.default_rng(2)
  arr = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return {
      "layer0": {"linear": {"kernel": arr(4, 3), "bias": arr(3)},
                 "bn_after": {"bn": {"scale": arr(3), "bias": arr(3)}}},
      "conv": {"linear": {"kernel": arr(3, 3, 3, 2)}, "bn_before": {"bn": {"scale": arr(2), "bias": arr(2)}}},
      "classifier": {"linear": {"kernel": arr(2, 5), "bias": arr(5)}},
  }


def _kernels(params):
  return [np.asarray(params[k]["linear"]["kernel"], np.float64) for k in ("layer0", "conv", "classifier")]


def test_penalties_count_only_kernels(params):
  ks = _kernels(params)
  l1 = sum(np.abs(k).sum() for k in ks)
  l2 = 0.5 * sum((k ** 2).sum() for k in ks)
  strength, ratio = 0.3, 0.25
  assert losses.PENALTIES == ("none", "l1", "l2", "elastic_net")
  np.testing.assert_allclose(losses.penalty("none", params, strength), 0.0)
  np.testing.assert_allclose(losses.penalty("l1", params, strength), strength * l1, rtol=1e-6)
  np.testing.assert_allclose(losses.penalty("l2", params, strength), strength * l2, rtol=1e-6)
  np.testing.assert_allclose(losses.penalty("elastic_net", params, strength, l1_ratio=ratio),
                             strength * (ratio * l1 + (1 - ratio) * l2), rtol=1e-6)
  np.testing.assert_allclose(losses.penalty("elastic_net", params, strength, l1_ratio=1.0), strength * l1, rtol=1e-6)
  np.testing.assert_allclose(losses.penalty("elastic_net", params, strength, l1_ratio=0.0), strength * l2, rtol=1e-6)
  # A whole variables dict: batch_stats never count either.
  batch_stats = {"layer0": {"bn_after": {"bn": {"mean": np.ones(3), "var": np.ones(3)}}}}
  variables = {"params": params, "batch_stats": batch_stats}
  np.testing.assert_allclose(losses.penalty("l2", variables, strength), strength * l2, rtol=1e-6)


def test_l2_gradient_is_strength_times_weights(params):
  strength = 0.3
  grads = jax.grad(lambda p: losses.penalty("l2", p, strength))(params)
  for name in ("layer0", "conv", "classifier"):
    np.testing.assert_allclose(grads[name]["linear"]["kernel"], strength * params[name]["linear"]["kernel"],
                               rtol=1e-6)
  np.testing.assert_array_equal(grads["layer0"]["linear"]["bias"], 0.0)
  np.testing.assert_array_equal(grads["layer0"]["bn_after"]["bn"]["scale"], 0.0)
  np.testing.assert_array_equal(grads["conv"]["bn_before"]["bn"]["bias"], 0.0)


@pytest.mark.parametrize("kwargs, arg", [
    (dict(name="l2", strength=-1.0), "strength"),
    (dict(name="elastic_net", strength=1.0, l1_ratio=1.5), "l1_ratio"),
    (dict(name="elastic_net", strength=1.0, l1_ratio=-0.1), "l1_ratio"),
    (dict(name="l3", strength=1.0), "unknown penalty 'l3'.*elastic_net, l1, l2, none"),
])
def test_penalty_validation_names_the_argument(params, kwargs, arg):
  with pytest.raises(ValueError, match=arg):
    losses.penalty(params=params, **kwargs)
