"""Populations: K models of one architecture trained at once by one compiled step (`vmap` over a member axis).

A `Population` holds one `TrainState` whose every leaf has a leading member axis of size K (params, batch_stats,
optimiser state, step, PRNG key), each member's numeric hyperparameters as [K] arrays, and which members are
still training. `make_train_step` returns the population step: `jax.vmap` of one member's pure step, the same
`dlcore.train` step a single run uses, with that member's hyperparameters as traced values. So member k after N
steps equals a single run with member k's hyperparameters and seed (tests/test_population.py).

Per-member hyperparameters (`HYPERPARAMS`): learning_rate (the scale of the schedule: lr_t = learning_rate *
shape(t) with `schedule` the shape at learning rate 1), momentum, b1, b2, weight_decay, penalty_strength (L1/L2
on weights), label_smoothing, init_scale and seed (both used at creation). A member whose loss, parameters or
BatchNorm statistics become non-finite is frozen at its last finite state and its step recorded in `diverged_at`; `freeze` stops
members by hand (early stopping). Freezing changes data, not the program: nothing recompiles.

`make_eval_step` evaluates every member on one shared batch (sums, as dlcore.train's eval step); `evaluate`
gives each member's loss and accuracy over a whole split.

Batches: one shared batch for every member ({'image': [N, ...], 'label': [N]}), or one per member ([K, N, ...],
`per_member_batches=True`, e.g. each member's own data order). Devices: `make_mesh(pop, data)` builds a 2-D mesh
('pop', 'data'); `compile_train_step` shards the member axis over 'pop' and each batch over 'data'.
"""

from collections.abc import Callable, Mapping, Sequence
import functools

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from dlcore import checks, losses, optim, parallel, train
from dlcore import state as state_lib

__all__ = ["DEFAULTS", "HYPERPARAMS", "POP_AXIS", "Population", "compile_eval_step", "compile_train_step", "create",
           "estimate_bytes", "evaluate", "freeze", "make_eval_step", "make_mesh", "make_train_step", "member"]

POP_AXIS = "pop"
# Every per-member hyperparameter and its value when not given.
DEFAULTS = {"learning_rate": 0.1, "momentum": 0.9, "b1": 0.9, "b2": 0.999, "weight_decay": 0.0,
            "penalty_strength": 0.0, "label_smoothing": 0.0, "init_scale": None, "seed": 0}
HYPERPARAMS = tuple(DEFAULTS)
_STEP_HYPERPARAMS = ("learning_rate", "momentum", "b1", "b2", "weight_decay", "penalty_strength", "label_smoothing")


@struct.dataclass
class Population:
  """K members: `state` (a TrainState with a leading [K] axis on every leaf), `hparams` ({name: [K] float32}),
  `active` ([K] bool: still training) and `diverged_at` ([K] int32: the step whose update went non-finite, -1).
  Static: the optimiser's name, the schedule's shape and whether the chain holds weight decay (any member's
  weight_decay > 0), which fix the optimiser state's structure for every member."""
  state: state_lib.TrainState
  hparams: dict
  active: jax.Array
  diverged_at: jax.Array
  optimizer: str = struct.field(pytree_node=False, default="momentum")
  schedule: Callable | None = struct.field(pytree_node=False, default=None)
  weight_decay: bool = struct.field(pytree_node=False, default=False)

  @property
  def size(self) -> int:
    """K, the number of members."""
    return int(self.active.shape[0])


def _values(hparams: Mapping[str, Sequence], size: int | None) -> tuple[int, dict[str, list]]:
  """(K, {name: K values}) from per-member lists (a scalar is broadcast); ValueError naming a bad name or length."""
  unknown = sorted(set(hparams) - set(HYPERPARAMS))
  if unknown:
    raise ValueError(f"unknown hyperparameter(s) {unknown}; per-member hyperparameters: {', '.join(HYPERPARAMS)}")
  lengths = {k: len(v) for k, v in hparams.items() if isinstance(v, (list, tuple, np.ndarray))}
  sizes = set(lengths.values()) | ({size} if size is not None else set())
  if len(sizes) > 1:
    raise ValueError(f"per-member hyperparameters must all have one value per member; got lengths {lengths}"
                     + (f" for size={size}" if size is not None else ""))
  k = sizes.pop() if sizes else 1
  checks.positive("population size", k)
  out = {}
  for name, default in DEFAULTS.items():
    value = hparams.get(name, default)
    out[name] = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value] * k
  return k, out


