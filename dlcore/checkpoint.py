"""Orbax checkpoints of a TrainState: every N steps and at the end, atomic, keeping the last k plus the best.

Layout: `directory/<step>/state` holds params, batch_stats, opt_state and the raw PRNG key data (OCDBT arrays);
`directory/<step>/meta` is JSON {'step', 'metrics', **metadata} (`step` doubles as the data-iterator position);
`directory/<step>/metrics` is orbax's copy of the metrics, read to rank checkpoints. Orbax writes each step into
`<step>.orbax-checkpoint-tmp` and renames it when complete, so a save cut short by a crash is never listed or
restored (and is deleted when the next Checkpointer opens the directory).

Multi-process (jax.distributed): construct the Checkpointer and call `save`, `restore` and `close` on every
process with the same arguments; orbax writes each process's shards, syncs with barriers and lets the primary
process finalise. Never guard these calls with `jax.process_index() == 0` -- that deadlocks. The directory must be
visible to every process (shared filesystem or GCS).
"""

import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from dlcore import checks
from dlcore.state import TrainState

__all__ = ["Checkpointer", "CorruptCheckpoint"]

_ARRAYS = ("params", "batch_stats", "opt_state", "rng")


class _QuietUnrankedSaves(logging.Filter):
  """Drops orbax's warning for a save without metrics: most of ours are unranked on purpose (only a new best
  is ranked), so it would print once per checkpoint."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "Requested `tracked_metric`; did not provide metrics" not in record.getMessage()


_QUIET = _QuietUnrankedSaves()
_RESERVED = ("step", "metrics", "fingerprint")


def _to_json(tree: Any) -> Any:
  """Arrays and numpy scalars -> Python numbers / lists, so metrics from a jitted step serialise as JSON."""
  return jax.tree.map(lambda v: np.asarray(v).tolist() if isinstance(v, (jax.Array, np.ndarray, np.generic)) else v,
                      tree)


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _arrays(state: TrainState) -> dict:
  """The saved pytree: every array field of the state, typed PRNG keys as their uint32 key data."""
  tree = {name: getattr(state, name) for name in _ARRAYS}
  if _is_key(tree["rng"]):
    tree["rng"] = jax.random.key_data(tree["rng"])
  return tree


@jax.jit
def _fingerprint(tree) -> jax.Array:
  """One uint32 per leaf: the position-weighted sum, mod 2**32, of the leaf's bytes. Integer sums do not depend
  on the order of summation, so the value is exact on any device count; one flipped bit changes it."""
  def leaf(x):
    data = jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(-1).astype(jnp.uint32)
    weights = jnp.arange(data.size, dtype=jnp.uint32) % jnp.uint32(65521) + jnp.uint32(1)
    return jnp.sum(data * weights, dtype=jnp.uint32)
  return jnp.stack([leaf(x) for x in jax.tree.leaves(tree)])


class CorruptCheckpoint(RuntimeError):
  """A checkpoint that cannot be read back as it was written (truncated, garbled, or not finite)."""


def _one_line(error: Exception) -> str:
  """The gist of an orbax/TensorStore error in one short line."""
  text = f"{type(error).__name__}: {error}".strip().split(". See full")[0].splitlines()
  return text[0][:200] if text else type(error).__name__


def _path(keys) -> str:
  """'opt_state/0/mu/dense/kernel' for a jax key path; namedtuple fields and dict keys read the same."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys)


def _shapes(tree: Any) -> dict[str, tuple]:
  return {_path(keys): tuple(leaf.shape) for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(leaf, "shape")}


