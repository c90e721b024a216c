r"""Sanity checks before a long run (cs231n, "babysitting the learning process"), for any model and dataset of
the trainer, each with a PASS/FAIL verdict and the numbers behind it (dlcore.sanity):

  1. initial loss       near its value at chance: ln C for cross-entropy, (C - 1) * delta for the hinge loss;
                        PASS within a factor study.initial_loss_factor (2) either way, on study.loss_examples
  2. penalty strength   the initial total loss (data loss + loss.penalty at each of 0 and study.penalty_strengths)
                        strictly increases
  3. overfitting        full-batch training on study.subset_size examples, no regularisation, at the constant
                        optimizer.learning_rate, reaches 100% training accuracy within study.overfit_steps updates
  4. gradient check     jax.grad of the data loss against float64 central differences on study.gradcheck_examples
                        examples, study.gradcheck_coords coordinates per parameter array; PASS when every array's
                        relative error (kinks set aside) is <= study.gradcheck_tolerance

Checks 1-3 run the model without dropout (regularisation off, as cs231n runs them); the gradient check runs it as
configured (dropout with a fixed key). All four start from the same initialisation (seed) and use a seeded draw
of the training split. Why each tolerance is what it is: dlcore/sanity.py.

  python -m experiments.sanity_checks --config.data.data_dir=DIR --workdir=runs/sanity
  python -m experiments.sanity_checks --config.data.data_dir=DIR --config.model.name=lenet5 --workdir=runs/sanity_lenet5
  python -m experiments.sanity_checks --config.data.data_dir=DIR --config.model.init_scale=10 --workdir=/tmp/bad

Config: experiments/configs/sanity_checks.py (keys: configs/schema.py); override with --config.group.key=value.
Prints a table and writes config.json and results.json (each check's name, verdict, values and expected values)
to --workdir. Exit status: 0 when every check passes, 3 when one fails (so a script can refuse to start a long
run), 1 when the checks cannot run (a bad config or missing data: one line naming the key or the file).
"""

import functools
import math
import os
import sys
import time

from absl import flags
import jax
import numpy as np

from dlcore import checks, data, initializers, losses, models, optim, sanity
from . import common, config_lib, train_lib
from .configs import schema

BINARY = "sanity_checks"
EXIT_FAILED = 3  # the checks ran and at least one failed; 1 means they could not run

FLAGS = flags.FLAGS


def trainer_config(config):
  """The trainer's config with this binary's data, model, loss, optimiser and seed: what train_lib validates and
  builds the model from."""
  tc = schema.train()
  for group in ("data", "model", "loss", "optimizer"):
    tc[group].update(config[group].to_dict())
  tc.seed = config.seed
  return tc


def validate(config):
  """Checks the study's keys and what the checks need, then the shared groups with the trainer's checks
  (ValueError naming the key); returns the trainer config (`trainer_config`, names lower-cased)."""
  s = config.study
  for key in ("loss_examples", "subset_size", "overfit_steps", "gradcheck_examples", "gradcheck_coords",
              "gradcheck_tolerance"):
    checks.positive(f"study.{key}", s[key])
  checks.in_range("study.initial_loss_factor", s.initial_loss_factor, 1.0, math.inf, low_open=True,
                  high_open=True)
  strengths = s.penalty_strengths
  if not strengths or any(not isinstance(v, (int, float)) or not v > 0 for v in strengths) or any(
      b <= a for a, b in zip(strengths, strengths[1:])):
    raise ValueError(f"study.penalty_strengths must be positive and increasing, got {strengths!r}")
  if config.loss.penalty == "none":
    raise ValueError(f"loss.penalty must name the penalty whose strength the check raises, one of "
                     f"{', '.join(repr(p) for p in losses.PENALTIES if p != 'none')}; got 'none'")
  tc = trainer_config(config)
  train_lib.validate(tc)
  if losses.get(tc.loss.name) is losses.mse:
    raise ValueError(f"loss.name={tc.loss.name!r} has no chance-level initial loss to check (1/C + mean s^2 is set "
                     "by the logits' scale); use 'cross_entropy' or 'hinge'")
  if losses.get(tc.loss.name) is losses.hinge:
    checks.positive("loss.hinge_delta (the initial-loss check needs a margin)", tc.loss.hinge_delta)
  return tc


def _loss_kwargs(tc) -> dict:
  """The options of the loss tc.loss.name names (cross-entropy or hinge, by any of their names)."""
  if losses.get(tc.loss.name) is losses.cross_entropy:
    return {"label_smoothing": tc.loss.label_smoothing}
  return {"delta": tc.loss.hinge_delta}


def examples(config, dataset: data.Dataset) -> dict:
  """A seeded draw of training examples, large enough for every check (ValueError naming the key otherwise)."""
  s, size = config.study, len(dataset.train)
  for key in ("loss_examples", "subset_size", "gradcheck_examples"):
    if s[key] > size:
      raise ValueError(f"study.{key} {s[key]} is larger than the training set ({size} examples)")
  order = np.random.default_rng(config.seed).permutation(size)[:max(s.loss_examples, s.subset_size,
                                                                    s.gradcheck_examples)]
  return {"image": dataset.train.images[order], "label": dataset.train.labels[order]}


def _first(batch: dict, n: int) -> dict:
  return {k: v[:n] for k, v in batch.items()}