def _check_member(values: dict, optimizer: str) -> None:
  """The checks of dlcore.optim and dlcore.losses on one member's concrete values (names the hyperparameter)."""
  optim.optimizer(optimizer, values["learning_rate"], momentum=values["momentum"], b1=values["b1"],
                  b2=values["b2"], weight_decay=values["weight_decay"])
  checks.non_negative("penalty_strength", values["penalty_strength"])
  checks.in_range("label_smoothing", values["label_smoothing"], 0.0, 1.0, high_open=True)
  if values["init_scale"] is not None:
    checks.positive("init_scale", values["init_scale"])
  if not isinstance(values["seed"], (int, np.integer)) or values["seed"] < 0:
    raise ValueError(f"seed must be an integer >= 0, got {values['seed']!r}")


def create(model: nn.Module, sample: jax.Array, *, optimizer: str = "momentum", schedule: Callable | None = None,
           size: int | None = None, **hparams) -> Population:
  """A population at step 0 of `model`, initialised on `sample` (one batch of inputs).

  optimizer: one of dlcore.optim.OPTIMIZERS, for every member; schedule: the learning-rate schedule's shape at
  learning rate 1 (a function of the step, e.g. `dlcore.optim.schedule(name, 1.0, ...)`; None: constant), which
  each member scales by its learning_rate. hparams: per-member values of HYPERPARAMS as lists of length K (or one
  value for all); the members' count is their common length (or `size`). Each member is created exactly as
  `dlcore.state.create(model with its init_scale, its optimizer, sample, its seed)` creates a single run.
  """
  k, values = _values(hparams, size)
  per_member = [{name: values[name][i] for name in HYPERPARAMS} for i in range(k)]
  for i, v in enumerate(per_member):
    try:
      _check_member(v, optimizer)
    except ValueError as e:
      raise ValueError(f"member {i}: {e}") from None
  decay = max(v["weight_decay"] for v in per_member)
  states = []
  for v in per_member:
    member_model = model if v["init_scale"] is None else model.clone(init_scale=v["init_scale"])
    # the optimiser state's structure (not its values) depends on whether the chain decays: the same for all
    tx = _transformation(optimizer, v["learning_rate"], {**v, "weight_decay": decay}, decay > 0, schedule)
    states.append(state_lib.create(member_model, tx, sample, int(v["seed"])))
  template = states[0]  # apply_fn and tx are static: the first member's serve all (init_scale acts only at init)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[s.replace(apply_fn=template.apply_fn, tx=template.tx)
                                                     for s in states])
  step_hparams = {name: jnp.asarray([float(v[name]) for v in per_member], jnp.float32)
                  for name in _STEP_HYPERPARAMS}
  return Population(state=stacked, hparams=step_hparams, active=jnp.ones(k, bool),
                    diverged_at=jnp.full(k, -1, jnp.int32), optimizer=optimizer, schedule=schedule,
                    weight_decay=decay > 0)


def _transformation(optimizer: str, learning_rate, values: Mapping, decay: bool,
                    shape: Callable | None):
  """One member's optimiser from (possibly traced) hyperparameter values; weight decay is in the chain for every
  member when any member uses it (a member with 0 then adds exactly 0)."""
  lr = learning_rate if shape is None else (lambda count: learning_rate * shape(count))
  return optim.optimizer(optimizer, lr, momentum=values["momentum"], b1=values["b1"], b2=values["b2"],
                         weight_decay=values["weight_decay"] if decay else 0.0)


