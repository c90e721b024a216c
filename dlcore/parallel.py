"""Data parallelism: a 1-D device mesh over axis 'data', sharded batches, replicated state, multi-host start-up.

One global batch is split along its first axis over the mesh; params, batch_stats and optimiser state are
replicated. `compile_train_step` jits the SAME pure `train_step` of dlcore.train with these shardings and the state
donated:

  bn_stats='global' (default): plain `jax.jit` over the global array. Every mean in the step (the loss, hence the
    gradient, and BatchNorm's batch statistics) is a mean over the global batch, so the compiled step equals the
    single-device step on the same global batch up to float rounding; XLA inserts the all-reduces.
  bn_stats='local': the step runs per device under `jax.shard_map`. BatchNorm normalises each device's shard
    with that shard's statistics (as in Goyal et al. 2017); gradients, metrics and the running averages in
    batch_stats are then averaged over 'data' with `lax.pmean`, and each device draws its own dropout mask (the
    state's key folded with the device index). The 'grad_norm' metric is then the mean of per-device norms.

Dropout masks: inside the global step the mask is drawn for the global activation array, and `jit` output does
not depend on how its inputs are sharded, so sharded and single-device masks are identical with either value of
`jax_threefry_partitionable` (tests/test_parallel.py checks both); True, the default in current JAX, also generates
each device's part of the mask locally, without communication. (Under shard_map, as in bn_stats='local', the
key is used per shard instead, so masks differ from the single-device ones.)

Multi-host: call `initialize_distributed` first (before any other JAX call); every process then builds the same
mesh, the same state (same seed) and feeds its own slice of each global batch (`TrainBatches(...,
process_index=jax.process_index(), process_count=jax.process_count())`); `shard_batch` assembles the global array.
"""

from collections.abc import Callable, Mapping
import dataclasses
import functools
import hashlib
import os
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax

from dlcore import checks
from dlcore.ops import conv as conv_ops

__all__ = ["AXIS", "BN_STATS", "CPU_COMPILER_OPTIONS", "batch_sharding", "check_batch_size", "compile_eval_step",
           "compile_train_step", "compiler_options", "free_bytes", "initialize_distributed", "make_mesh", "replicate",
           "replicated_sharding", "shard_batch", "to_host", "unpartitioned_convolutions"]

AXIS = "data"
BN_STATS = ("global", "local")


# --------------------------------------------------------------------------- multi-host start-up


def _cluster_env() -> str | None:
  """The multi-process cluster this process was launched in ('slurm', 'ompi', 'tpu'), or None."""
  env = os.environ
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(k in env for k in slurm) and int(env["SLURM_NTASKS"]) > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env:
    return "ompi"
  try:  # set when `import jax` found TPU chips and libtpu
    from jax._src import cloud_tpu_init
    if cloud_tpu_init.running_in_cloud_tpu_vm:
      return "tpu"
  except ImportError:
    pass
  return None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, **kwargs) -> None:
  """`jax.distributed.initialize`, called before any other JAX computation, for multi-process runs.

  With no arguments: auto-detects SLURM (srun with more than one task), Open MPI and Cloud TPU VMs, and does
  nothing in a plain single process. With arguments, all three are usually needed (e.g. '10.0.0.1:1234', 2, 0).
  Extra keyword arguments (local_device_ids, initialization_timeout, ...) go to jax.distributed.initialize.
  CPU processes exchange collectives over gloo. Calling it again once initialised is a no-op.
  """
  if jax.distributed.is_initialized():
    return
  explicit = (coordinator_address, num_processes, process_id)
  if all(a is None for a in explicit) and not kwargs and _cluster_env() is None:
    return
  if num_processes is not None:
    checks.positive("num_processes", num_processes)
    if process_id is not None and not 0 <= process_id < num_processes:
      raise ValueError(f"process_id must be in [0, {num_processes}) for num_processes={num_processes}, "
                       f"got {process_id}")
  if num_processes == 1 and coordinator_address is None:
    return
  if jax.config.jax_cpu_collectives_implementation is None:  # cross-process CPU collectives need a transport
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


