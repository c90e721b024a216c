"""Subprocess side of tests/test_parallel.py: data-parallel runs on several (forced) CPU devices.

  python tests/parallel_worker.py equivalence OUT   8 devices vs 1 (train, eval, dropout masks), errors
  python tests/parallel_worker.py local_bn OUT      bn_stats='local' vs 'global' vs per-shard steps, 2 devices
  python tests/parallel_worker.py resident OUT      DeviceBatches vs host batches (global and local BN), 4 devices
  python tests/parallel_worker.py population OUT    populations on 4 devices: members over 'pop', and 'pop' x 'data'
  python tests/parallel_worker.py onednn OUT        DLCORE_CPU_CONV=onednn: 'global' on XLA, 'local' oneDNN, 8 devices
  python tests/parallel_worker.py reference OUT     the 8-device single-process run of `multi` -> OUT/reference.npz
  python tests/parallel_worker.py multi OUT PORT NUM_PROCESSES PROCESS_ID
      one of NUM_PROCESSES processes on 127.0.0.1:PORT, each feeding only its slice of every global batch
      -> OUT/multi_PROCESS_ID.npz

Results go to OUT/MODE.json or .npz. The caller sets the device count with
XLA_FLAGS=--xla_force_host_platform_device_count=K.
"""

import functools
import json
import os
import sys

import numpy as np

STEPS = 5
BATCH = 32


def _data(n=64, d=12, classes=5):
  rng = np.random.default_rng(0)
  return {"image": rng.standard_normal((n, d)).astype(np.float32),
          "label": rng.integers(0, classes, n).astype(np.int32)}


def _model(**kw):
  from dlcore import models
  return models.MLP(hidden=(16, 16), num_classes=5, batchnorm="before", keep_prob=0.7, **kw)


@functools.cache
def _initial(opt: str, lr: float):
  from dlcore import optim, state as state_lib
  return state_lib.create(_model(), optim.optimizer(opt, lr), _data()["image"][:BATCH], seed=0)


def _state(opt="adam", lr=1e-2):
  """A fresh copy of one cached initial state (init runs op by op, slow to compile: done once per optimiser)."""
  import jax
  return jax.device_put(_initial(opt, lr), may_alias=False)


def _flat(state) -> dict[str, np.ndarray]:
  from flax import traverse_util
  tree = {"params": state.params, "batch_stats": state.batch_stats}
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _max_diff(a, b) -> float:
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  return max(float(np.max(np.abs(fa[k] - fb[k]))) for k in fa)


def _train(state, step, batches, put=lambda b: b):
  for k in range(STEPS):
    state, metrics = step(state, put(batches.batch_at(k)))
  return state, {k: float(v) for k, v in metrics.items()}


def _evaluate(state, eval_step, put=lambda b: b, **proc):
  from dlcore import loop
  from dlcore.data import pipeline
  return loop.evaluate(state, eval_step, pipeline.EvalBatches(_data(n=40), 16, **proc), put)


def _error(fn) -> str:
  try:
    fn()
  except ValueError as e:
    return str(e)
  return ""


def _write(out: str, name: str, obj) -> None:
  with open(os.path.join(out, name), "w") as f:
    json.dump(obj, f, indent=1)


