"""The cs231n "babysitting" sanity checks to run before a long training run, each a verdict with its numbers.

  initial_loss          the loss at initialisation is near its chance value (`expected_initial_loss`)
  penalty_raises_loss   the initial total loss rises with the penalty strength (the penalty reaches the weights)
  overfit_subset        unregularised training reaches 100% accuracy on a few examples (the model can learn)
  gradient_check        jax.grad of the data loss agrees with float64 central differences (`dlcore.gradcheck`)

Each takes a model, its variables {'params', 'batch_stats'} and a batch {'image', 'label'}, so they run on any
dlcore model and on hand-built flax modules with the same call convention (`model.apply(variables, x,
train=True, rngs={'dropout': key}, mutable=['batch_stats'])`). The losses are evaluated as a training step sees
them: train mode (BatchNorm with the batch's statistics; dropout, if the model has it, with the key `rng`).
The checks are cheap (one forward pass, or a few hundred steps on a few examples) and catch what a long run
would only show hours later: a wrong init scale, a penalty that reaches no weight, a model that cannot learn,
a gradient that does not flow.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlcore import checks, gradcheck, losses, train
from dlcore.state import TrainState

__all__ = ["GRADCHECK_TOLERANCE", "INITIAL_LOSS_FACTOR", "Check", "expected_initial_loss", "gradient_check",
           "initial_loss", "overfit_subset", "penalty_raises_loss"]

# The initial loss passes within this factor of its chance value. With logits s ~ N(0, sigma^2), independent of
# the label, cross-entropy is about ln C + sigma^2 / 2 and each hinge term about E max(0, delta + N(0, 2 sigma^2));
# He/LeCun init keeps sigma of order 1 (more in deep residual nets, whose branches add variance), well inside the
# factor, while a 10x init scale multiplies sigma by 10 or more (10^depth in a ReLU net without BatchNorm) and
# puts the loss several times above it.
INITIAL_LOSS_FACTOR = 2.0
# Relative error of an array's gradient (see gradient_check): for a correct gradient it is the float64 rounding of
# the loss over the step, ~1e-16 |f| / eps against the array's gradient norm, ~1e-7 at eps = 1e-7 even in deep
# nets; a gradient that does not flow gives 1, and one that is off by a fraction gives that fraction.
GRADCHECK_TOLERANCE = 1e-5


@dataclasses.dataclass(frozen=True)
class Check:
  """One check's outcome: its name, whether it passed, the numbers measured and what was expected of them."""
  name: str
  passed: bool
  values: dict
  expected: dict

  @property
  def verdict(self) -> str:
    """'PASS' or 'FAIL'."""
    return "PASS" if self.passed else "FAIL"

  def as_dict(self) -> dict:
    """{'name', 'verdict', 'values', 'expected'}: JSON-ready."""
    return {"name": self.name, "verdict": self.verdict, "values": self.values, "expected": self.expected}


def expected_initial_loss(loss: str, num_classes: int, **loss_kwargs) -> float:
  """The data loss when every score is equal (~0, as at a small initialisation): ln C for cross-entropy (the
  softmax is uniform, whatever the label smoothing) and (C - 1) * delta for the multiclass hinge (each of the
  C - 1 wrong classes costs max(0, 0 - 0 + delta)). MSE has no such chance level (its initial value 1/C + mean
  s^2 is set by the logits' scale): a ValueError, as is an unknown loss."""
  name = _canonical(loss)
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  if name == "cross_entropy":
    return math.log(num_classes)
  if name == "hinge":
    delta = loss_kwargs.get("delta", 1.0)
    checks.positive("delta (a chance level needs a margin)", delta)
    return (num_classes - 1) * float(delta)
  raise ValueError("loss 'mse' has no chance-level initial value (it is 1/C + mean s^2, set by the scale of the "
                   "logits); the initial-loss check takes 'cross_entropy' or 'hinge'")


def _canonical(loss: str) -> str:
  """The loss's canonical name (one of losses.LOSSES; ValueError listing them for an unknown one)."""
  fn = losses.get(loss)
  return next(name for name in losses.LOSSES if losses.get(name) is fn)


