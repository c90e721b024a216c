"""Checkpointer: bit-exact round trips, keep-last-k plus best, atomic saves, save cadence, clear errors."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dlcore import models, train
from dlcore import state as state_lib
from dlcore.checkpoint import Checkpointer

SAMPLE = jnp.linspace(-1.0, 1.0, 4 * 5, dtype=jnp.float32).reshape(4, 5)
BATCH = {"image": SAMPLE, "label": jnp.array([0, 1, 2, 1])}
TX = {"adam": optax.adam(1e-2), "momentum": optax.sgd(0.1, momentum=0.9), "sgd": optax.sgd(0.1)}


@functools.cache
def model(batchnorm):
  """One module per config, so states share `apply_fn` (a static pytree field) and the jitted steps."""
  return models.MLP(hidden=(8,), num_classes=3, batchnorm=batchnorm)


def make_state(seed=0, tx="adam", batchnorm="before"):
  return state_lib.create(model(batchnorm), TX[tx], SAMPLE, seed)


_STEP = jax.jit(train.make_train_step("cross_entropy"))


def trained(steps=2):
  """Adam + BatchNorm after a few jitted steps: step, moments, count and batch_stats all moved.

  Committed to the device like a restored state, so the step compiled here also serves the restored one.
  """
  state = jax.device_put(make_state(), jax.devices()[0])
  for _ in range(steps):
    state, _ = _STEP(state, BATCH)
  return state


def perturbed(state, shift=0.5):
  """Every float array moved off its initial value, without compiling a train step for this optimiser."""
  def move(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x + 1
    return x + shift * jnp.cos(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape))

  return state.replace(step=state.step + 5, params=jax.tree.map(move, state.params),
                       batch_stats=jax.tree.map(move, state.batch_stats), opt_state=jax.tree.map(move, state.opt_state),
                       rng=jax.random.fold_in(state.rng, 1))


def leaves(state):
  """Every array of the state, the PRNG key as its key data, with tree paths for messages."""
  tree = {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state,
          "rng": jax.random.key_data(state.rng)}
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def assert_same_state(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert int(a.step) == int(b.step)
  assert jax.random.key_impl(a.rng) == jax.random.key_impl(b.rng)
  for (path, x), (_, y) in zip(leaves(a), leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_round_trip_is_bit_exact_and_resumes_identically(tmp_path):
  state = trained()
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(state, force=True)
    restored, meta = ckpt.restore(make_state(seed=7))
  assert meta == {"step": 2, "metrics": {}}
  assert_same_state(restored, state)
  (next_a, metrics_a), (next_b, metrics_b) = _STEP(state, BATCH), _STEP(restored, BATCH)
  assert_same_state(next_a, next_b)
  for name in metrics_a:
    np.testing.assert_array_equal(metrics_a[name], metrics_b[name], err_msg=name)


@pytest.mark.parametrize("tx,batchnorm", [("momentum", "before"), ("sgd", "none")])
def test_round_trip_of_other_optimiser_states(tmp_path, tx, batchnorm):
  """SGD momentum (a trace namedtuple); plain SGD without BatchNorm (empty opt_state and batch_stats)."""
  state = perturbed(make_state(tx=tx, batchnorm=batchnorm))
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(state, force=True)
    restored, _ = ckpt.restore(make_state(seed=7, tx=tx, batchnorm=batchnorm))
  assert_same_state(restored, state)
  assert isinstance(restored.opt_state[0], type(state.opt_state[0]))  # optax namedtuples, not dicts


@pytest.mark.parametrize("tx,batchnorm", [("adam", "before"), ("sgd", "none")])
def test_restore_variables_needs_no_template(tmp_path, tx, batchnorm):
  """Params and batch_stats of any optimiser's checkpoint, bit for bit; a missing step is named."""
  state = perturbed(make_state(tx=tx, batchnorm=batchnorm))
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(state, force=True)
    got = ckpt.restore_variables()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint 3 in .* \(complete steps: \[5\]\)"):
      ckpt.restore_variables(3)
  want = {"params": state.params, "batch_stats": state.batch_stats}
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("impl", ["rbg", "raw"])
def test_round_trip_of_other_prng_keys(tmp_path, impl):
  """A typed key of another implementation comes back with it; a legacy raw uint32 key stays raw."""
  key = (lambda seed: jax.random.PRNGKey(seed)) if impl == "raw" else (lambda seed: jax.random.key(seed, impl=impl))
  state = make_state().replace(rng=key(3))
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(state, force=True)
    restored, _ = ckpt.restore(make_state().replace(rng=key(0)))
  assert restored.rng.dtype == state.rng.dtype
  unwrap = (lambda k: k) if impl == "raw" else jax.random.key_data
  np.testing.assert_array_equal(unwrap(restored.rng), unwrap(state.rng))