def equivalence(out: str) -> None:
  import jax
  import jax.numpy as jnp
  from dlcore import parallel, train
  from dlcore.data import pipeline

  assert jax.device_count() == 8, jax.devices()
  batches = pipeline.TrainBatches(_data(), BATCH, seed=3)
  step, eval_step = train.make_train_step(), train.make_eval_step()
  mesh = parallel.make_mesh()
  put = lambda b: parallel.shard_batch(b, mesh)
  res = {}
  ref, ref_metrics = _train(_state(), jax.jit(step, donate_argnums=0), batches)
  st = parallel.replicate(_state(), mesh)
  sharded, metrics = _train(st, parallel.compile_train_step(step, mesh, st), batches, put)
  res["train_diff"] = _max_diff(ref, sharded)
  res["metrics_diff"] = max(abs(ref_metrics[k] - metrics[k]) for k in metrics)
  res["state_sharding"] = sorted({str(x.sharding.spec) for x in jax.tree.leaves(sharded)})
  res["eval_1"] = _evaluate(ref, jax.jit(eval_step))
  res["eval_8"] = _evaluate(sharded, parallel.compile_eval_step(eval_step, mesh), put)

  # Dropout masks drawn under jit for a global array do not depend on its sharding, either threefry setting.
  mask = lambda key, x: jnp.where(jax.random.bernoulli(key, 0.7, x.shape), x, 0.0)
  x = np.ones((BATCH, 16), np.float32)
  for partitionable in (True, False):
    jax.config.update("jax_threefry_partitionable", partitionable)
    one = jax.jit(mask)(jax.random.key(1), x)
    eight = jax.jit(mask, in_shardings=(parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)))(
        jax.random.key(1), put({"x": x})["x"])
    res[f"masks_equal_partitionable_{partitionable}"] = bool(np.array_equal(np.asarray(one), np.asarray(eight)))
  jax.config.update("jax_threefry_partitionable", True)

  res["err_batch"] = _error(lambda: put({"image": np.zeros((30, 12)), "label": np.zeros(30)}))
  res["err_check"] = _error(lambda: parallel.check_batch_size(12, mesh))
  res["err_num_devices"] = _error(lambda: parallel.make_mesh(9))
  res["err_bn_stats"] = _error(lambda: parallel.compile_train_step(step, mesh, bn_stats="sync"))
  bad = _state().replace(apply_fn=_model(bn_axis_name="data").apply)
  res["err_axis_name"] = _error(lambda: parallel.compile_train_step(step, mesh, bad))
  _write(out, "equivalence.json", res)


def local_bn(out: str) -> None:
  """'local' on 2 devices == the mean of single-device SGD steps on each half (each with the state's key folded
  with the device index, as the local step does); layer0's running averages == numpy; 'global' differs."""
  import jax
  from dlcore import parallel, train
  from dlcore.data import pipeline

  assert jax.device_count() == 2, jax.devices()
  batch = pipeline.TrainBatches(_data(), BATCH, seed=3).batch_at(0)
  half = BATCH // 2
  step = train.make_train_step()
  single = jax.jit(step, donate_argnums=0)
  halves, losses = [], []
  for k in range(2):
    s = _state("sgd", 0.1)
    s, metrics = single(s.replace(rng=jax.random.fold_in(s.rng, k)),
                        {key: v[k * half:(k + 1) * half] for key, v in batch.items()})
    halves.append(s)
    losses.append(float(metrics["loss"]))
  res = {"manual_loss": float(np.mean(losses))}
  manual = halves[0].replace(**{f: jax.tree.map(lambda a, b: (a + b) / 2, getattr(halves[0], f),
                                                getattr(halves[1], f)) for f in ("params", "batch_stats")})
  mesh = parallel.make_mesh()
  new = {}
  for mode in ("local", "global"):
    st = parallel.replicate(_state("sgd", 0.1), mesh)
    compiled = parallel.compile_train_step(step, mesh, st, bn_stats=mode)
    new[mode], metrics = compiled(st, parallel.shard_batch(batch, mesh))
    res[f"{mode}_metrics"] = {k: float(v) for k, v in metrics.items()}
  res["local_vs_manual"] = _max_diff(new["local"], manual)
  res["local_vs_global"] = _max_diff(new["local"], new["global"])
  key_data = lambda st: np.asarray(jax.random.key_data(st.rng))
  res["local_rng_kept"] = bool(np.array_equal(key_data(new["local"]), key_data(_state("sgd", 0.1))))
  w = np.asarray(_state("sgd", 0.1).params["layer0"]["linear"]["kernel"], np.float64)
  z = [batch["image"][k * half:(k + 1) * half].astype(np.float64) @ w for k in range(2)]
  expect = {"local": (np.mean([zk.mean(0) for zk in z], 0), np.mean([zk.var(0) for zk in z], 0)),
            "global": (np.concatenate(z).mean(0), np.concatenate(z).var(0))}
  for mode, (mean, var) in expect.items():  # running averages start at 0 / 1, momentum 0.9
    bn = new[mode].batch_stats["layer0"]["bn_before"]["bn"]
    res[f"{mode}_layer0_vs_numpy"] = max(float(np.max(np.abs(np.asarray(bn["mean"]) - 0.1 * mean))),
                                         float(np.max(np.abs(np.asarray(bn["var"]) - (0.9 + 0.1 * var)))))
  _write(out, "local_bn.json", res)


