"""The training loop: steps, progress, periodic evaluation, checkpoints, resume, early stopping, NaN guard.

Host-device transfers happen only at logging, eval and checkpoint points; between them the compiled step runs
back to back (JAX dispatches asynchronously, so the next host batch is cut while the device computes).

Training batches come from any source; what resume means depends on it:
- an object with `batch_at(step)` (`dlcore.data.TrainBatches`): the batch of step k is a pure function of k, so
  a run restarted from the checkpoint of step k sees exactly the batches an uninterrupted run would;
- an iterator with `get_state()` / `set_state(s)` (grain's `DatasetIterator` and `DataLoader` iterators): its
  state is saved in every checkpoint and set back on resume, which is equally exact;
- any other iterable (a plain generator): training continues with whatever it yields next; the loop does not
  fast-forward it, and says so when it resumes;
- a `dlcore.data.DeviceBatches`: the training set is on the device(s) and the loop runs up to its
  `steps_per_call` steps per dispatch, ending every call at a log, eval or checkpoint step (and at `call_ends`),
  so logs, evaluations, checkpoints and resume fall on the same steps as with host batches.
Training stops at `num_steps` or when the source runs out, whichever comes first.
"""

import base64
import signal
from collections.abc import Callable, Collection, Iterable
import dataclasses
import math
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dlcore import checks, parallel, train
from dlcore.data.resident import DeviceBatches
from dlcore.state import TrainState

__all__ = ["LoopConfig", "LoopResult", "StopOnSignals", "evaluate", "fit", "format_eta", "predict"]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """num_steps in total; log/eval/checkpoint every so many steps (0: only at the end); early stopping after
  `patience` evaluations without improvement of eval accuracy (0: off)."""
  num_steps: int
  log_every: int = 100
  eval_every: int = 1000
  checkpoint_every: int = 1000
  patience: int = 0

  def __post_init__(self):
    checks.positive("num_steps", self.num_steps)
    for name in ("log_every", "eval_every", "checkpoint_every", "patience"):
      checks.non_negative(name, getattr(self, name))


@dataclasses.dataclass
class LoopResult:
  """What `fit` returns: the final state (the best one after early stopping), every evaluation, the best."""
  state: TrainState
  evals: list[dict]          # {'step', 'loss', 'accuracy'} per evaluation, this run and resumed ones
  best_step: int | None      # step of the best evaluation
  stopped_early: bool
  stopped_by: str | None = None  # the should_stop() reason that ended the run early, e.g. 'SIGTERM'


def _due(step: int, every: int, final: bool) -> bool:
  return final or (every > 0 and step % every == 0)


class _Batches:
  """One interface over the training sources of the module docstring: next() gives a batch or None at the end."""

  def __init__(self, source, step: int):
    self._source, self._step = source, step
    self.resident = isinstance(source, DeviceBatches)
    self.seeded = hasattr(source, "batch_at")
    self._it = None if self.seeded else iter(source)
    self.stateful = not self.seeded and hasattr(self._it, "get_state") and hasattr(self._it, "set_state")

  def next(self):
    if self.seeded:
      batch = self._source.batch_at(self._step)
    else:
      batch = next(self._it, None)
    self._step += 1
    return batch

  def get_state(self):
    """The iterator's position as JSON (None for seeded and stateless sources)."""
    if not self.stateful:
      return None
    position = self._it.get_state()
    return {"b64": base64.b64encode(position).decode()} if isinstance(position, bytes) else position

  def set_state(self, saved) -> None:
    self._it.set_state(base64.b64decode(saved["b64"]) if isinstance(saved, dict) and set(saved) == {"b64"}
                       else saved)


def evaluate(state: TrainState, eval_step: Callable, batches: Iterable[dict],
             put_batch: Callable = lambda b: b) -> dict[str, float]:
  """Mean loss and accuracy of `state` over every (mask-weighted) example of `batches`."""
  sums = None
  for batch in batches:
    out = eval_step(state, put_batch(batch))
    sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
  return train.summarize(sums)