def test_template_of_another_model_is_rejected(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(make_state(), force=True)
    with pytest.raises(ValueError, match=f"checkpoint 0 in {tmp_path} does not fit the template"):
      ckpt.restore(make_state(batchnorm="none"))
    with pytest.raises(ValueError, match=r"params/layer0/linear/kernel: checkpoint \(5, 8\), template \(5, 4\)"):
      template = make_state()
      params = {**template.params, "layer0": {**template.params["layer0"], "linear": {"kernel": jnp.zeros((5, 4))}}}
      ckpt.restore(template.replace(params=params))


def test_keeps_last_k_and_the_best(tmp_path):
  states = {}
  with Checkpointer(tmp_path, keep=2) as ckpt:
    for step, acc in enumerate([0.1, 0.9, 0.3, 0.4, 0.5, 0.6], start=1):
      states[step] = make_state(seed=step).replace(step=step)
      assert ckpt.save(states[step], metrics={"val_accuracy": jnp.float32(acc), "loss": 1.0 / step})
  assert sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit()) == [2, 5, 6]
  with Checkpointer(tmp_path, keep=2) as ckpt:  # the policy also holds for a reopened directory
    assert (ckpt.all_steps(), ckpt.latest_step(), ckpt.best_step()) == ([2, 5, 6], 6, 2)
    best, meta = ckpt.restore(make_state(), "best")
    latest, _ = ckpt.restore(make_state(), "latest")
  assert meta["step"] == 2 and meta["metrics"]["val_accuracy"] == pytest.approx(0.9)
  assert_same_state(best, states[2])
  assert_same_state(latest, states[6])


def test_best_mode_min_ranks_nan_last_and_keep_best_false(tmp_path):
  with Checkpointer(tmp_path / "min", keep=1, best_metric="val_loss", best_mode="min") as ckpt:
    for step, loss in enumerate([0.5, 0.2, float("nan"), 0.9], start=1):
      ckpt.save(make_state().replace(step=step), metrics={"val_loss": loss})
    assert ckpt.all_steps() == [2, 4] and ckpt.best_step() == 2
  with Checkpointer(tmp_path / "max", keep=1, keep_best=False) as ckpt:
    for step, acc in enumerate([0.9, 0.1], start=1):
      ckpt.save(make_state().replace(step=step), metrics={"val_accuracy": acc})
    assert ckpt.all_steps() == [2] and ckpt.best_step() == 2


def test_saves_every_n_steps_and_when_forced(tmp_path):
  with Checkpointer(tmp_path, every=3, keep=10) as ckpt:
    saved = [step for step in range(1, 8) if ckpt.save(make_state().replace(step=step))]
    assert saved == [3, 6]
    assert ckpt.save(make_state().replace(step=7), force=True)
    assert not ckpt.save(make_state().replace(step=7), force=True)  # final save of an already-saved step
    assert ckpt.all_steps() == [3, 6, 7] and ckpt.best_step() is None  # no metrics given


def test_unfinished_save_is_ignored_and_cleaned_up(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    for step in (1, 2):
      ckpt.save(make_state(seed=step).replace(step=step), metrics={"val_accuracy": 0.5})
  # A save killed mid-write leaves orbax's temporary directory (older orbax appends a timestamp).
  partials = [tmp_path / "3.orbax-checkpoint-tmp", tmp_path / "4.orbax-checkpoint-tmp-1712345678"]
  for partial in partials:
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "_METADATA").write_text("{trunc")
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
    restored, meta = ckpt.restore(make_state())
  assert meta["step"] == 2
  assert_same_state(restored, make_state(seed=2).replace(step=2))
  assert not any(partial.exists() for partial in partials)


def test_empty_directory_and_missing_step(tmp_path):
  with Checkpointer(tmp_path / "none") as ckpt:
    assert ckpt.latest_step() is None and ckpt.best_step() is None
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none")):
      ckpt.restore(make_state())
    with pytest.raises(FileNotFoundError, match="best"):
      ckpt.restore(make_state(), "best")
    ckpt.save(make_state().replace(step=1))
    with pytest.raises(FileNotFoundError, match=r"step 5 .*complete steps: \[1\]"):
      ckpt.restore(make_state(), 5)
    with pytest.raises(ValueError, match="'newest'"):
      ckpt.restore(make_state(), "newest")


def test_metadata_is_stored_as_json(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(make_state().replace(step=4), metrics={"acc": np.float32(0.25)},
              metadata={"epoch": 1, "seen": jnp.int32(128)})
    with pytest.raises(ValueError, match="reserved"):
      ckpt.save(make_state().replace(step=5), metadata={"step": 5})
    _, meta = ckpt.restore(make_state())
  assert meta == {"step": 4, "metrics": {"acc": 0.25}, "epoch": 1, "seen": 128}


def test_async_save_survives_donating_the_state(tmp_path):
  state = perturbed(make_state())
  expected = jax.tree.map(np.array, leaves(state))
  overwrite = jax.jit(lambda tree: jax.tree.map(jnp.zeros_like, tree), donate_argnums=0)
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(state, force=True)
    overwrite((state.params, state.batch_stats, state.opt_state))  # donated buffers may be reused at once
    restored, _ = ckpt.restore(make_state())
  for (path, want), (_, got) in zip(expected, leaves(restored), strict=True):
    np.testing.assert_array_equal(want, got, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kwargs,match", [({"every": 0}, "every"), ({"keep": 0}, "keep"),
                                          ({"best_mode": "top"}, "best_mode"), ({"best_metric": ""}, "best_metric")])
def test_rejects_bad_arguments(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    Checkpointer(tmp_path, **kwargs)