# --------------------------------------------------------------------------- mesh and shardings


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh with axis 'data' over every device of every process, each process's devices contiguous.

  num_devices limits it to the first `num_devices` devices (single-process runs only).
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f"num_devices must be in [1, {len(devices)}] (the devices available), got {num_devices}")
    if jax.process_count() > 1 and num_devices != len(devices):
      raise ValueError(f"num_devices={num_devices} is only allowed in a single process; this run has "
                       f"{jax.process_count()} processes and must use all {len(devices)} devices")
    devices = devices[:num_devices]
  return Mesh(np.array(devices), (AXIS,))


def free_bytes(device) -> int | None:
  """Memory free on `device`: the allocator's limit minus its use on accelerators, the kernel's MemAvailable on
  CPU (host RAM); None when unknown."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  if device.platform == "cpu":
    try:
      with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
      return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
      return None
  return None


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (params, batch_stats, optimiser state, metrics)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis is split over 'data'."""
  return NamedSharding(mesh, P(AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Requires the global batch size to divide evenly over the devices of `mesh` (ValueError otherwise)."""
  checks.positive("batch_size", batch_size)
  if batch_size % mesh.size:
    raise ValueError(f"batch_size {batch_size} (global) must be divisible by the number of devices "
                     f"{mesh.size} in the '{AXIS}' mesh")


def _num_processes(mesh: Mesh) -> int:
  return len({d.process_index for d in mesh.devices.flat})


def _host_copy(x, sharding: NamedSharding):
  """A leaf on the host (numpy), or a global array already spanning other processes (put as is)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x if x.sharding == sharding else jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return _Key(np.asarray(jax.random.key_data(x)), jax.random.key_impl(x))
  return np.asarray(x)


@dataclasses.dataclass
class _Key:
  """Host copy of a typed PRNG key array: its raw data and implementation."""
  data: np.ndarray
  impl: Any


def replicate(state, mesh: Mesh):
  """The pytree `state` placed whole on every device of `mesh`.

  Multi-process: every process must pass the same values (e.g. the state created from the same seed); a
  checksum of the host copies is compared across processes and a mismatch raises ValueError.
  """
  sharding = replicated_sharding(mesh)
  if sharding.is_fully_addressable:
    return jax.device_put(state, sharding)
  leaves, treedef = jax.tree.flatten(state)
  host = [_host_copy(x, sharding) for x in leaves]
  digest = hashlib.sha256()
  for h in host:
    if not isinstance(h, jax.Array):
      digest.update(np.ascontiguousarray(h.data if isinstance(h, _Key) else h).tobytes())
  try:
    multihost_utils.assert_equal(np.frombuffer(digest.digest(), np.uint8))
  except AssertionError as e:
    raise ValueError("replicate: the processes passed different states; create the state identically (same "
                     "seed and data) on every process") from e

  def put(h):
    if isinstance(h, jax.Array):
      return h
    data = h.data if isinstance(h, _Key) else h
    out = jax.make_array_from_callback(data.shape, sharding, lambda index: data[index])
    return jax.random.wrap_key_data(out, impl=h.impl) if isinstance(h, _Key) else out

  return jax.tree.unflatten(treedef, [put(h) for h in host])


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of a global batch -> global arrays sharded along 'data' (usable as `put_batch`).

  In a single process the slice is the whole batch; with P processes each passes its B/P rows (in process
  order, as TrainBatches/EvalBatches cut them) and the global batch has B rows.
  """
  lengths = {key: np.shape(value)[0] if np.ndim(value) else None for key, value in batch.items()}
  if not lengths or None in lengths.values() or len(set(lengths.values())) != 1:
    raise ValueError(f"batch arrays must share a leading (batch) axis; got lengths {lengths}")
  local = next(iter(lengths.values()))
  check_batch_size(local * _num_processes(mesh), mesh)
  sharding = batch_sharding(mesh)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    out[key] = jax.make_array_from_process_local_data(sharding, value,
                                                      (local * _num_processes(mesh),) + value.shape[1:])
  return out


def to_host(tree):
  """numpy copies of the arrays in `tree`, whole: a batch-sharded array spread over several processes is
  all-gathered (every process must call this), so e.g. predictions come back in global batch order."""

  def get(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(get, tree)


# --------------------------------------------------------------------------- compiled steps


def _check_model(state, bn_stats: str) -> None:
  module = getattr(getattr(state, "apply_fn", None), "__self__", None)
  axis = getattr(module, "bn_axis_name", None)
  if axis is not None:
    raise ValueError(f"the model's bn_axis_name must be None with dlcore.parallel (bn_stats={bn_stats!r} decides "
                     f"where BatchNorm statistics are computed), got {axis!r}")


def _pmean_grads(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` applied to gradients averaged over 'data' (same optimiser state structure as `tx`)."""

  def update(grads, opt_state, params=None):
    return tx.update(jax.lax.pmean(grads, AXIS), opt_state, params)

  return optax.GradientTransformation(tx.init, update)


def _local_bn_step(train_step: Callable, mesh: Mesh) -> Callable:
  """`train_step` run per shard: per-shard BatchNorm, pmean'd gradients, batch_stats and metrics."""

  def per_shard(state, batch):
    shard_rng = jax.random.fold_in(state.rng, jax.lax.axis_index(AXIS))
    new_state, metrics = train_step(state.replace(rng=shard_rng, tx=_pmean_grads(state.tx)), batch)
    new_state = new_state.replace(rng=state.rng, tx=state.tx,
                                  batch_stats=jax.lax.pmean(new_state.batch_stats, AXIS))
    return new_state, jax.lax.pmean(metrics, AXIS)

  # check_vma=False: values are per-device as in pmap, so grads of the replicated params are per-shard grads.
  return jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False)


# XLA:CPU (jaxlib 0.10) hands convolutions to YNNPACK, whose convolution gradients are slower than XLA's own;
# keeping YNNPACK for dots and reductions only speeds up the conv nets and leaves the MLP unchanged (measured in
# benchmarks/results/cpu_tuning.md). Results stay deterministic but differ in rounding.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options(mesh: Mesh) -> dict | None:
  """Per-executable XLA options for steps compiled on `mesh`'s platform (CPU_COMPILER_OPTIONS on CPU)."""
  return dict(CPU_COMPILER_OPTIONS) if mesh.devices.flat[0].platform == "cpu" else None


def unpartitioned_convolutions(fn: Callable, mesh: Mesh) -> Callable:
  """`fn`, traced with XLA's convolutions when `mesh` has more than one device: the oneDNN custom calls of
  `dlcore.ops.conv` have no partitioning rule, so under a sharded `jit` every device would convolve the whole
  batch. `fn` itself on a one-device mesh."""
  if mesh.size == 1:
    return fn

  @functools.wraps(fn)
  def traced_with_xla_convolutions(*args):
    with conv_ops.use_backend("xla"):
      return fn(*args)

  return traced_with_xla_convolutions


def compile_train_step(train_step: Callable, mesh: Mesh, state=None, *, bn_stats: str = "global") -> Callable:
  """`jax.jit` of `train_step(state, batch) -> (state, metrics)`: state replicated and donated, batch sharded.

  bn_stats: 'global' (BatchNorm statistics over the global batch; equals the single-device step) or 'local'
  (per-device statistics; see the module docstring). `state`, when given, is checked: its model must leave
  `bn_axis_name` unset.
  """
  checks.one_of("bn_stats", bn_stats, BN_STATS)
  if state is not None:
    _check_model(state, bn_stats)
  step = unpartitioned_convolutions(train_step, mesh) if bn_stats == "global" else _local_bn_step(train_step, mesh)
  rep = replicated_sharding(mesh)
  return jax.jit(step, in_shardings=(rep, batch_sharding(mesh)), out_shardings=(rep, rep), donate_argnums=0,
                 compiler_options=compiler_options(mesh))


def compile_eval_step(eval_step: Callable, mesh: Mesh) -> Callable:
  """`jax.jit` of `eval_step(state, batch) -> sums` with the state replicated, the batch sharded and the sums
  (over the global batch) replicated."""
  rep = replicated_sharding(mesh)
  return jax.jit(unpartitioned_convolutions(eval_step, mesh), in_shardings=(rep, batch_sharding(mesh)),
                 out_shardings=rep, compiler_options=compiler_options(mesh))