def _all_finite(tree) -> bool:
  return bool(jax.tree.reduce(lambda ok, x: ok & jnp.all(jnp.isfinite(x)), tree, jnp.array(True)))


def _finish_saves(checkpointer) -> int | None:
  """Waits for in-flight async saves (so the last good checkpoint is complete on disk) and returns its step."""
  checkpointer.wait()
  return checkpointer.latest_step()


def format_eta(seconds: float) -> str:
  """H:MM:SS."""
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def fit(state: TrainState, train_step: Callable, eval_step: Callable, train_batches, eval_batches,
        config: LoopConfig, *, checkpointer=None, writer=None, put_batch: Callable = lambda b: b,
        eval_split: str = "val", log: Callable[[str], None] = logging.info,
        on_step: Callable[[int, TrainState], None] | None = None, call_ends: Collection[int] = (),
        should_stop: Callable[[], str | None] = lambda: None) -> LoopResult:
  """Trains `state` to `config.num_steps` steps with the compiled `train_step` and `eval_step`.

  train_batches: a source of batches {'image': [N, ...], 'label': [N]} as in the module docstring (batch_at,
  a grain iterator, or any iterable); eval_batches: an iterable of batches with an optional 'mask' (or None).
  checkpointer: a dlcore.checkpoint.Checkpointer (needed for resume and early stopping); writer: a
  dlcore.summaries.MetricWriter, whose records past the starting step are dropped first (so a restarted run
  logs each step once); put_batch places a host batch on the devices (dlcore.parallel); on_step(step, state)
  runs on the host after every step (e.g. collecting snapshot-ensemble members) -- with a DeviceBatches source,
  after every call, so name the steps it needs in `call_ends`; should_stop() is asked after
  every step (or call) (with several processes only at log steps, where they agree; so keep log_every small enough for a
  scheduler's warning) and a reason it returns (e.g. 'SIGTERM') ends the run after checkpointing that step
  (`LoopResult.stopped_by`). Train metrics are means over each log window; the open window is checkpointed too,
  so a resumed run logs exactly what an uninterrupted one would. images/s counts training time only. The loop
  draws one batch ahead of the step it runs, so a generator it stops early on has given one batch more than was
  trained on. Raises FloatingPointError on a non-finite loss, naming the step; the last good checkpoint is kept.
  """
  if config.patience and checkpointer is None:
    raise ValueError("patience > 0 (early stopping) needs a checkpointer to restore the best state from")
  evals, best, bad_evals, meta = [], None, 0, {}
  if checkpointer is not None and checkpointer.latest_step() is not None:
    state, meta = checkpointer.restore(state, log=log)
    evals, bad_evals = meta.get("evals", []), meta.get("bad_evals", 0)
    best = max(evals, key=lambda e: (e["accuracy"], -e["step"])) if evals else None
    log(f"resumed from step {int(state.step)} of {checkpointer.directory}")
  if writer is not None:
    writer.truncate_after(int(state.step))

  step, last = int(state.step), config.num_steps
  batches = _Batches(train_batches, step)
  if step and not batches.seeded:
    if batches.stateful and meta.get("data_iterator") is not None:
      batches.set_state(meta["data_iterator"])
    elif batches.stateful:
      log(f"resuming at step {step}: the checkpoint holds no position of the data iterator; training continues "
          "with the batches it yields next")
    else:
      log(f"resuming at step {step} from an iterable without batch_at/get_state: training continues with the "
          "batches it yields next, not those an uninterrupted run would have seen")
  window = meta.get("window")  # the log window open at the checkpoint: {'count', 'sums'}
  sums = None if not window else {k: np.float32(v) for k, v in window["sums"].items()}
  count, window_images, window_train_s = (window or {}).get("count", 0), 0, 0.0
  run_start, run_start_step = time.perf_counter(), step
  stopped_early, stopped_by = False, None
  batch = batches.next() if step < last else None
  if batch is None and step < last:
    if not step:
      raise ValueError(f"train_batches yielded no batch at step {step}")
    log(f"train_batches has no batch after step {step}: nothing left to train")
  call_ends = sorted({int(s) for s in call_ends})
  if batches.resident and batch is not None:
    train_batches.compile(train_step, state)  # compile time stays out of the first window's images/s
    log(f"device-resident data: {train_batches.steps_per_call} step(s) per call ({train_batches.why})")
  tick = time.perf_counter()
  while batch is not None:
    if batches.resident:
      calls = _call_length(step, train_batches.steps_per_call, config, last, call_ends,
                           eval_batches is not None, checkpointer is not None)
      state, sums = train_batches.run(train_step, state, sums, step, calls)
      data_position, step = None, step + calls
      batch = True if step < last else None
      count += calls
      window_images += calls * train_batches.batch_size
    else:
      placed = put_batch(batch)
      data_position = batches.get_state()
      state, metrics = train_step(state, placed)
      step += 1
      batch = batches.next() if step < last else None
      sums = metrics if sums is None else jax.tree.map(lambda a, b: a + b, sums, metrics)
      count += 1
      window_images += jax.tree.leaves(placed)[0].shape[0]
    final = batch is None
    if final and step < last:
      log(f"train_batches ran out after step {step} (num_steps {last}): stopping here")
    if on_step is not None:
      on_step(step, state)

    if _due(step, config.log_every, final):
      means = {k: float(v) / count for k, v in sums.items()}  # waits for the step: the window's time ends here
      now = time.perf_counter()
      window_train_s += now - tick
      tick = now
      if not math.isfinite(means["loss"]):
        good = None if checkpointer is None else _finish_saves(checkpointer)
        raise FloatingPointError(f"training loss is {means['loss']} at step {step} (mean of steps "
                                 f"{step - count + 1}..{step}); last good checkpoint: step {good}")
      means["images_per_sec"] = window_images / window_train_s
      rate = (step - run_start_step) / (now - run_start)  # this process's own steps, evaluations included
      log(f"step {step}/{last}  loss {means['loss']:.4f}  acc {means['accuracy']:.4f}  "
          f"{means['images_per_sec']:.0f} img/s  ETA {format_eta((last - step) / rate)}")
      if writer is not None:
        writer.write(step, "train", means)
      sums, count, window_images, window_train_s = None, 0, 0, 0.0

    if stopped_by is None and (jax.process_count() == 1 or _due(step, config.log_every, final)):
      stopped_by = _agreed_stop(should_stop())
    evaluated = eval_batches is not None and _due(step, config.eval_every, final)
    if evaluated:
      window_train_s += _wait(state) - tick
      result = {"step": step, **evaluate(state, eval_step, eval_batches, put_batch)}
      evals.append(result)
      if best is None or result["accuracy"] > best["accuracy"]:
        best, bad_evals = result, 0
      else:
        bad_evals += 1
      log(f"step {step}/{last}  {eval_split} loss {result['loss']:.4f}  {eval_split} acc "
          f"{result['accuracy']:.4f}  (best {best['accuracy']:.4f} at step {best['step']})")
      if writer is not None:
        writer.write(step, eval_split, {"loss": result["loss"], "accuracy": result["accuracy"]})
      stopped_early = bool(config.patience) and bad_evals >= config.patience

    checkpoint_due = evaluated or stopped_early or stopped_by or _due(step, config.checkpoint_every, final)
    if checkpointer is not None and checkpoint_due:
      if not evaluated:
        window_train_s += _wait(state) - tick
      # The step's loss was computed before its update, so check what would be saved: params and their eval.
      if not _all_finite(state.params) or (evaluated and not math.isfinite(evals[-1]["loss"])):
        raise FloatingPointError(f"parameters or {eval_split} loss not finite after step {step}; not "
                                 f"checkpointed; last good checkpoint: step {_finish_saves(checkpointer)}")
      # Only a strict new best is ranked, so the checkpointer's best is the loop's (ties go to the earliest).
      new_best = evaluated and best is evals[-1]
      ckpt_metrics = {"val_accuracy": best["accuracy"], "val_loss": best["loss"]} if new_best else None
      metadata = {"evals": evals, "bad_evals": bad_evals}
      if data_position is not None:
        metadata["data_iterator"] = data_position
      if count:
        metadata["window"] = {"count": count, "sums": {k: float(v) for k, v in sums.items()}}
      checkpointer.save(state, metrics=ckpt_metrics, metadata=metadata, force=True)
    if evaluated or checkpoint_due:
      tick = time.perf_counter()
    if stopped_early:
      stopped_by = None  # the run is over, not interrupted
      log(f"early stopping at step {step}: no improvement in {config.patience} evaluations; "
          f"restoring step {best['step']}")
      checkpointer.wait()
      state, _ = checkpointer.restore(state, step=best["step"])
      break
    if stopped_by is not None and not final:
      log(f"{stopped_by}: stopping after step {step}" + (" (checkpointed)" if checkpointer is not None else ""))
      break
    stopped_by = None if final else stopped_by

  if checkpointer is not None:
    checkpointer.wait()
  return LoopResult(state=state, evals=evals, best_step=None if best is None else best["step"],
                    stopped_early=stopped_early, stopped_by=stopped_by)


