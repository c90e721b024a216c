"""loop.fit from any source of batches: dlcore's seeded batches, a plain generator, a grain iterator (exact
resume through its saved state), and a source that runs out before num_steps."""

import grain
import jax
import numpy as np
import pytest

from dlcore import checkpoint, data, loop, optim, state as state_lib, train
from experiments import train_lib
from experiments.configs import schema

BATCH = 32


@pytest.fixture(scope="module")
def dataset():
  return data.load("synthetic")


def _state(dataset):
  config = schema.train()
  config.model.hidden = (16,)
  model = train_lib.build_model(config, dataset.num_classes)
  return state_lib.create(model, optim.optimizer("momentum", 0.05), dataset.train.images[:2], 0)


STEP, EVAL = jax.jit(train.make_train_step()), jax.jit(train.make_eval_step())


def _fit(dataset, source, steps, ckpt=None, logs=None):
  return loop.fit(_state(dataset), STEP, EVAL, source, None, loop.LoopConfig(steps, log_every=4, eval_every=0,
                  checkpoint_every=5), checkpointer=ckpt, log=(logs.append if logs is not None else lambda s: None))


def _generator(dataset, seed=0):
  batches = data.TrainBatches(dataset.train, BATCH, seed=seed)
  step = 0
  while True:
    yield batches.batch_at(step)
    step += 1


def _grain_iterator(dataset):
  images, labels = dataset.train.images, dataset.train.labels
  ds = (grain.MapDataset.range(len(labels)).shuffle(seed=3)
        .map(lambda i: {"image": images[i], "label": labels[i]}).batch(BATCH, drop_remainder=True))
  return iter(ds.to_iter_dataset())


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):
    np.testing.assert_array_equal(x, y)


def test_generator_gives_the_same_run_as_seeded_batches(dataset):
  seeded = _fit(dataset, data.TrainBatches(dataset.train, BATCH, seed=0), 12).state
  generated = _fit(dataset, _generator(dataset), 12).state
  assert int(generated.step) == 12
  _assert_same(seeded, generated)


def test_grain_iterator_resumes_exactly_from_its_saved_state(dataset, tmp_path):
  reference = _fit(dataset, _grain_iterator(dataset), 14).state
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  _fit(dataset, _grain_iterator(dataset), 10, ckpt)  # "interrupted" at step 10
  assert ckpt.latest_step() == 10
  logs = []
  resumed = _fit(dataset, _grain_iterator(dataset), 14, ckpt, logs).state  # a fresh iterator, as after a restart
  ckpt.close()
  assert any("resumed from step 10" in line for line in logs)
  assert not any("continues with the batches" in line for line in logs)
  _assert_same(reference, resumed)


def test_plain_generator_resume_says_it_does_not_fast_forward(dataset, tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  _fit(dataset, _generator(dataset), 5, ckpt)
  logs = []
  resumed = _fit(dataset, _generator(dataset), 8, ckpt, logs)
  ckpt.close()
  assert int(resumed.state.step) == 8
  assert any("training continues with the batches it yields next" in line for line in logs)


def test_source_that_runs_out_stops_training_there_with_a_final_checkpoint(dataset, tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  logs = []
  finite = (data.TrainBatches(dataset.train, BATCH).batch_at(k) for k in range(7))
  result = _fit(dataset, finite, 100, ckpt, logs)
  assert int(result.state.step) == 7
  assert ckpt.all_steps() == [5, 7]
  assert any("ran out after step 7" in line for line in logs)
  assert any(line.startswith("step 7/100") for line in logs)  # the final window is logged
  ckpt.close()
  with pytest.raises(ValueError, match="train_batches yielded no batch at step 0"):
    _fit(dataset, iter([]), 3)