def _resident_train(state, step, batches, mesh, per_call: int):
  """STEPS steps on device-resident data, `per_call` steps per dispatch (then the remainder)."""
  from dlcore.data import resident
  device_batches = resident.DeviceBatches(batches, mesh, steps_per_call=per_call)
  sums, done = None, 0
  while done < STEPS:
    calls = min(per_call, STEPS - done)
    state, sums = device_batches.run(step, state, sums, done, calls)
    done += calls
  return state, {k: float(v) for k, v in sums.items()}


def resident(out: str) -> None:
  """On 4 devices, the resident path (1 and 4 steps per call) reaches the host path's params and batch_stats,
  bit for bit, with global and with local BatchNorm statistics; its metric sums are the host metrics' sums."""
  import jax
  from dlcore import parallel, train
  from dlcore.data import pipeline

  assert jax.device_count() == 4, jax.devices()
  mesh = parallel.make_mesh()
  put = lambda b: parallel.shard_batch(b, mesh)
  res = {}
  for bn_stats in parallel.BN_STATS:
    batches = pipeline.TrainBatches(_data(), BATCH, seed=3)
    st = parallel.replicate(_state(), mesh)
    step = parallel.compile_train_step(train.make_train_step(), mesh, st, bn_stats=bn_stats)
    host, total = st, {}
    for k in range(STEPS):
      host, metrics = step(host, put(batches.batch_at(k)))
      total = {m: total.get(m, 0.0) + np.float32(v) for m, v in metrics.items()}
    for per_call in (1, 4):
      got, sums = _resident_train(parallel.replicate(_state(), mesh), step, batches, mesh, per_call)
      res[f"{bn_stats}_{per_call}_diff"] = _max_diff(host, got)
      res[f"{bn_stats}_{per_call}_sums_diff"] = max(abs(float(total[m]) - sums[m]) for m in total)
      res[f"{bn_stats}_{per_call}_sharding"] = sorted({str(x.sharding.spec) for x in jax.tree.leaves(got)})
  _write(out, "resident.json", res)


def population(out: str) -> None:
  """A population of 4 members trained with the member axis over 4 'pop' devices, and over a 2 x 2 'pop' x 'data'
  mesh, against the same population on one device (and a member against its single run); K=3 on 2 'pop' devices
  is refused."""
  import jax
  from dlcore import optim, population as pop_lib, state as state_lib, train
  from dlcore.data import pipeline

  assert jax.device_count() == 4, jax.devices()
  data = _data()
  batches = pipeline.TrainBatches(data, BATCH, seed=3)
  hparams = dict(learning_rate=[0.05, 0.1, 0.2, 0.02], momentum=[0.9, 0.0, 0.5, 0.9], seed=[0, 1, 2, 3],
                 weight_decay=[0.0, 1e-3, 0.0, 0.0])
  step = pop_lib.make_train_step()
  res = {}

  def train_on(mesh):
    pop = pop_lib.create(_model(), data["image"][:BATCH], **hparams)
    if mesh is None:
      compiled = jax.jit(step)
    else:
      compiled = pop_lib.compile_train_step(step, mesh, pop, batches.batch_at(0))
    for k in range(STEPS):
      pop, metrics = compiled(pop, batches.batch_at(k))
    return pop, metrics

  ref, _ = train_on(None)
  for name, mesh in (("pop4", pop_lib.make_mesh(4)), ("pop2_data2", pop_lib.make_mesh(2, 2))):
    got, metrics = train_on(mesh)
    res[f"{name}_diff"] = max(_max_diff(pop_lib.member(ref, k), pop_lib.member(got, k)) for k in range(4))
    res[f"{name}_sharding"] = str(jax.tree.leaves(got.state.params)[0].sharding.spec)
    res[f"{name}_metrics_shape"] = list(metrics["loss"].shape)
  single = state_lib.create(_model(), optim.optimizer("momentum", 0.2, momentum=0.5), data["image"][:BATCH], 2)
  single_step = jax.jit(train.make_train_step())
  for k in range(STEPS):
    single, _ = single_step(single, batches.batch_at(k))
  res["member2_vs_single"] = _max_diff(pop_lib.member(got, 2), single)
  three = pop_lib.create(_model(), data["image"][:BATCH], seed=[0, 1, 2])
  res["err_divisible"] = _error(lambda: pop_lib.compile_train_step(step, pop_lib.make_mesh(2), three,
                                                                   batches.batch_at(0)))
  _write(out, "population.json", res)


