"""Device-resident training data: the training set placed on the device(s) once, batches gathered on device.

`DeviceBatches(batches, mesh, steps_per_call=K)` wraps a `TrainBatches`: its arrays go to every device of `mesh`
once, and `run(train_step, state, sums, step, count)` runs training steps step .. step+count-1 inside one
compiled program (a loop over the steps), each gathering its batch from the resident arrays. The host sends
only the batches' row indices ([count, batch] int32) per call, so per-step host work and dispatch disappear.

The batch order is TrainBatches' own: epoch e's permutation comes from numpy's SeedSequence((seed, e)), drawn on
the host once per epoch, so the resident path trains on exactly the batches of the host path and reaches the
same parameters (tests/test_resident.py). The arrays are replicated, not split over 'data': a random batch draws
rows from the whole set, so a split set would need a cross-device gather every step; each device instead
gathers its own rows of the global batch, which comes out sharded along 'data' with no communication.

`steps_per_call` (K): how many steps one dispatch runs. `default_steps_per_call(platform)` is the measured
choice per backend (benchmarks/README.md), except that a step with convolutions runs one per call on CPU (see
`DeviceBatches.compile`). A call never crosses a step the caller must see: dlcore.loop ends calls at log, eval and
checkpoint steps. One program serves every call length up to K (its trip count is an argument).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from dlcore import checks, parallel
from dlcore.data.pipeline import TrainBatches

__all__ = ["DEFAULT_STEPS_PER_CALL", "DeviceBatches", "default_steps_per_call", "fits_on_device"]

# Steps per dispatch by platform: CPU from benchmarks/results/steps_cpu.md; on GPU and TPU a loop of steps per
# dispatch is the standard way to hide dispatch, not measured here yet (benchmarks/gpu.sh measures K = 1, 8, 32).
DEFAULT_STEPS_PER_CALL = {"cpu": 32, "gpu": 32, "tpu": 32}

# Place the data only when it takes at most this share of the memory the device has free.
_MEMORY_SHARE = 0.5


def default_steps_per_call(platform: str) -> int:
  """The steps per dispatch dlcore uses on `platform` ('cpu', 'gpu', 'tpu'; others: 1)."""
  return DEFAULT_STEPS_PER_CALL.get(platform, 1)


def fits_on_device(nbytes: int, mesh: Mesh) -> tuple[bool, str]:
  """(whether `nbytes` of data may be placed on every device of `mesh`, a one-line reason).

  With several processes every process must call it; the verdict is True only if it holds on all of them.
  """
  free = [parallel.free_bytes(d) for d in mesh.devices.flat if d.process_index == jax.process_index()]
  known = [f for f in free if f is not None]
  if not known:
    verdict, why = True, f"{nbytes / 2**20:.0f} MiB per device (free memory unknown)"
  else:
    verdict = nbytes <= min(known) * _MEMORY_SHARE
    why = (f"{nbytes / 2**20:.0f} MiB per device {'<=' if verdict else '>'} {_MEMORY_SHARE:.0%} of the "
           f"{min(known) / 2**20:.0f} MiB free")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    everywhere = bool(np.all(multihost_utils.process_allgather(np.array([verdict]))))
    if verdict and not everywhere:
      why += "; too little on another process"
    verdict = everywhere
  return verdict, why


class DeviceBatches:
  """A TrainBatches' data on the devices of `mesh`, trained on K steps per dispatch (see the module docstring).

  Resume: like `batch_at`, the batch of step k is a pure function of (seed, k), so a restarted run continues on
  exactly the batches of an uninterrupted one. `batch_at(step)` still gives the host batch (e.g. to create the
  state from). `run` takes the step as `dlcore.parallel.compile_train_step` or `jax.jit` returns it (or plain): a
  jitted step is inlined into the resident program, which is compiled with `parallel.compiler_options(mesh)`.
  """

  def __init__(self, batches: TrainBatches, mesh: Mesh, *, steps_per_call: int | None = None):
    if not isinstance(batches, TrainBatches):
      raise TypeError(f"batches must be a dlcore.data.TrainBatches, got {type(batches).__name__}")
    if batches.batch_size % mesh.size:
      raise ValueError(f"batch_size {batches.batch_size} (global) must be divisible by the number of devices "
                       f"{mesh.size} in the mesh")
    self._platform = mesh.devices.flat[0].platform
    self._requested = None if steps_per_call is None else checks.positive("steps_per_call", steps_per_call)
    self.steps_per_call = self._requested or default_steps_per_call(self._platform)
    self.why = f"steps_per_call={self._requested}" if self._requested else f"the {self._platform} default"
    self.batches, self.mesh = batches, mesh
    self.batch_size, self.steps_per_epoch = batches.batch_size, batches.steps_per_epoch
    self._compiler_options = tuple(sorted((parallel.compiler_options(mesh) or {}).items()))
    replicated = NamedSharding(mesh, P())
    self._index_sharding = NamedSharding(mesh, P(None, mesh.axis_names[0]))
    self.arrays = {key: _put(value, replicated) for key, value in batches.arrays().items()}
    self._executable = None

  @property
  def nbytes(self) -> int:
    """Bytes of the resident arrays on each device."""
    return sum(int(a.nbytes) for a in self.arrays.values())

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This process's host batch of `step` (as TrainBatches.batch_at)."""
    return self.batches.batch_at(step)

  def indices(self, step: int, count: int) -> np.ndarray:
    """[count, batch_size] int32: the rows of global batches step .. step+count-1."""
    rows = []
    for k in range(step, step + count):
      epoch, within = divmod(k, self.steps_per_epoch)
      rows.append(self.batches.permutation(epoch)[within * self.batch_size:(within + 1) * self.batch_size])
    return np.stack(rows).astype(np.int32)

  def run(self, train_step: Callable, state, sums: dict | None, step: int, count: int):
    """Runs steps step .. step+count-1 -> (state, sums + their metrics, added step by step in float32).

    count: 1 .. steps_per_call. sums: the open log window's metric sums (None: a new window).
    """
    program = self.compile(train_step, state)
    if not 1 <= count <= self.steps_per_call:
      raise ValueError(f"count must be in [1, steps_per_call={self.steps_per_call}], got {count}")
    replicated = NamedSharding(self.mesh, P())
    if sums is None:  # zeros shaped like the step's metrics, known since compile (0 + x is exactly x)
      sums = {k: _put(np.zeros(v.shape, v.dtype), replicated) for k, v in self._executable[3].items()}
    sums = {k: v if isinstance(v, jax.Array) else _put(np.asarray(v, np.float32), replicated)
            for k, v in sums.items()}
    return program(state, sums, self.arrays, self.placed_indices(step, count), _put(np.int32(count), replicated))

  def placed_indices(self, step: int, count: int) -> jax.Array:
    """`indices(step, count)` padded to [K, batch_size] and placed on the devices (split along 'data')."""
    indices = np.zeros((self.steps_per_call, self.batch_size), np.int32)  # rows past `count` are not used
    indices[:count] = self.indices(step, count)
    return jax.make_array_from_callback(indices.shape, self._index_sharding, lambda index: indices[index])

  def compile(self, train_step: Callable, state) -> Callable:
    """The compiled program running up to K steps of `train_step` on states shaped like `state`.

    `run` compiles on first use; call this first to keep compile time out of timed work (dlcore.loop.fit does).
    Without an explicit steps_per_call, a step with convolutions on CPU runs one step per call, with no loop:
    XLA:CPU leaves the convolution gradients inside a loop body uncanonicalised, and runs them far slower
    (benchmarks/README.md); oneDNN's convolutions (dlcore.ops.conv) are treated alike, as they have not been
    measured in loops; `steps_per_call` and `why` say what was chosen. The executable is shared by every
    DeviceBatches with the same step, mesh, K and shapes (e.g. the seeds of a study).
    """
    structure = jax.tree.structure(state)  # static fields (apply_fn, tx) included: another one recompiles
    if self._executable is None or self._executable[:2] != (train_step, structure):
      step_fn = getattr(train_step, "__wrapped__", train_step)  # a jitted step is inlined as its function
      batch = {k: jax.ShapeDtypeStruct((self.batch_size, *v.shape[1:]), v.dtype) for k, v in self.arrays.items()}
      metrics = jax.eval_shape(train_step, state, batch)[1]
      sums = {k: _put(np.zeros(v.shape, v.dtype), NamedSharding(self.mesh, P())) for k, v in metrics.items()}
      lowered = self._lower(step_fn, state, sums, 1)
      if (not self._requested and self._platform == "cpu" and self.steps_per_call > 1
          and any(op in lowered.as_text() for op in ("stablehlo.convolution", "dlcore_onednn_conv"))):
        self.steps_per_call, self.why = 1, "a step with convolutions on CPU (XLA:CPU runs them slowly in loops)"
      if self.steps_per_call > 1:
        lowered = self._lower(step_fn, state, sums, self.steps_per_call)
      leaves, treedef = jax.tree.flatten((state, sums, self.arrays))
      key = (step_fn, self.mesh, self._compiler_options, self.steps_per_call, treedef,
             tuple((np.shape(x), str(getattr(x, "dtype", type(x).__name__))) for x in leaves))
      if key not in _EXECUTABLES:
        while len(_EXECUTABLES) >= _MAX_EXECUTABLES:
          _EXECUTABLES.pop(next(iter(_EXECUTABLES)))
        _EXECUTABLES[key] = lowered.compile()
      self._executable = (train_step, structure, _EXECUTABLES[key], metrics)
    return self._executable[2]

  def _lower(self, step_fn: Callable, state, sums: dict, steps: int):
    args = (state, sums, self.arrays,
            jax.ShapeDtypeStruct((steps, self.batch_size), np.int32, sharding=self._index_sharding),
            jax.ShapeDtypeStruct((), np.int32, sharding=NamedSharding(self.mesh, P())))
    return _program(step_fn, self.mesh, self._compiler_options, steps > 1).lower(*args)


