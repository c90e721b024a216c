"""Every registered model under flax NNX (`nnx.bridge.ToNNX`): init, a train step that equals the linen step on
the same variables, BatchNorm statistics updated in place, and eval at another batch size."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dlcore import models


def _loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@pytest.mark.parametrize("name", models.NAMES)
def test_model_trains_under_nnx_bridge_like_linen(name):
  shape = (6, 28, 28, 1) if name in ("mlp", "lenet5") else (6, 12, 12, 3)
  x = jax.random.normal(jax.random.key(0), shape)
  y = jnp.arange(6) % 10
  options = {} if name.startswith("resnet") else {"batchnorm": "before"}
  linen_model = models.get(name, **options)
  model = nnx.bridge.ToNNX(linen_model, rngs=nnx.Rngs(params=0, dropout=1))
  nnx.bridge.lazy_init(model, x, train=False)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  batch_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  assert jax.tree.structure(params) == jax.tree.structure(linen_model.init(jax.random.key(0), x)["params"])

  # the linen reference: one SGD step from the same variables
  def linen_loss(p):
    logits, updates = linen_model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                        mutable=["batch_stats"])
    return _loss(logits, y), updates["batch_stats"]
  (ref_loss, ref_stats), grads = jax.jit(jax.value_and_grad(linen_loss, has_aux=True))(params)
  ref_params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: _loss(m(x, train=True, mutable=["batch_stats"]), y))(model)
    optimizer.update(model, grads)
    return loss

  np.testing.assert_allclose(train_step(model, optimizer), ref_loss, rtol=1e-5)
  for got, want in ((nnx.to_pure_dict(nnx.state(model, nnx.Param)), ref_params),
                    (nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), ref_stats)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)
  assert jax.tree.leaves(ref_stats), "every model here has BatchNorm statistics to update"

  logits = model(x[:3], train=False)  # another batch size, running statistics
  want = linen_model.apply({"params": ref_params, "batch_stats": ref_stats}, x[:3], train=False)
  # after one step the running statistics are still near their init, so deep nets' eval logits are large
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_dropout_draws_from_the_nnx_dropout_stream():
  model = nnx.bridge.ToNNX(models.get("mlp", hidden=(64,), keep_prob=0.5), rngs=nnx.Rngs(params=0, dropout=1))
  x = jnp.ones((4, 8))
  nnx.bridge.lazy_init(model, x, train=False)
  a, b = model(x, train=True), model(x, train=True)
  assert not np.allclose(a, b)  # a fresh mask per call
  np.testing.assert_array_equal(model(x, train=False), model(x, train=False))