class Checkpointer:
  """Saves a TrainState every `every` steps (or when forced), keeping the last `keep` and the best one.

  The best checkpoint is the one whose `metrics[best_metric]` is highest (`best_mode='max'`) or lowest ('min');
  a NaN metric ranks worst, and saves whose metrics lack `best_metric` compete only for the last `keep`. With
  `keep_best=True` the best survives however old it is (so up to keep + 1 checkpoints exist); with False only
  the last `keep` are kept and `best_step` is the best of those.

  Saves are asynchronous: `save` returns once the arrays are copied off the device (so donating the state to the
  next step is safe) and the files are written in the background. `restore` waits for pending writes; call
  `close()` (or use `with Checkpointer(...) as ckpt:`) before the program exits, or the last save may be lost.
  One Checkpointer per directory at a time: opening one deletes unfinished saves left by a crashed writer.
  """

  def __init__(self, directory: str | os.PathLike, *, every: int = 1, keep: int = 3, keep_best: bool = True,
               best_metric: str = "val_accuracy", best_mode: str = "max"):
    directory = os.fspath(directory)
    if not directory:
      raise ValueError("directory must be a non-empty path, got ''")
    if not isinstance(every, int) or every < 1:
      raise ValueError(f"every must be an integer >= 1, got {every!r}")
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
    if not isinstance(best_metric, str) or not best_metric:
      raise ValueError(f"best_metric must be a non-empty metric name, got {best_metric!r}")
    checks.one_of("best_mode", best_mode, ("max", "min"))
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self.best_metric, self.best_mode = best_metric, best_mode
    preserve = [policies.LatestN(n=keep)]
    if keep_best:
      preserve.append(policies.BestN(get_metric_fn=self._score, reverse=best_mode == "min", n=1,
                                     keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        # Orbax's default decision policy also saves the first step it sees; ours saves multiples of `every`
        # (plus on a preemption notice), and `force` covers the final step.
        save_decision_policy=policies.AnySavePolicy(
            [policies.FixedIntervalPolicy(every), policies.PreemptionCheckpointingPolicy()]),
        # Orbax cannot express "last k AND best" with max_to_keep + best_fn (those keep the k best); a
        # preservation policy keeps a step when either rule does. best_fn still ranks for best_step().
        preservation_policy=policies.AnyPreservationPolicy(preserve),
        best_fn=self._score, best_mode=best_mode,
        cleanup_tmp_directories=True, create=True, enable_async_checkpointing=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    logging.getLogger("absl").addFilter(_QUIET)  # a set: adding it again is a no-op

  def _score(self, metrics: Mapping[str, Any]) -> float:
    value = float(metrics[self.best_metric])
    if math.isnan(value):
      return -math.inf if self.best_mode == "max" else math.inf
    return value

  def save(self, state: TrainState, *, metrics: Mapping[str, Any] | None = None,
           metadata: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Saves `state` at step `int(state.step)` if it is a multiple of `every` (any step with `force=True`).

    `metrics` (e.g. {'val_accuracy': ...}) rank the checkpoint; `metadata` is any extra JSON-able dict stored
    beside it. Returns whether a save started; False also when this step is already saved, so the final
    `save(state, force=True)` after a loop that just saved the same step is harmless. Without `force`, a step
    at or below the latest saved one is skipped (orbax's rule).
    """
    step = int(state.step)
    metrics = _to_json(dict(metrics or {}))
    metadata = _to_json(dict(metadata or {}))
    clash = sorted(set(metadata) & set(_RESERVED))
    if clash:
      raise ValueError(f"metadata keys {clash} are reserved; rename them (reserved: {', '.join(_RESERVED)})")
    if step in self._manager.all_steps():
      return False
    ranked = metrics if self.best_metric in metrics else None
    arrays = _arrays(state)
    fingerprint = [int(v) for v in np.asarray(_fingerprint(arrays))]
    args = ocp.args.Composite(state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(
        {"step": step, "metrics": metrics, "fingerprint": fingerprint, **metadata}))
    return self._manager.save(step, args=args, metrics=ranked, force=force)

  def all_steps(self) -> list[int]:
    """Steps of the complete (or in-flight) checkpoints, increasing."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest saved step, or None when there is none."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The retained step with the best `best_metric`, or None when no save carried that metric."""
    return self._manager.best_step()

  def restore(self, template: TrainState, step: int | str | None = None, *,
              log: Callable[[str], None] = print) -> tuple[TrainState, dict]:
    """Restores into the structure, dtypes and shardings of `template`; returns (state, metadata).

    `step` is a step number, 'latest' (or None) or 'best'. `template` is a freshly created state for the same
    model and optimiser (its values are ignored; `apply_fn` and `tx` come from it). Arrays come back committed
    with the template's shardings and dtypes (orbax casts a stored float32 to a bfloat16 template silently); the
    step has the template's type (a Python int for `TrainState.create`). FileNotFoundError when there is no such
    checkpoint; ValueError naming the mismatching paths when the template's tree or shapes differ.

    Every restore is verified: orbax must read it, the arrays must match the fingerprint taken when they were
    saved, and params must be finite. For 'latest', a checkpoint that fails is moved aside (to
    `<directory>.corrupt/`, never deleted), `log` says so in one line, and the next newest is tried; for an
    explicit step or 'best' a failure raises CorruptCheckpoint.
    """
    self._manager.wait_until_finished()
    if step is None or step == "latest":
      while True:
        latest = self.latest_step()
        if latest is None:
          raise FileNotFoundError(f"no latest checkpoint in {self.directory} (complete steps: none)")
        try:
          return self._restore_step(template, latest, f"step {latest}")
        except CorruptCheckpoint as e:
          moved = self._move_aside(latest)
          log(f"checkpoint {latest} is unreadable ({e}); moved it to {moved}; trying the previous one")
    if step == "best":
      which, step = "best", self.best_step()
    elif isinstance(step, (int, np.integer)) and not isinstance(step, bool):
      which, step = f"step {step}", int(step)
    else:
      raise ValueError(f"step must be an int, 'latest', 'best' or None; got {step!r}")
    return self._restore_step(template, step, which)

  def restore_variables(self, step: int | None = None) -> dict:
    """The model variables {'params', 'batch_stats'} of checkpoint `step` (None: the latest), without a template
    (so another optimiser's checkpoint works too: its optimiser state is read and dropped). The arrays are
    verified against the fingerprint taken at save time, and params must be finite (CorruptCheckpoint);
    FileNotFoundError when there is no such checkpoint."""
    self._manager.wait_until_finished()
    step = self.latest_step() if step is None else int(step)
    steps = self.all_steps()
    if step is None or step not in steps:
      which = "latest checkpoint" if step is None else f"checkpoint {step}"
      raise FileNotFoundError(f"no {which} in {self.directory} (complete steps: {steps or 'none'})")
    args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 - whatever orbax raises for a damaged checkpoint
      raise CorruptCheckpoint(_one_line(e)) from None
    arrays, meta = dict(restored["state"]), dict(restored["meta"])
    variables = {"params": arrays["params"], "batch_stats": arrays.get("batch_stats") or {}}
    if "fingerprint" in meta:  # leaves in key order: batch_stats, opt_state, params, rng (one key array)
      saved = meta["fingerprint"]
      n_stats, n_params = len(jax.tree.leaves(variables["batch_stats"])), len(jax.tree.leaves(variables["params"]))
      expected = saved[:n_stats] + saved[len(saved) - 1 - n_params:len(saved) - 1]
      if [int(v) for v in np.asarray(_fingerprint(variables))] != expected:
        raise CorruptCheckpoint(f"checkpoint {step} in {self.directory}: its arrays differ from what was saved")
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(variables["params"])):
      raise CorruptCheckpoint(f"checkpoint {step} in {self.directory}: its parameters are not finite")
    return variables

  def _restore_step(self, template: TrainState, step: int | None, which: str) -> tuple[TrainState, dict]:
    steps = self.all_steps()
    if step is None or step not in steps:
      raise FileNotFoundError(f"no {which} checkpoint in {self.directory} (complete steps: {steps or 'none'})")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(template))
    # Orbax finds shape mismatches only while reading (leaving abandoned reads behind), so compare first.
    try:
      stored = _shapes(self._manager.item_metadata(step)["state"])
    except Exception as e:  # noqa: BLE001 - whatever orbax raises for an unreadable manifest
      raise CorruptCheckpoint(_one_line(e)) from None
    wanted = _shapes(target)
    wrong = [f"{p}: checkpoint {stored.get(p, 'missing')}, template {shape}" for p, shape in wanted.items()
             if stored.get(p, shape) != shape] + [f"{p}: not in the template" for p in stored if p not in wanted]
    if wrong:
      raise ValueError(f"checkpoint {step} in {self.directory} does not fit the template (another model or "
                       "optimiser?): " + "; ".join(wrong))
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 - the tree fits, so a failed read is a damaged checkpoint
      raise CorruptCheckpoint(_one_line(e)) from None
    arrays, meta = dict(restored["state"]), dict(restored["meta"])
    if "fingerprint" in meta and [int(v) for v in np.asarray(_fingerprint(arrays))] != meta["fingerprint"]:
      raise CorruptCheckpoint("its arrays differ from what was saved")
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(arrays["params"])):
      raise CorruptCheckpoint("its parameters are not finite")
    if _is_key(template.rng):
      arrays["rng"] = jax.random.wrap_key_data(arrays["rng"], impl=jax.random.key_impl(template.rng))
    saved_step = meta["step"]
    if isinstance(template.step, jax.Array):
      saved_step = jax.device_put(jnp.asarray(saved_step, template.step.dtype), template.step.sharding)
    meta.pop("fingerprint", None)
    return template.replace(step=saved_step, **arrays), meta

  def _move_aside(self, step: int) -> str:
    """Moves step `step` to `<directory>.corrupt/<step>[.k]` (keeping it for inspection) and forgets it."""
    folder = self.directory + ".corrupt"
    os.makedirs(folder, exist_ok=True)
    target, k = os.path.join(folder, str(step)), 0
    while os.path.exists(target):
      k += 1
      target = os.path.join(folder, f"{step}.{k}")
    if jax.process_index() == 0:
      os.replace(os.path.join(self.directory, str(step)), target)
    self._manager.reload()
    return target

  def wait(self) -> None:
    """Blocks until every pending save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases orbax's threads."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