def make_train_step(*, loss: str = "cross_entropy", penalty: str = "none", l1_ratio: float = 0.5,
                    augment: Callable | None = None, per_member_batches: bool = False,
                    vectorize: bool = True) -> Callable:
  """The population step `(population, batch) -> (population, metrics {name: [K]})`.

  The data loss, the penalty (its strength is per member) and augmentation are dlcore.train.make_train_step's;
  the optimiser and schedule are the population's own. Frozen members keep their state; their metrics are still
  computed. per_member_batches: every batch array has a leading [K] axis (else one batch serves all).
  vectorize: members as one vmapped computation (True), or one after another inside the one program (False):
  XLA:CPU runs a convolution vmapped over its weights as a grouped convolution, several times slower than K
  separate ones, so conv nets on CPU train faster unvectorised.
  """
  losses.get(loss)
  checks.one_of("penalty", penalty, losses.PENALTIES)

  def member_step(state, hp, batch, optimizer, schedule, weight_decay):
    tx = _transformation(optimizer, hp["learning_rate"], hp, weight_decay, schedule)
    loss_kwargs = {"label_smoothing": hp["label_smoothing"]} if loss == "cross_entropy" else {}
    step = train.make_train_step(loss, penalty, hp["penalty_strength"], l1_ratio, augment=augment, **loss_kwargs)
    new, metrics = step(state.replace(tx=tx), batch)
    return new.replace(tx=state.tx), metrics

  def population_step(pop: Population, batch: dict) -> tuple[Population, dict]:
    one = functools.partial(member_step, optimizer=pop.optimizer, schedule=pop.schedule,
                            weight_decay=pop.weight_decay)
    if not per_member_batches:  # every member gets the batch: each dot is then batched on both operands, which
      # XLA:CPU runs faster than a dot batched only in its weights (benchmarks/results/population_cpu.md)
      batch = jax.tree.map(lambda x: jnp.broadcast_to(x, (pop.size, *x.shape)), batch)
    new, metrics = _over_members(jax.vmap(one), (pop.state, pop.hparams, batch), (), pop.size, vectorize)
    finite = jnp.isfinite(metrics["loss"]) & jax.vmap(_all_finite)((new.params, new.batch_stats))
    keep = pop.active & finite
    state = jax.tree.map(lambda n, o: jnp.where(keep.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, pop.state)
    diverged = jnp.where(pop.active & ~finite & (pop.diverged_at < 0), pop.state.step, pop.diverged_at)
    return pop.replace(state=state, active=keep, diverged_at=diverged), metrics

  return population_step


def make_eval_step(loss: str = "cross_entropy", *, vectorize: bool = True) -> Callable:
  """The population's evaluation step `(population, batch) -> sums {name: [K]}`: dlcore.train's eval step (running
  statistics, no dropout, mask-weighted sums) for every member on one shared batch, with each member's own label
  smoothing in the cross-entropy; `dlcore.train.summarize` of member k's slice of the summed sums gives its loss
  and accuracy. vectorize: as in `make_train_step` (False: members one after another, for conv nets on CPU)."""
  losses.get(loss)

  def member_eval(state, hp, batch):
    kwargs = {"label_smoothing": hp["label_smoothing"]} if loss == "cross_entropy" else {}
    return train.make_eval_step(loss, **kwargs)(state, batch)

  evaluate_members = jax.vmap(member_eval, in_axes=(0, 0, None))
  return lambda pop, batch: _over_members(evaluate_members, (pop.state, pop.hparams), (batch,), pop.size, vectorize)


def _over_members(fn: Callable, members: tuple, shared: tuple, size: int, vectorize: bool):
  """`fn(*members, *shared)`, fn vmapped over the leading [K] axis of `members`: all K at once, or (vectorize=False)
  each member a vmap of one, the same program per member (no grouped convolutions), results concatenated."""
  if vectorize:
    return fn(*members, *shared)
  outs = [fn(*jax.tree.map(lambda x: x[k:k + 1], members), *shared) for k in range(size)]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)


def evaluate(pop: Population, eval_step: Callable, batches) -> list[dict[str, float]]:
  """Each member's mean loss and accuracy over every (mask-weighted) example of `batches`: `dlcore.loop.evaluate`
  of every member at once, with `eval_step` from `make_eval_step`."""
  sums = None
  for batch in batches:
    out = eval_step(pop, batch)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  return [train.summarize(jax.tree.map(lambda x: x[k], sums)) for k in range(pop.size)]


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)] or [jnp.array(True)]))