def _forward(model, variables: dict, images, rng):
  """Train-mode logits (BatchNorm with the batch's statistics, dropout with `rng`); the updated statistics are
  dropped, so the variables are unchanged."""
  logits, _ = model.apply(variables, images, train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
  return logits


def _key(rng):
  return jax.random.key(0) if rng is None else rng


def _data_loss(model, variables: dict, batch: dict, rng, loss: str, loss_kwargs: dict) -> tuple[float, float]:
  """(data loss, std of the logits) of one train-mode forward pass, compiled as one program."""
  @jax.jit
  def run(variables, images, labels, key):
    logits = _forward(model, variables, images, key)
    return losses.get(loss)(logits, labels, **loss_kwargs), jnp.std(logits)

  value, std = run(variables, batch["image"], batch["label"], _key(rng))
  return float(value), float(std)


def initial_loss(model, variables: dict, batch: dict, *, loss: str = "cross_entropy",
                 factor: float = INITIAL_LOSS_FACTOR, rng: jax.Array | None = None, **loss_kwargs) -> Check:
  """PASS iff expected / factor <= loss <= factor * expected: the data loss of freshly initialised `variables`
  on `batch` (no penalty) against `expected_initial_loss` (see INITIAL_LOSS_FACTOR for the default factor).
  `values` also has the logits' std, which says why a loss is off (a wrong init scale shows as a large one)."""
  checks.in_range("factor", factor, 1.0, math.inf, low_open=True, high_open=True)
  num_classes = jax.eval_shape(lambda v: _forward(model, v, batch["image"], _key(rng)), variables).shape[-1]
  expected = expected_initial_loss(loss, num_classes, **loss_kwargs)
  value, logit_std = _data_loss(model, variables, batch, rng, loss, loss_kwargs)
  formula = (f"ln({num_classes})" if _canonical(loss) == "cross_entropy"
             else f"({num_classes} - 1) * {loss_kwargs.get('delta', 1.0):g}")
  return Check("initial loss", bool(expected / factor <= value <= factor * expected),
               {"loss": value, "ratio_to_expected": value / expected, "logit_std": logit_std,
                "examples": len(batch["label"])},
               {"loss": expected, "formula": formula,
                "rule": f"expected / {factor:g} <= loss <= {factor:g} * expected"})


def penalty_raises_loss(model, variables: dict, batch: dict, strengths, *, penalty: str = "l2",
                        l1_ratio: float = 0.5, loss: str = "cross_entropy", rng: jax.Array | None = None,
                        **loss_kwargs) -> Check:
  """PASS iff the initial total loss (data loss + strength * penalty of the weights) strictly increases over
  strength 0 and the increasing positive `strengths`. It fails when the penalty reaches no weight (no 'kernel'
  in the params, see dlcore.masks) or is wired with the wrong sign. Sums are taken in float64 on the host."""
  strengths = [float(s) for s in strengths]
  if not strengths or any(not s > 0 for s in strengths) or any(b <= a for a, b in zip(strengths, strengths[1:])):
    raise ValueError(f"strengths must be positive and increasing, got {strengths}")
  checks.one_of("penalty", penalty, tuple(p for p in losses.PENALTIES if p != "none"))
  data_loss, _ = _data_loss(model, variables, batch, rng, loss, loss_kwargs)
  strengths = [0.0, *strengths]
  penalties = jax.jit(lambda p: [losses.penalty(penalty, p, s, l1_ratio) for s in strengths])(variables["params"])
  rows = [{"strength": s, "data_loss": data_loss, "penalty": float(r)} for s, r in zip(strengths, penalties)]
  totals = [r["data_loss"] + r["penalty"] for r in rows]
  for row, total in zip(rows, totals):
    row["total_loss"] = total
  return Check(f"loss rises with {penalty} strength", all(b > a for a, b in zip(totals, totals[1:])),
               {"penalty": penalty, "by_strength": rows},
               {"strengths": strengths, "rule": "total loss strictly increasing in the penalty strength"})


def overfit_subset(model, variables: dict, batch: dict, tx: optax.GradientTransformation, *, steps: int,
                   loss: str = "cross_entropy", rng: jax.Array | None = None, **loss_kwargs) -> Check:
  """PASS iff full-batch training on `batch` (a few examples), with no penalty, reaches 100% training accuracy
  within `steps` updates of `tx`. Accuracy is that of the training step's own forward pass (train mode), taken
  before each update; the loop runs on the device (`lax.while_loop`) and stops at 100%. `values['updates']`:
  how many updates the last accuracy measured had seen (to 100% on a PASS, `steps` on a FAIL)."""
  checks.positive("steps", steps)
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                            batch_stats=variables.get("batch_stats", {}), rng=_key(rng))
  step = train.make_train_step(loss, **loss_kwargs)

  @jax.jit
  def run(state, batch):
    def body(carry):
      st, _, _, first = carry
      new, metrics = step(st, batch)  # metrics of the params before this update: those after st.step updates
      return new, metrics["accuracy"], metrics["loss"], jnp.where(st.step == 0, metrics["loss"], first)

    cond = lambda carry: (carry[1] < 1.0) & (carry[0].step <= steps)
    zero = jnp.zeros((), jnp.float32)
    final, accuracy, last, first = jax.lax.while_loop(cond, body, (state, zero, zero, zero))
    return final.step - 1, accuracy, first, last

  updates, accuracy, first, last = jax.device_get(run(state, batch))
  return Check(f"overfit {len(batch['label'])} examples", bool(accuracy >= 1.0),
               {"examples": len(batch["label"]), "updates": int(updates), "accuracy": float(accuracy),
                "loss_first": float(first), "loss_last": float(last)},
               {"accuracy": 1.0, "rule": f"100% training accuracy within {steps} updates, no regularisation"})