_EXECUTABLES: dict[tuple, Callable] = {}  # compiled programs by step, mesh, options and argument shapes
_MAX_EXECUTABLES = 16


def _program(step_fn: Callable, mesh: Mesh, compiler_options: tuple, looped: bool) -> Callable:
  """(state, sums, arrays, indices [K, B], count) -> (state, sums): `count` steps of `step_fn` in one program.

  looped: a loop with a traced trip count, so one program serves every count up to K; otherwise one step on
  indices[0] (K = 1, count 1), with no loop around it.
  """
  replicated = NamedSharding(mesh, P())

  def one(state, sums, arrays, idx):
    state, metrics = step_fn(state, {k: jnp.take(v, idx, axis=0) for k, v in arrays.items()})
    return state, jax.tree.map(jnp.add, sums, metrics)

  def steps(state, sums, arrays, indices, count):
    if not looped:
      return one(state, sums, arrays, indices[0])
    return jax.lax.fori_loop(0, count, lambda i, carry: one(*carry, arrays, indices[i]), (state, sums))

  return jax.jit(steps, in_shardings=(replicated, replicated, replicated,
                                      NamedSharding(mesh, P(None, mesh.axis_names[0])), replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0, 1),
                 compiler_options=dict(compiler_options) or None)


def _put(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """The whole array on every device of the sharding (each process passes its own, identical copy)."""
  value = np.asarray(value)
  if sharding.is_fully_addressable:
    return jax.device_put(value, sharding)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