def _multi_run(put, mesh, **proc):
  from dlcore import parallel, train
  from dlcore.data import pipeline
  st = parallel.replicate(_state(), mesh)
  batches = pipeline.TrainBatches(_data(), BATCH, seed=3, **proc)
  step = parallel.compile_train_step(train.make_train_step(), mesh, st)
  resident_state, _ = _resident_train(parallel.replicate(_state(), mesh), step, batches, mesh, 2)
  state, metrics = _train(st, step, batches, put)
  sums = _evaluate(state, parallel.compile_eval_step(train.make_eval_step(), mesh), put, **proc)
  gathered = parallel.to_host(put(pipeline.EvalBatches(_data(n=40), 16, **proc).batch_at(2)))
  return {**_flat(state), **{f"resident/{k}": v for k, v in _flat(resident_state).items()},
          **{f"metric/{k}": v for k, v in metrics.items()}, **{f"eval/{k}": v for k, v in sums.items()},
          **{f"gathered/{k}": v for k, v in gathered.items()}, "local_batch_size": batches.local_batch_size}


def onednn(out: str) -> None:
  """With DLCORE_CPU_CONV=onednn on 8 devices: the 'global' step traces XLA's convolutions (the custom calls have
  no partitioning rule) and equals the single-device step, which runs on oneDNN; the 'local' step convolves
  each shard with oneDNN and equals the 'local' step on XLA."""
  os.environ["DLCORE_CPU_CONV"] = "onednn"
  import jax
  from dlcore import models, optim, parallel, state as state_lib, train
  from dlcore.ops import conv
  assert jax.device_count() == 8, jax.devices()
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((BATCH, 28, 28, 1)).astype(np.float32),
           "label": rng.integers(0, 10, BATCH).astype(np.int32)}
  init = state_lib.create(models.get("lenet5", num_classes=10, batchnorm="before"), optim.optimizer("sgd", 0.1),
                          batch["image"], seed=0)
  step, mesh = train.make_train_step(), parallel.make_mesh()
  uses_onednn = lambda fn, *args: "dlcore_onednn_conv" in fn.lower(*args).as_text()
  single = jax.jit(step)
  res = {"available": conv.onednn_available(), "single_onednn": uses_onednn(single, init, batch)}
  new = {"single": single(init, batch)[0]}
  fresh = lambda: (parallel.replicate(jax.device_put(init, may_alias=False), mesh), parallel.shard_batch(batch, mesh))
  for mode in ("global", "local"):
    compiled = parallel.compile_train_step(step, mesh, bn_stats=mode)
    res[f"{mode}_onednn"] = uses_onednn(compiled, *fresh())
    new[mode] = compiled(*fresh())[0]
  with conv.use_backend("xla"):
    local_xla = parallel.compile_train_step(step, mesh, bn_stats="local")(*fresh())[0]
  res["global_vs_single"] = _max_diff(new["global"], new["single"])
  res["local_vs_local_xla"] = _max_diff(new["local"], local_xla)
  _write(out, "onednn.json", res)


def reference(out: str) -> None:
  import jax
  from dlcore import parallel
  assert jax.device_count() == 8, jax.devices()
  mesh = parallel.make_mesh()
  np.savez(os.path.join(out, "reference.npz"), **_multi_run(lambda b: parallel.shard_batch(b, mesh), mesh))


def multi(out: str, port: str, num_processes: str, process_id: str) -> None:
  from dlcore import parallel
  parallel.initialize_distributed(f"127.0.0.1:{port}", int(num_processes), int(process_id),
                                  initialization_timeout=120)
  import jax
  assert jax.process_count() == int(num_processes) and jax.device_count() == 8, jax.devices()
  mesh = parallel.make_mesh()
  result = _multi_run(lambda b: parallel.shard_batch(b, mesh), mesh, process_index=jax.process_index(),
                      process_count=jax.process_count())
  differs = _state().replace(step=jax.process_index())  # a different state on each process
  result["err_replicate"] = _error(lambda: parallel.replicate(differs, mesh))
  np.savez(os.path.join(out, f"multi_{process_id}.npz"), **result)


if __name__ == "__main__":
  {"equivalence": equivalence, "local_bn": local_bn, "resident": resident, "population": population,
   "onednn": onednn, "reference": reference, "multi": multi}[sys.argv[1]](*sys.argv[2:])