def run_checks(config, dataset: data.Dataset, log=print) -> list[dict]:
  """The four checks of the module docstring on `dataset` (preprocessed), in order: each `Check.as_dict()` plus
  its 'wall_time_s' and one-line 'measured' and 'criterion' summaries for the table."""
  tc, s = validate(config), config.study
  loss, kwargs = tc.loss.name, _loss_kwargs(tc)
  batch = examples(config, dataset)
  model = train_lib.build_model(tc, dataset.num_classes)
  unregularised = model.clone(keep_prob=1.0) if model.keep_prob < 1.0 else model
  init_key, rng = jax.random.split(jax.random.key(config.seed))
  sample = batch["image"][:s.loss_examples]
  init = functools.partial(models.init_variables, model)
  if not initializers.is_data_dependent(tc.model.init):  # LSUV's loop needs concrete values
    init = jax.jit(init)  # one compilation rather than one per initialiser op
  variables = init(init_key, sample, lsuv_batch=sample)
  log(f"data: {dataset.source} | model {tc.model.name}: "
      f"{sum(np.size(x) for x in jax.tree.leaves(variables['params'])):,} params, {dataset.num_classes} classes")
  o = tc.optimizer
  tx = optim.optimizer(o.name, o.learning_rate, momentum=o.momentum)
  runs = [
      lambda: sanity.initial_loss(unregularised, variables, _first(batch, s.loss_examples), loss=loss,
                                  factor=s.initial_loss_factor, rng=rng, **kwargs),
      lambda: sanity.penalty_raises_loss(unregularised, variables, _first(batch, s.loss_examples),
                                         s.penalty_strengths, penalty=tc.loss.penalty, l1_ratio=tc.loss.l1_ratio,
                                         loss=loss, rng=rng, **kwargs),
      lambda: sanity.overfit_subset(unregularised, variables, _first(batch, s.subset_size), tx,
                                    steps=s.overfit_steps, loss=loss, rng=rng, **kwargs),
      lambda: sanity.gradient_check(model, variables, _first(batch, s.gradcheck_examples), loss=loss,
                                    tolerance=s.gradcheck_tolerance, num_checks=s.gradcheck_coords,
                                    seed=config.seed, rng=rng, **kwargs),
  ]
  results = []
  for run_check, summarize in zip(runs, (_initial_loss_summary, _penalty_summary, _overfit_summary,
                                         _gradient_summary)):
    start = time.perf_counter()
    check = run_check()
    measured, criterion = summarize(check)
    results.append({**check.as_dict(), "wall_time_s": time.perf_counter() - start, "measured": measured,
                    "criterion": criterion})
    log(f"{check.verdict}  {check.name}: {measured}")
  return results


def _initial_loss_summary(check: sanity.Check) -> tuple[str, str]:
  v, e = check.values, check.expected
  return (f"{v['loss']:.4g} ({v['ratio_to_expected']:.2f}x expected; logit std {v['logit_std']:.3g})",
          f"{e['formula']} = {e['loss']:.4g}; {e['rule']}")


def _penalty_summary(check: sanity.Check) -> tuple[str, str]:
  rows = check.values["by_strength"]
  strengths = ", ".join(f"{r['strength']:g}" for r in rows)
  return " -> ".join(f"{r['total_loss']:.4g}" for r in rows), f"increasing over strengths {strengths}"


def _overfit_summary(check: sanity.Check) -> tuple[str, str]:
  v = check.values
  return (f"{100 * v['accuracy']:.0f}% after {v['updates']} updates (loss {v['loss_first']:.3g} -> "
          f"{v['loss_last']:.3g})", check.expected["rule"])


def _gradient_summary(check: sanity.Check) -> tuple[str, str]:
  v = check.values
  raw = v["max_relative_error_without_kink_bound"]
  return (f"{v['max_relative_error']:.2g} in {v['worst_array']} (raw {raw:.2g}; {len(v['errors'])} arrays)",
          f"<= {check.expected['max_relative_error']:g} in every array, kinks set aside")


def main(argv):
  del argv
  common.quiet_logs()
  config, workdir = CONFIG.value, FLAGS.workdir
  start = time.perf_counter()
  try:
    tc = validate(config)
    dataset = train_lib.load_dataset(tc)
    if tc.data.preprocess != "none":
      dataset, _ = data.preprocess.preprocess_dataset(dataset, tc.data.preprocess)
    examples(config, dataset)  # sizes checked before anything is written
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  common.write_json(os.path.join(workdir, "config.json"), config_lib.to_json_dict(config, BINARY))
  results = run_checks(config, dataset, log=lambda message: print(message, flush=True))
  passed = all(r["verdict"] == "PASS" for r in results)
  common.write_json(os.path.join(workdir, "results.json"), {
      "passed": passed, "checks": results, "dataset": dataset.name, "data_source": dataset.source,
      "model": tc.model.name, "num_classes": dataset.num_classes, "wall_time_s": time.perf_counter() - start})
  print("\n" + common.format_table(["check", "verdict", "measured", "expected", "s"],
                                   [[r["name"], r["verdict"], r["measured"], r["criterion"], r["wall_time_s"]]
                                    for r in results]))
  print(f"\n{'all checks PASS' if passed else 'some checks FAIL'}; wrote {workdir}/results.json "
        f"({time.perf_counter() - start:.0f} s)")
  if not passed:
    sys.exit(EXIT_FAILED)


CONFIG = None


def define_flags() -> None:
  """Defines the flags; called by `run` only, so importing this module (tests) clashes with no other binary."""
  global CONFIG
  CONFIG = config_lib.define_config_flag(BINARY, "sanity_checks.py")
  flags.declare_key_flag("config")  # listed by --help with this module's flags
  flags.DEFINE_string("workdir", "runs/sanity_checks", "Where config.json and results.json are written.")


def run():
  define_flags()
  common.run_main(main, __name__)


if __name__ == "__main__":
  run()
