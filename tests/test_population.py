"""dlcore.population: member k of a population equals a single run with member k's hyperparameters and seed.

The contract is checked against independently built single runs (dlcore.state.create + dlcore.optim +
dlcore.train, jitted one member at a time), with BatchNorm and dropout. The 4-device version (members split over
'pop', and a 2 x 2 'pop' x 'data' mesh) runs in tests/parallel_worker.py.
"""

import functools

import jax
import numpy as np
import pytest

from dlcore import models, optim, parallel, population, train
from dlcore import state as state_lib
from dlcore.data import pipeline

N, BATCH, STEPS = 120, 20, 7
MEMBERS = dict(learning_rate=[0.05, 0.2, 0.1], momentum=[0.9, 0.5, 0.0], weight_decay=[0.0, 1e-3, 0.0],
               penalty_strength=[0.0, 0.0, 1e-2], label_smoothing=[0.0, 0.1, 0.0], init_scale=[None, 0.5, 2.0],
               seed=[0, 1, 2])


@functools.cache
def _data():
  rng = np.random.default_rng(0)
  return {"image": rng.random((N, 5, 5, 1), dtype=np.float32), "label": rng.integers(0, 10, N).astype(np.int32)}


def _model():
  return models.get("mlp", hidden=(16, 8), batchnorm="before", keep_prob=0.8, initializer="he_normal")


def _shape():
  return optim.schedule("warmup_cosine", 1.0, steps_per_epoch=6, total_steps=STEPS, warmup_steps=2)


def _single(k: int, batches, scheduled: bool) -> state_lib.TrainState:
  """Member k's hyperparameters as one ordinary run."""
  v = {name: values[k] for name, values in MEMBERS.items()}
  model = _model() if v["init_scale"] is None else _model().clone(init_scale=v["init_scale"])
  lr = (optim.schedule("warmup_cosine", v["learning_rate"], steps_per_epoch=6, total_steps=STEPS, warmup_steps=2)
        if scheduled else v["learning_rate"])
  tx = optim.optimizer("momentum", lr, momentum=v["momentum"], weight_decay=v["weight_decay"])
  state = state_lib.create(model, tx, _data()["image"][:BATCH], v["seed"])
  step = jax.jit(train.make_train_step("cross_entropy", "l2", v["penalty_strength"],
                                       label_smoothing=v["label_smoothing"]))
  for i in range(STEPS):
    state, _ = step(state, batches(k).batch_at(i))
  return state


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves((a.params, a.batch_stats)), jax.tree.leaves((b.params, b.batch_stats)),
                             strict=True))


def _population(per_member: bool, scheduled: bool, vectorize: bool = True, **overrides):
  pop = population.create(_model(), _data()["image"][:BATCH], schedule=_shape() if scheduled else None,
                          **{**MEMBERS, **overrides})
  step = jax.jit(population.make_train_step(penalty="l2", per_member_batches=per_member, vectorize=vectorize))
  return pop, step


@pytest.mark.parametrize("per_member, scheduled, vectorize", [(False, False, True), (True, True, True),
                                                              (True, False, False)])
def test_member_k_equals_a_single_run_with_its_hyperparameters(per_member, scheduled, vectorize):
  shared = pipeline.TrainBatches(_data(), BATCH, seed=5)
  own = [pipeline.TrainBatches(_data(), BATCH, seed=10 + k) for k in range(3)]
  batches = (lambda k: own[k]) if per_member else (lambda k: shared)
  pop, step = _population(per_member, scheduled, vectorize)
  for i in range(STEPS):
    batch = (jax.tree.map(lambda *xs: np.stack(xs), *[b.batch_at(i) for b in own]) if per_member
             else shared.batch_at(i))
    pop, metrics = step(pop, batch)
  assert metrics["loss"].shape == (3,)
  for k in range(3):
    assert _max_diff(population.member(pop, k), _single(k, batches, scheduled)) < 1e-5, k
    assert int(population.member(pop, k).step) == STEPS
  assert bool(np.all(pop.active)) and list(np.asarray(pop.diverged_at)) == [-1, -1, -1]