def _call_length(step: int, per_call: int, config: LoopConfig, last: int, call_ends: list[int], evaluating: bool,
                 checkpointing: bool) -> int:
  """Steps the next resident call runs from `step`: up to `per_call`, ending at the next step the loop must see."""
  ends = [last] + [s for s in call_ends if s > step][:1]
  for every, used in ((config.log_every, True), (config.eval_every, evaluating),
                      (config.checkpoint_every, checkpointing)):
    if used and every > 0:
      ends.append((step // every + 1) * every)
  return min(per_call, min(ends) - step)


def _wait(state: TrainState) -> float:
  """Waits for the queued steps to finish (so their time counts as training) and returns the clock."""
  jax.block_until_ready(state.params)
  return time.perf_counter()


def _agreed_stop(reason: str | None) -> str | None:
  """`reason` if this or any other process was asked to stop (all processes then stop at the same step)."""
  if jax.process_count() == 1:
    return reason
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  asked = multihost_utils.process_allgather(np.array([reason is not None]))
  return (reason or "a stop request on another process") if bool(np.any(asked)) else None


class StopOnSignals:
  """Context manager turning SIGTERM and SIGINT into a stop request for `fit(should_stop=...)`.

  The first signal is recorded (`requested()` returns 'SIGTERM' or 'SIGINT') and training stops after the
  current step with a checkpoint; a second one restores the previous handlers and re-raises the default action,
  for a user who wants out at once. Handlers are restored on exit; only the main thread can install them.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self._reason, self._previous = None, {}

  def requested(self) -> str | None:
    """The name of the first signal received, or None."""
    return self._reason

  def _handle(self, signum, frame):
    del frame
    if self._reason is not None:
      self._restore()
      signal.raise_signal(signum)
      return
    self._reason = signal.Signals(signum).name

  def _restore(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def __enter__(self) -> "StopOnSignals":
    for signum in self.SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    self._restore()


@jax.jit
def _probabilities(state: TrainState, images: jax.Array) -> jax.Array:
  """Softmax of the eval-mode logits; compiled once per model (apply_fn is a static field of the state)."""
  return jax.nn.softmax(state.apply_fn(state.variables(), images, train=False), axis=-1)


def predict(state: TrainState, batches: Iterable[dict], put_batch: Callable = lambda b: b) -> np.ndarray:
  """Softmax probabilities for every real (unmasked) example of `batches`, in order."""
  out = []
  for batch in batches:
    placed = put_batch(batch)  # global arrays: every process gets the whole batch's predictions back
    probs = parallel.to_host(_probabilities(state, placed["image"]))
    mask = parallel.to_host(placed["mask"]) if "mask" in placed else np.ones(len(probs), bool)
    out.append(probs[np.asarray(mask, bool)])
  return np.concatenate(out)
