"""The training loop: steps, progress, periodic evaluation, checkpoints, resume, early stopping, NaN guard.

Host-device transfers happen only at logging, eval and checkpoint points; between them the compiled step runs
back to back (JAX dispatches asynchronously, so the next host batch is cut while the device computes).
Restarting `fit` with the same checkpointer resumes from the latest checkpoint on the same batch order
(`TrainBatches.batch_at(step)`), so an interrupted run ends where an uninterrupted one would.
"""

from collections.abc import Callable, Iterable
import dataclasses
import math
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dlcore import checks, parallel, train
from dlcore.state import TrainState


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
  state: TrainState
  evals: list[dict]          # {'step', 'loss', 'accuracy'} per evaluation, this run and resumed ones
  best_step: int | None      # step of the best evaluation
  stopped_early: bool


def _due(step: int, every: int, last: int) -> bool:
  return step == last or (every > 0 and step % every == 0)


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
        on_step: Callable[[int, TrainState], None] | None = None) -> LoopResult:
  """Trains `state` to `config.num_steps` steps with the compiled `train_step` and `eval_step`.

  train_batches: has `batch_at(step)` and `batch_size`; eval_batches: an iterable of masked batches.
  checkpointer: a dlcore.checkpoint.Checkpointer (needed for resume and early stopping); writer: a
  dlcore.summaries.MetricWriter; put_batch places a host batch on the devices (dlcore.parallel);
  on_step(step, state) runs on the host after every step (e.g. collecting snapshot-ensemble members).
  Raises FloatingPointError on a non-finite loss, naming the step; the last good checkpoint is kept.
  """
  if config.patience and checkpointer is None:
    raise ValueError("patience > 0 (early stopping) needs a checkpointer to restore the best state from")
  evals, best, bad_evals = [], None, 0
  if checkpointer is not None and checkpointer.latest_step() is not None:
    state, meta = checkpointer.restore(state)
    evals, bad_evals = meta.get("evals", []), meta.get("bad_evals", 0)
    best = max(evals, key=lambda e: (e["accuracy"], -e["step"])) if evals else None
    log(f"resumed from step {int(state.step)} of {checkpointer.directory}")
    if writer is not None:
      writer.truncate_after(int(state.step))

  step, last = int(state.step), config.num_steps
  sums, count, window_start, window_steps = None, 0, time.perf_counter(), 0
  run_start, run_start_step = time.perf_counter(), step
  stopped_early = False
  while step < last:
    state, metrics = train_step(state, put_batch(train_batches.batch_at(step)))
    step += 1
    if on_step is not None:
      on_step(step, state)
    sums = metrics if sums is None else jax.tree.map(lambda a, b: a + b, sums, metrics)
    count += 1
    window_steps += 1

    if _due(step, config.log_every, last):
      means = {k: float(v) / count for k, v in sums.items()}
      if not math.isfinite(means["loss"]):
        good = None if checkpointer is None else _finish_saves(checkpointer)
        raise FloatingPointError(f"training loss is {means['loss']} at step {step} (mean of steps "
                                 f"{step - count + 1}..{step}); last good checkpoint: step {good}")
      elapsed = time.perf_counter() - window_start
      means["images_per_sec"] = window_steps * train_batches.batch_size / elapsed
      rate = (step - run_start_step) / (time.perf_counter() - run_start)
      log(f"step {step}/{last}  loss {means['loss']:.4f}  acc {means['accuracy']:.4f}  "
          f"{means['images_per_sec']:.0f} img/s  ETA {format_eta((last - step) / rate)}")
      if writer is not None:
        writer.write(step, "train", means)
      sums, count, window_start, window_steps = None, 0, time.perf_counter(), 0

    evaluated = eval_batches is not None and _due(step, config.eval_every, last)
    if evaluated:
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

    if checkpointer is not None and (evaluated or stopped_early or _due(step, config.checkpoint_every, last)):
      # The step's loss was computed before its update, so check what would be saved: params and their eval.
      if not _all_finite(state.params) or (evaluated and not math.isfinite(evals[-1]["loss"])):
        raise FloatingPointError(f"parameters or {eval_split} loss not finite after step {step}; not "
                                 f"checkpointed; last good checkpoint: step {_finish_saves(checkpointer)}")
      # Only a strict new best is ranked, so the checkpointer's best is the loop's (ties go to the earliest).
      new_best = evaluated and best is evals[-1]
      ckpt_metrics = {"val_accuracy": best["accuracy"], "val_loss": best["loss"]} if new_best else None
      checkpointer.save(state, metrics=ckpt_metrics, metadata={"evals": evals, "bad_evals": bad_evals},
                        force=True)
    if stopped_early:
      log(f"early stopping at step {step}: no improvement in {config.patience} evaluations; "
          f"restoring step {best['step']}")
      checkpointer.wait()
      state, _ = checkpointer.restore(state, step=best["step"])
      break

  if checkpointer is not None:
    checkpointer.wait()
  return LoopResult(state=state, evals=evals, best_step=None if best is None else best["step"],
                    stopped_early=stopped_early)


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