@pytest.mark.parametrize("vectorize", [True, False])
def test_the_eval_step_gives_each_member_its_single_runs_sums(vectorize):
  batches = pipeline.TrainBatches(_data(), BATCH, seed=5)
  pop, step = _population(False, False)
  for i in range(2):
    pop, _ = step(pop, batches.batch_at(i))
  batch = {**batches.batch_at(3), "mask": np.r_[np.ones(BATCH - 3), np.zeros(3)].astype(np.float32)}
  sums = jax.jit(population.make_eval_step(vectorize=vectorize))(pop, batch)
  for k in range(3):
    single = train.make_eval_step(label_smoothing=MEMBERS["label_smoothing"][k])(population.member(pop, k), batch)
    for name in ("loss_sum", "correct", "count"):
      np.testing.assert_allclose(sums[name][k], single[name], rtol=1e-5)


def test_a_diverging_member_is_frozen_and_reported_without_touching_the_others():
  batches = pipeline.TrainBatches(_data(), BATCH, seed=5)
  pop, step = _population(False, False, learning_rate=[0.05, 1e9, 0.1])
  for i in range(STEPS):
    before = population.member(pop, 1)
    pop, _ = step(pop, batches.batch_at(i))
    if not bool(pop.active[1]):
      break
  frozen_at = int(np.asarray(pop.diverged_at)[1])
  assert not bool(pop.active[1]) and frozen_at == i  # the update of step i went non-finite
  frozen = population.member(pop, 1)
  for a, b in zip(jax.tree.leaves((frozen.params, frozen.batch_stats)), jax.tree.leaves((before.params,
                                                                                        before.batch_stats))):
    np.testing.assert_array_equal(a, b)  # kept its last finite state
    assert np.all(np.isfinite(a))
  for _ in range(i + 1, STEPS):
    pop, _ = step(pop, batches.batch_at(_))
  assert int(population.member(pop, 1).step) == frozen_at and int(np.asarray(pop.diverged_at)[1]) == frozen_at
  for k in (0, 2):
    assert _max_diff(population.member(pop, k), _single(k, lambda _: batches, False)) < 1e-5


def test_freeze_stops_a_member_without_recompiling():
  batches = pipeline.TrainBatches(_data(), BATCH, seed=5)
  pop, step = _population(False, False)
  pop, _ = step(pop, batches.batch_at(0))
  pop = population.freeze(pop, [2])
  kept = population.member(pop, 2)
  pop, _ = step(pop, batches.batch_at(1))
  assert _max_diff(population.member(pop, 2), kept) == 0.0 and int(population.member(pop, 0).step) == 2
  assert step._cache_size() == 1  # pylint: disable=protected-access
  assert list(np.asarray(pop.diverged_at)) == [-1, -1, -1]  # frozen by hand, not diverged


def test_bad_populations_are_refused_naming_the_problem(monkeypatch):
  sample = _data()["image"][:BATCH]
  with pytest.raises(ValueError, match="unknown hyperparameter.*dropout.*learning_rate"):
    population.create(_model(), sample, dropout=[0.5])
  with pytest.raises(ValueError, match="one value per member"):
    population.create(_model(), sample, learning_rate=[0.1, 0.2], seed=[0, 1, 2])
  with pytest.raises(ValueError, match="member 1: learning_rate must be > 0"):
    population.create(_model(), sample, learning_rate=[0.1, -1.0])
  with pytest.raises(ValueError, match="member 0: label_smoothing must be in"):
    population.create(_model(), sample, label_smoothing=[1.5])
  with pytest.raises(ValueError, match="member must be in"):
    population.member(population.create(_model(), sample, seed=[0, 1]), 2)
  pop = population.create(_model(), sample, seed=[0, 1])
  step = population.make_train_step()
  mesh = population.make_mesh(1)
  monkeypatch.setattr(parallel, "free_bytes", lambda device: 1024)
  with pytest.raises(ValueError, match="needs about .* MiB per device, more than the 0 MiB free"):
    population.compile_train_step(step, mesh, pop, {"image": sample, "label": _data()["label"][:BATCH]})
  too_many = jax.device_count() + 1
  with pytest.raises(ValueError, match=f"pop x data = {too_many} x 1 needs {too_many} devices"):
    population.make_mesh(too_many)