def member(pop: Population, k: int) -> state_lib.TrainState:
  """Member k's TrainState (its slice of every leaf), as a single run would hold it."""
  if not 0 <= k < pop.size:
    raise ValueError(f"member must be in [0, {pop.size}), got {k}")
  return jax.tree.map(lambda x: x[k], pop.state)


def freeze(pop: Population, members: Sequence[int]) -> Population:
  """`pop` with `members` stopped (their state no longer changes); no recompilation."""
  bad = [k for k in members if not 0 <= k < pop.size]
  if bad:
    raise ValueError(f"members must be in [0, {pop.size}), got {bad}")
  return pop.replace(active=pop.active.at[jnp.asarray(list(members), jnp.int32)].set(False))


# --------------------------------------------------------------------------- devices


def make_mesh(pop: int, data: int = 1) -> Mesh:
  """A 2-D mesh ('pop', 'data') of pop x data devices: members split over 'pop', each batch over 'data'."""
  checks.positive("pop", pop)
  checks.positive("data", data)
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  if pop * data > len(devices):
    raise ValueError(f"pop x data = {pop} x {data} needs {pop * data} devices; {len(devices)} are available")
  return Mesh(np.array(devices[:pop * data]).reshape(pop, data), (POP_AXIS, parallel.AXIS))


def estimate_bytes(step: Callable, pop: Population, batch: dict, *, per_member_batches: bool = False) -> int:
  """Device memory the population step needs, estimated before compiling it for the whole population: XLA's
  buffer sizes (arguments, outputs, scratch) of the step compiled for one member, times K (0 if unknown)."""
  one = jax.tree.map(lambda x: x[:1], pop)
  one_batch = jax.tree.map(lambda x: x[:1], batch) if per_member_batches else batch
  analysis = jax.jit(step).lower(one, one_batch).compile().memory_analysis()
  if analysis is None:
    return 0
  total = sum(getattr(analysis, f"{k}_size_in_bytes", 0) for k in ("argument", "output", "temp"))
  return int(total * pop.size)


def compile_train_step(step: Callable, mesh: Mesh, pop: Population, batch: dict, *,
                       per_member_batches: bool = False) -> Callable:
  """`jax.jit` of the population step with members split over 'pop' and batches over 'data', the population
  donated. Checks first that K divides over the 'pop' devices and that the population fits in device memory
  (ValueError naming the sizes), so nothing is compiled for a population that cannot run."""
  pop_devices = mesh.shape[POP_AXIS]
  if pop.size % pop_devices:
    raise ValueError(f"population size {pop.size} must be divisible by the {pop_devices} devices of the "
                     f"'{POP_AXIS}' mesh axis")
  need = estimate_bytes(step, pop, batch, per_member_batches=per_member_batches) / pop_devices
  free = [f for f in (parallel.free_bytes(d) for d in mesh.devices.flat) if f is not None]
  if free and need > min(free):
    raise ValueError(f"a population of {pop.size} members needs about {need / 2**20:.0f} MiB per device, more than "
                     f"the {min(free) / 2**20:.0f} MiB free: use fewer members or more '{POP_AXIS}' devices")
  members = NamedSharding(mesh, P(POP_AXIS))
  batches = NamedSharding(mesh, P(POP_AXIS, parallel.AXIS) if per_member_batches else P(parallel.AXIS))
  return jax.jit(parallel.unpartitioned_convolutions(step, mesh), in_shardings=(members, batches),
                 out_shardings=(members, members), donate_argnums=0, compiler_options=parallel.compiler_options(mesh))


def compile_eval_step(eval_step: Callable, mesh: Mesh) -> Callable:
  """`jax.jit` of the population's evaluation step with members split over 'pop' and each batch over 'data'."""
  members = NamedSharding(mesh, P(POP_AXIS))
  return jax.jit(parallel.unpartitioned_convolutions(eval_step, mesh),
                 in_shardings=(members, NamedSharding(mesh, P(parallel.AXIS))), out_shardings=members,
                 compiler_options=parallel.compiler_options(mesh))

