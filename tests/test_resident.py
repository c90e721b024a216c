"""dlcore.data.resident: device-resident data trained K steps per call reaches exactly the host path's state.

The 4-device and 2-process versions of the equivalence run in tests/test_parallel.py.
"""

import functools

import jax
import numpy as np
import pytest

from dlcore import checkpoint, loop, models, optim, parallel, train
from dlcore import state as state_lib
from dlcore.data import pipeline, resident

N, BATCH, STEPS = 150, 10, 37  # 15 steps per epoch: 37 steps cross two epoch boundaries


@functools.cache
def _data():
  rng = np.random.default_rng(0)
  return {"image": rng.random((N, 6, 6, 1), dtype=np.float32), "label": rng.integers(0, 10, N).astype(np.int32)}


@functools.cache
def _setup():
  mesh = parallel.make_mesh(1)
  batches = pipeline.TrainBatches(_data(), BATCH, seed=3)
  model = models.get("mlp", hidden=(16, 8), batchnorm="before", keep_prob=0.8)
  state = state_lib.create(model, optim.optimizer("momentum", 0.1, momentum=0.9), batches.batch_at(0)["image"], 0)
  return mesh, batches, state, parallel.compile_train_step(train.make_train_step(), mesh, state)


def _fit(per_call=None, config=None, **kw):
  """fit() on host batches (per_call None) or on DeviceBatches with `per_call` steps per call."""
  mesh, batches, state, step = _setup()
  source = batches if per_call is None else resident.DeviceBatches(batches, mesh, steps_per_call=per_call)
  logs = []
  config = config or loop.LoopConfig(STEPS, log_every=10, eval_every=0, checkpoint_every=0)
  result = loop.fit(jax.device_put(state, may_alias=False), step, None, source, None, config, log=logs.append,
                    put_batch=lambda b: parallel.shard_batch(b, mesh), **kw)
  return result, ["  ".join(line.split("  ")[:3]) for line in logs if "loss" in line]


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves((state.params, state.batch_stats, state.opt_state, state.step))]


@pytest.fixture(scope="module")
def host_run():
  return _fit(None)


@pytest.mark.parametrize("per_call", [1, 8, 32])
def test_resident_reaches_the_host_paths_state_bit_for_bit(host_run, per_call):
  (ref, ref_logs), (got, logs) = host_run, _fit(per_call)
  for a, b in zip(_leaves(ref.state), _leaves(got.state), strict=True):
    np.testing.assert_array_equal(a, b)
  assert logs == ref_logs and len(logs) == 4  # the same train loss and accuracy at steps 10, 20, 30, 37


def test_calls_end_at_log_eval_checkpoint_and_named_steps(tmp_path):
  seen = []
  config = loop.LoopConfig(STEPS, log_every=10, eval_every=0, checkpoint_every=15)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  _fit(8, config, checkpointer=ckpt, on_step=lambda step, st: seen.append((step, int(st.step))), call_ends=[25])
  ckpt.close()
  assert seen == [(s, s) for s in (8, 10, 15, 20, 25, 30, 37)]


def test_interrupted_resident_run_resumes_to_the_uninterrupted_state(tmp_path, host_run):
  config = loop.LoopConfig(STEPS, log_every=10, eval_every=0, checkpoint_every=15)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  first, _ = _fit(8, config, checkpointer=ckpt, should_stop=lambda: "test")
  assert first.stopped_by == "test" and int(first.state.step) == 8
  ckpt.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  resumed, _ = _fit(8, config, checkpointer=ckpt)
  ckpt.close()
  for a, b in zip(_leaves(host_run[0].state), _leaves(resumed.state), strict=True):
    np.testing.assert_array_equal(a, b)


def test_conv_steps_run_one_per_call_on_cpu_unless_asked_and_match_the_host_path():
  mesh = parallel.make_mesh(1)
  rng = np.random.default_rng(1)
  data = {"image": rng.random((24, 28, 28, 1), dtype=np.float32), "label": rng.integers(0, 10, 24).astype(np.int32)}
  batches = pipeline.TrainBatches(data, 4, seed=0)
  state = state_lib.create(models.get("lenet5"), optim.optimizer("sgd", 0.05), batches.batch_at(0)["image"], 0)
  step = parallel.compile_train_step(train.make_train_step(), mesh, state)
  host = jax.device_put(state, may_alias=False)
  for k in range(3):
    host, _ = step(host, batches.batch_at(k))
  auto = resident.DeviceBatches(batches, mesh)
  got, sums = jax.device_put(state, may_alias=False), None
  auto.compile(step, got)
  assert auto.steps_per_call == 1 and "convolutions" in auto.why
  for k in range(3):
    got, sums = auto.run(step, got, sums, k, 1)
  for a, b in zip(_leaves(host), _leaves(got), strict=True):
    np.testing.assert_array_equal(a, b)
  asked = resident.DeviceBatches(batches, mesh, steps_per_call=2)
  asked.compile(step, state)
  assert asked.steps_per_call == 2 and asked.why == "steps_per_call=2"


def test_indices_follow_the_host_batch_order():
  mesh, batches, _, _ = _setup()
  device_batches = resident.DeviceBatches(batches, mesh, steps_per_call=4)
  idx = device_batches.indices(13, 4)  # steps 13, 14 (epoch 0) and 15, 16 (epoch 1)
  assert idx.shape == (4, BATCH) and idx.dtype == np.int32
  for row, step in zip(idx, range(13, 17)):
    np.testing.assert_array_equal(_data()["image"][row], batches.batch_at(step)["image"])
  assert device_batches.nbytes == sum(v.nbytes for v in _data().values())


def test_bad_arguments_are_named():
  mesh, batches, _, _ = _setup()
  with pytest.raises(ValueError, match="steps_per_call"):
    resident.DeviceBatches(batches, mesh, steps_per_call=0)
  with pytest.raises(TypeError, match="TrainBatches"):
    resident.DeviceBatches(_data(), mesh)
  fits, why = resident.fits_on_device(2 ** 60, mesh)
  assert not fits and "MiB" in why
  assert resident.fits_on_device(1024, mesh)[0]
  assert resident.default_steps_per_call("cpu") == resident.DEFAULT_STEPS_PER_CALL["cpu"]