def _array_error(c: gradcheck.Comparison, kinks: bool) -> float:
  """||r|| / max(||a||, ||n||) over the checked coordinates of one array, r = |a - n| less (with `kinks`) each
  coordinate's kink bound; 0 when the gradient is 0 there and the difference quotients agree."""
  residual = np.abs(c.analytic - c.numeric)
  if kinks:
    residual = np.maximum(residual - c.kink_bound, 0.0)
  scale = max(np.linalg.norm(c.analytic), np.linalg.norm(c.numeric))
  return float(np.linalg.norm(residual) / scale) if scale > 0 else 0.0


def gradient_check(model, variables: dict, batch: dict, *, loss: str = "cross_entropy",
                   tolerance: float = GRADCHECK_TOLERANCE, num_checks: int | None = 10, eps: float = 1e-7,
                   noise: float = 0.1, seed: int = 0, rng: jax.Array | None = None, **loss_kwargs) -> Check:
  """PASS iff jax.grad of the data loss (train mode, no penalty, as cs231n checks it first) agrees with float64
  central differences of step `eps` (`dlcore.gradcheck.compare_params`) in every parameter array: over
  `num_checks` coordinates of each (drawn with `seed`; None: all), ||r|| / max(||a||, ||n||) <= `tolerance`,
  a the analytic and n the numeric gradient, r_i = max(0, |a_i - n_i| - kink_bound_i).

  The check runs at the batch's images plus N(0, noise^2) per pixel (drawn with `seed`): zero pixels and zero
  initial biases put pre-activations exactly at ReLU's kink, where the loss has no gradient to check. Other kinks
  (ReLU, max pooling) within `eps` of a unit make the difference quotient wrong, not the gradient: the kink bound
  sets that part aside (exactly, for one kink), and the small step makes crossings rare even for a parameter
  that moves thousands of units. An array's norm, not each coordinate, sets the scale, so coordinates whose
  gradient is ~0 (their difference quotient is rounding noise) do not fail a correct model. A gradient that does
  not flow (a layer cut off by stop_gradient) has no such excuse: an error of 1 in every array it misses.
  A dlcore model's compute dtype is cleared, so it computes in float64 (its params and inputs are cast).
  """
  checks.positive("tolerance", tolerance)
  checks.non_negative("noise", noise)
  if getattr(model, "dtype", None) is not None:
    model = model.clone(dtype=None)
  images = np.asarray(batch["image"], np.float64)
  images = images + noise * np.random.default_rng(seed).standard_normal(images.shape)
  key, labels = _key(rng), batch["label"]

  def loss_fn(params):
    batch_stats = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables.get("batch_stats", {}))
    logits = _forward(model, {"params": params, "batch_stats": batch_stats}, jnp.asarray(images), key)
    return losses.get(loss)(logits, labels, **loss_kwargs)

  comparisons = gradcheck.compare_params(loss_fn, variables["params"], eps=eps, num_checks=num_checks, seed=seed)
  errors = {path: _array_error(c, kinks=True) for path, c in comparisons.items()}
  worst = max(errors, key=errors.get)
  return Check("gradient check (float64)", errors[worst] <= tolerance,
               {"max_relative_error": errors[worst], "worst_array": worst,
                "arrays_over_tolerance": sorted(k for k, e in errors.items() if e > tolerance),
                "max_relative_error_without_kink_bound": max(_array_error(c, kinks=False)
                                                             for c in comparisons.values()),
                "examples": len(labels), "coordinates_per_array": num_checks, "eps": eps, "noise": noise,
                "errors": errors},
               {"max_relative_error": tolerance,
                "rule": f"||a - n|| / max(||a||, ||n||) <= {tolerance:g} in every parameter array, kinks set aside"})
