r"""Learning-rate range test (Smith 2017, "Cyclical learning rates", Sec. 3.3; fastai's lr_find).

Trains the trainer's model from its initialisation (any data, model, loss and optimiser experiments.train takes,
under the same config keys) for study.ramp_steps steps while the learning rate rises exponentially from study.min_lr
to study.max_lr: step t (0-based) updates with lr_t = min_lr * (max_lr / min_lr) ** (t / (steps - 1)). It
records the training loss of every step (the objective: data loss + penalty, on that step's batch before its
update) and its bias-corrected exponential moving average with factor study.smooth, and stops early once the
smoothed loss exceeds study.stop_factor times its minimum so far (diverged) or the loss is not finite.

Suggested rates, from the smoothed loss up to its last finite value:
  steepest       where the smoothed loss falls fastest: the minimum of d loss / d log(lr) before the loss's minimum
                 (the suggestion)
  minimum        where the smoothed loss is lowest (already close to divergence)
  minimum / 10   the common rule of thumb

  python -m experiments.lr_finder --config.data.data_dir=DIR --workdir=runs/lr_finder
  python -m experiments.lr_finder --config.data.data_dir=DIR --config.optimizer.name=adam \
      --config.study.min_lr=1e-7 --config.study.max_lr=1 --workdir=runs/lr_finder_adam

Config: experiments/configs/lr_finder.py (keys: configs/schema.py); override with --config.group.key=value. The
groups data, model, loss and optimizer (less its learning_rate), loop.batch_size and seed mean what they mean to
the trainer; study: min_lr (1e-6), max_lr (10), ramp_steps (200), smooth (0.98; 0: no smoothing), stop_factor (4).
Runs on one device. Prints progress, a table of rates and losses, and the suggestions; writes to --workdir:
config.json, lr_finder.csv (step, lr, loss, smoothed), results.json (suggestions, steps run, why it stopped) and
lr_finder.png (raw and smoothed loss against the rate, log axis, the suggestions marked).
"""

import math
import os
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from dlcore import checks, data, parallel
from . import common, config_lib, train_lib
from .configs import schema

BINARY = "lr_finder"
TABLE_ROWS = 12
FLAGS = flags.FLAGS


def exponential_schedule(min_lr: float, max_lr: float, steps: int):
  """The sweep as an optax schedule, traced inside the compiled step: min_lr at step 0, max_lr at step
  steps - 1, geometric in between."""
  log_ratio = math.log(max_lr / min_lr)
  return lambda count: min_lr * jnp.exp(log_ratio * jnp.asarray(count, jnp.float32) / (steps - 1))


def sweep_rate(min_lr: float, max_lr: float, steps: int, t: int) -> float:
  """The rate of step t in float64, for the records (the compiled schedule differs by float32 rounding)."""
  return min_lr * (max_lr / min_lr) ** (t / (steps - 1))


def suggest(lrs, smoothed) -> dict:
  """{'steepest', 'minimum', 'minimum_over_10'} from the smoothed loss at each rate, up to its first non-finite
  value. steepest: the rate minimising d smoothed / d log(lr) (central differences) at or before the minimum;
  None when the loss never falls there (or fewer than two finite points)."""
  lrs, smoothed = np.asarray(lrs, np.float64), np.asarray(smoothed, np.float64)
  finite = np.isfinite(smoothed)
  n = len(smoothed) if finite.all() else int(np.argmin(finite))
  if n == 0:
    return {"steepest": None, "minimum": None, "minimum_over_10": None}
  best = int(np.argmin(smoothed[:n]))
  steepest = None
  if n >= 2:
    slope = np.gradient(smoothed[:n], np.log(lrs[:n]))
    i = int(np.argmin(slope[:best + 1]))
    steepest = float(lrs[i]) if slope[i] < 0 else None
  return {"steepest": steepest, "minimum": float(lrs[best]), "minimum_over_10": float(lrs[best]) / 10}


def trainer_config(config):
  """The trainer's config with this study's data, model, loss, optimiser, batch size and seed, running the sweep's
  steps: what train_lib validates and builds from."""
  tc = schema.train()
  for group in ("data", "model", "loss", "optimizer"):
    tc[group].update(config[group].to_dict())
  tc.seed, tc.loop.batch_size, tc.loop.steps = config.seed, config.loop.batch_size, config.study.ramp_steps
  tc.optimizer.learning_rate = config.study.max_lr  # stands in for the sweep in the trainer's optimiser checks
  tc.schedule.name = "constant"
  return tc


def validate(config):
  """Checks the study's keys, then the shared groups with the trainer's checks (ValueError naming the key);
  returns the trainer config to build from (`trainer_config`, names lower-cased)."""
  s = config.study
  checks.in_range("study.min_lr", s.min_lr, 0.0, math.inf, low_open=True, high_open=True)
  if not s.min_lr < s.max_lr < math.inf:
    raise ValueError(f"study.max_lr must be finite and > study.min_lr={s.min_lr:g}, got {s.max_lr!r}")
  if s.ramp_steps < 2:
    raise ValueError(f"study.ramp_steps must be >= 2 (the sweep's first and last rate), got {s.ramp_steps}")
  checks.in_range("study.smooth", s.smooth, 0.0, 1.0, high_open=True)
  checks.in_range("study.stop_factor", s.stop_factor, 1.0, math.inf, low_open=True, high_open=True)
  tc = trainer_config(config)
  train_lib.validate(tc)
  return tc


def range_test(config, workdir: str, log=print) -> dict:
  """Runs the range test `config` describes, writes --workdir's files and returns results.json's dict.
  Raises ValueError (naming the config key) for a bad config or one the data rules out, before writing."""
  tc, study = validate(config), config.study
  start = time.perf_counter()
  dataset = train_lib.load_dataset(tc)
  steps_per_epoch, _ = train_lib.plan_steps(tc, len(dataset.train))
  log(f"data: {dataset.source} | train {len(dataset.train)}, image {dataset.image_shape}")
  if tc.data.preprocess != "none":
    dataset, _ = data.preprocess.preprocess_dataset(dataset, tc.data.preprocess)

  mesh = parallel.make_mesh(1)
  batches = data.TrainBatches(dataset.train, tc.loop.batch_size, seed=tc.seed)
  rate = exponential_schedule(study.min_lr, study.max_lr, study.ramp_steps)
  state = parallel.replicate(train_lib.build_state(tc, dataset, batches.batch_at(0)["image"], rate), mesh)
  step_fn = train_lib.make_train_step(tc)

  def step(st, batch):  # the rate is a function of st.step inside the compiled step: one compilation
    new, metrics = step_fn(st, batch)
    return new, metrics["total_loss"]

  step = parallel.compile_train_step(step, mesh, state)
  os.makedirs(workdir, exist_ok=True)
  common.write_json(os.path.join(workdir, "config.json"), config_lib.to_json_dict(config, BINARY))
  log(f"model {tc.model.name}: {sum(x.size for x in jax.tree.leaves(state.params)):,} params | {tc.optimizer.name}, "
      f"batch {tc.loop.batch_size} | lr {study.min_lr:g} -> {study.max_lr:g} over {study.ramp_steps} steps "
      f"({study.ramp_steps / steps_per_epoch:.2f} epochs); stops when the smoothed loss > {study.stop_factor:g} x its "
      "minimum")

  rows, average, best = [], 0.0, math.inf
  stopped, why = "completed", f"reached study.max_lr={study.max_lr:g} after {study.ramp_steps} steps"
  every = max(1, study.ramp_steps // 10)
  for t in range(study.ramp_steps):
    state, loss = step(state, parallel.shard_batch(batches.batch_at(t), mesh))
    loss, lr = float(loss), sweep_rate(study.min_lr, study.max_lr, study.ramp_steps, t)
    average = study.smooth * average + (1.0 - study.smooth) * loss
    smoothed = average / (1.0 - study.smooth ** (t + 1))  # bias-corrected: the average starts at 0
    rows.append([t, lr, loss, smoothed])
    best = min(best, smoothed)
    if not math.isfinite(loss):
      stopped, why = "non_finite", f"the loss is {loss} at step {t} (lr {lr:.3g})"
    elif smoothed > study.stop_factor * best:
      stopped, why = "diverged", (f"the smoothed loss {smoothed:.4g} exceeds {study.stop_factor:g} x its minimum "
                                  f"{best:.4g} at step {t} (lr {lr:.3g})")
    if stopped != "completed" or t % every == 0 or t == study.ramp_steps - 1:
      log(f"step {t:{len(str(study.ramp_steps))}d}/{study.ramp_steps}  lr {lr:<9.3g}  loss {loss:<9.4g}  smoothed "
          f"{smoothed:<9.4g}  {time.perf_counter() - start:5.1f} s")
    if stopped != "completed":
      break
  log(f"stopped: {why}")

  lrs, smoothed = [r[1] for r in rows], [r[3] for r in rows]
  suggestions = suggest(lrs, smoothed)
  finite = [s for s in smoothed if math.isfinite(s)]
  results = {"suggested_lr": suggestions["steepest"], "suggestions": suggestions,
             "min_smoothed_loss": min(finite) if finite else None, "steps_run": len(rows),
             "steps_planned": study.ramp_steps, "stopped": stopped, "stop_reason": why, "last_lr": lrs[-1],
             "data_source": dataset.source, "wall_time_s": time.perf_counter() - start}
  common.write_csv(os.path.join(workdir, "lr_finder.csv"), ["step", "lr", "loss", "smoothed"], rows)
  ending = {"completed": "reached study.max_lr", "non_finite": "stopped: non-finite loss",
            "diverged": f"stopped: smoothed loss > {study.stop_factor:g} x its minimum"}[stopped]
  plot(rows, suggestions, study.stop_factor, f"learning-rate range test: {tc.model.name} on {dataset.name}, "
       f"{tc.optimizer.name}, batch {tc.loop.batch_size}\n{len(rows)} steps, lr {study.min_lr:g} to {lrs[-1]:.3g} "
       f"({ending})", os.path.join(workdir, "lr_finder.png"))
  common.write_json(os.path.join(workdir, "results.json"), results)

  shown = sorted(set(np.linspace(0, len(rows) - 1, min(len(rows), TABLE_ROWS)).round().astype(int)))
  log("\n" + common.format_table(["step", "lr", "loss", "smoothed"], [rows[i] for i in shown]))
  fmt = lambda lr: "none (the smoothed loss never falls: lower study.min_lr)" if lr is None else f"{lr:.3g}"
  log(f"\nsuggested learning rate: {fmt(suggestions['steepest'])} (steepest descent of the smoothed loss)")
  log(f"at the minimum smoothed loss: {fmt(suggestions['minimum'])}; minimum / 10: "
      f"{fmt(suggestions['minimum_over_10'])}")
  log(f"wrote {workdir}/config.json, lr_finder.csv, results.json, lr_finder.png ({results['wall_time_s']:.0f} s)")
  return results


SUGGESTION_STYLE = {"steepest": ("C2", "-", "steepest descent"), "minimum": ("C3", ":", "minimum"),
                    "minimum_over_10": ("C1", "--", "minimum / 10")}


def plot(rows: list[list], suggestions: dict, stop_factor: float, title: str, path: str) -> None:
  """Raw and smoothed loss against the rate (log axis), the suggestions as vertical lines. The y range covers the
  start and the stop threshold; a diverging tail above it is cut off."""
  lrs = np.array([r[1] for r in rows])
  raw, smoothed = np.array([r[2] for r in rows]), np.array([r[3] for r in rows])
  fig, ax = common.plt.subplots(figsize=(8, 5), layout="constrained")
  ax.plot(lrs, raw, color="0.6", lw=0.8, alpha=0.8, label="loss (each step)")
  ax.plot(lrs, smoothed, color="C0", lw=2, label="smoothed loss")
  for key, (color, style, name) in SUGGESTION_STYLE.items():
    if suggestions[key] is not None:
      ax.axvline(suggestions[key], color=color, ls=style, lw=1.5, label=f"{name}: {suggestions[key]:.3g}")
  finite = smoothed[np.isfinite(smoothed)]
  if len(finite):
    low = min(raw[np.isfinite(raw)].min(), finite.min())
    high = max(finite[0], min(finite.max(), stop_factor * finite.min()))
    pad = 0.05 * (high - low or 1.0)
    ax.set_ylim(low - pad, high + pad)
  ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title=title)
  ax.title.set_fontsize(10)
  ax.legend(loc="upper left")
  ax.grid(True, which="major", alpha=0.3)
  common.save_figure(fig, path)


def main(argv):
  del argv
  common.quiet_logs()
  try:
    range_test(CONFIG.value, FLAGS.workdir, log=lambda message: print(message, flush=True))
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


CONFIG = None


def define_flags() -> None:
  """Defines the flags; called by `run` only, so importing this module (tests) clashes with no other binary."""
  global CONFIG
  CONFIG = config_lib.define_config_flag(BINARY, "lr_finder.py")
  flags.declare_key_flag("config")  # listed by --help with this module's flags
  flags.DEFINE_string("workdir", "runs/lr_finder", "Where config.json, lr_finder.csv, results.json and "
                      "lr_finder.png are written.")


def run():
  define_flags()
  common.run_main(main, __name__)


if __name__ == "__main__":
  run()
