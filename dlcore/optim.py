"""Optimisers and learning-rate schedules by name, as optax GradientTransformations and Schedules.

Every optimiser follows the lectures' update rules exactly, also when the learning rate changes from step to step
(the step-t update uses lr_t = schedule(t), t = 0, 1, ...):

  sgd           x -= lr_t * g
  momentum      v = mu * v - lr_t * g;  x += v                  (classic: lr inside the velocity. optax.sgd's
                                                                 v = mu*v + g; x -= lr_t*v differs once lr_t moves)
  momentum_ema  v = beta * v + (1 - beta) * g;  x -= lr_t * v   (beta is `momentum`; v is not bias-corrected)
  nesterov      v_prev = v;  v = mu * v - lr_t * g;  x += -mu * v_prev + (1 + mu) * v   (Sutskever et al. 2013
                                                                 in the look-ahead-free form of the lectures)
  rmsprop       c = rho * c + (1 - rho) * g**2;  x -= lr_t * g / (sqrt(c) + eps)   (rho is `decay`, c starts at 0)
  adam          m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g**2;  x -= lr_t * m_hat / (sqrt(v_hat) + eps)
                with m_hat = m / (1 - b1**(t+1)), v_hat = v / (1 - b2**(t+1))
  adamw         adam with decoupled weight decay: x -= lr_t * (m_hat / (sqrt(v_hat) + eps) + wd * x), i.e.
                optax.adamw. It is exactly `adam` with weight_decay_mode="decoupled"; asking it for "l2" is an error
                (that is plain adam with an L2 loss term, so call it "adam").

Weight decay (`weight_decay` = wd > 0) touches only weights (leaves named 'kernel', see `dlcore.masks`), never
biases or BatchNorm scale/offset:
  "l2"         g += wd * x before the optimiser: the gradient of 0.5 * wd * ||w||^2 added to the loss, so it goes
               through momentum / adaptive scaling like any other gradient.
  "decoupled"  x -= lr_t * wd * x after the optimiser's own update (Loshchilov & Hutter 2019). For plain sgd the two
               modes coincide; for momentum and adaptive methods they do not.

`clip_norm` rescales the whole gradient pytree to global norm <= clip_norm, first in the chain: it sees the data
gradient only (the "l2" term is added after it).

`momentum` may be a schedule of the step for momentum and nesterov (mu_t in place of mu, e.g. `momentum_ramp`:
0.5 -> 0.95 linearly, Srivastava et al. 2014). `max_norm` = c projects, last in the chain, each unit's incoming
weight vector (a kernel's column: the norm over all axes but the last) of the updated weights x + update onto the
ball of radius c: w -> w * min(1, c / ||w||) (Srivastava et al. 2014, section 5.1); weights only, never biases.
"""

from collections.abc import Callable
import inspect
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlcore import checks, masks

__all__ = ["OPTIMIZERS", "SCHEDULES", "WEIGHT_DECAY_MODES", "DecoupledDecayState", "LearningRate", "Momentum",
           "max_norm_constraint", "momentum_ramp", "optimizer", "schedule", "schedule_params", "sgdr_cycle_ends"]

LearningRate = float | optax.Schedule
Momentum = float | optax.Schedule

WEIGHT_DECAY_MODES = ("decoupled", "l2")


# ---------------------------------------------------------------------------------------------------------------
# Optimisers.

class DecoupledDecayState(NamedTuple):
  """Optimiser state of the decoupled weight decay (adamw, weight_decay_mode='decoupled'): the update count."""
  count: jax.Array  # updates done so far: the schedule's step


def _decoupled_weight_decay(learning_rate: LearningRate, weight_decay: float) -> optax.GradientTransformation:
  """Adds -lr_t * wd * params to the (already scaled) updates; lr_t follows the optimiser's own schedule."""
  def init(params):
    del params
    return DecoupledDecayState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("decoupled weight decay needs params: call update(grads, state, params)")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    updates = jax.tree.map(lambda u, p: u - (lr * weight_decay * p).astype(u.dtype), updates, params)
    return updates, DecoupledDecayState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def _trace(mu: Momentum, nesterov: bool = False) -> optax.GradientTransformation:
  """optax.trace with decay mu, or mu_t = mu(step) for a schedule (optax.inject_hyperparams)."""
  if callable(mu):
    return optax.inject_hyperparams(optax.trace, static_args="nesterov")(decay=mu, nesterov=nesterov)
  return optax.trace(decay=mu, nesterov=nesterov)


def max_norm_constraint(c: float) -> optax.GradientTransformation:
  """Max-norm constraint (Srivastava et al. 2014): turns `updates` into the step that lands on the projection of
  params + updates, where every incoming weight vector (norm over all axes but the last) longer than `c` is
  scaled back to norm c. Vectors of norm <= c keep their update unchanged. Needs `params`; apply it to weights
  only (`optimizer` masks it with `masks.weights_mask`)."""
  checks.positive("max_norm", c)

  def project(u, p):
    new = p + u
    norms = jnp.sqrt(jnp.sum(jnp.square(new), axis=tuple(range(new.ndim - 1)), keepdims=True))
    projected = new * (c / jnp.maximum(norms, jnp.finfo(new.dtype).tiny))
    return jnp.where(norms > c, projected - p, u).astype(u.dtype)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("max_norm needs params: call update(grads, state, params)")
    return jax.tree.map(project, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def momentum_ramp(initial: float, final: float, ramp_steps: int) -> optax.Schedule:
  """mu_t = initial + (final - initial) * min(t / ramp_steps, 1): the momentum ramp of Srivastava et al. 2014
  (0.5 -> 0.95), a schedule for `optimizer(momentum=...)`."""
  checks.in_range("initial momentum", initial, 0.0, 1.0, high_open=True)
  checks.in_range("momentum", final, 0.0, 1.0, high_open=True)
  ramp_steps = _check_steps("momentum ramp_steps", ramp_steps)
  return optax.linear_schedule(initial, final, transition_steps=ramp_steps)


def _sgd(lr, h):
  return optax.scale_by_learning_rate(lr)


def _momentum(lr, h):
  # Scale by -lr_t first, then accumulate: v = mu*v + (-lr_t*g), and the update is v.
  return optax.chain(optax.scale_by_learning_rate(lr), _trace(h["momentum"]))


def _momentum_ema(lr, h):
  return optax.chain(optax.ema(decay=h["momentum"], debias=False), optax.scale_by_learning_rate(lr))


def _nesterov(lr, h):
  # optax.trace(nesterov=True) on u = -lr_t*g: v = mu*v_prev + u, update = u + mu*v = mu^2*v_prev + (1+mu)*u,
  # which is the lectures' -mu*v_prev + (1+mu)*v expanded.
  return optax.chain(optax.scale_by_learning_rate(lr), _trace(h["momentum"], nesterov=True))


def _rmsprop(lr, h):
  return optax.chain(optax.scale_by_rms(decay=h["decay"], eps=h["eps"], initial_scale=0.0, eps_in_sqrt=False),
                     optax.scale_by_learning_rate(lr))


def _adam(lr, h):
  return optax.chain(optax.scale_by_adam(b1=h["b1"], b2=h["b2"], eps=h["eps"], eps_root=0.0),
                     optax.scale_by_learning_rate(lr))


_OPTIMIZERS: dict[str, Callable[[LearningRate, dict[str, Any]], optax.GradientTransformation]] = {
    "sgd": _sgd,
    "momentum": _momentum,
    "momentum_ema": _momentum_ema,
    "nesterov": _nesterov,
    "rmsprop": _rmsprop,
    "adam": _adam,
    "adamw": _adam,  # + decoupled weight decay, forced below
}

OPTIMIZERS: tuple[str, ...] = tuple(_OPTIMIZERS)


def optimizer(name: str, learning_rate: LearningRate, *, momentum: Momentum = 0.9, b1: float = 0.9,
              b2: float = 0.999, eps: float = 1e-8, decay: float = 0.9, weight_decay: float = 0.0,
              weight_decay_mode: str = "decoupled", clip_norm: float | None = None,
              max_norm: float | None = None) -> optax.GradientTransformation:
  """The optimiser called `name` (see the module docstring for the exact update rules).

  `learning_rate` is a float or an optax schedule (e.g. from `schedule`). `momentum` is mu for momentum/nesterov
  (a float, or a schedule of the step such as `momentum_ramp`) and beta for momentum_ema; `decay` is RMSProp's
  rho. `max_norm` = c bounds every weight vector into a unit to norm c after the update. Hyperparameters are
  checked here, naming the argument. The returned transformation needs `params` in `update` when
  weight_decay > 0 or max_norm is set.
  """
  build = checks.lookup("optimizer", _OPTIMIZERS, name)
  if not callable(learning_rate):
    checks.positive("learning_rate", learning_rate)
  if callable(momentum):
    if name.lower() not in ("momentum", "nesterov"):
      raise ValueError(f"a momentum schedule needs optimizer 'momentum' or 'nesterov', got {name!r}")
  else:
    checks.in_range("momentum", momentum, 0.0, 1.0, high_open=True)
  checks.in_range("b1", b1, 0.0, 1.0, high_open=True)
  checks.in_range("b2", b2, 0.0, 1.0, high_open=True)
  checks.non_negative("eps", eps)
  checks.in_range("decay", decay, 0.0, 1.0, high_open=True)
  checks.non_negative("weight_decay", weight_decay)
  checks.one_of("weight_decay_mode", weight_decay_mode, WEIGHT_DECAY_MODES)
  if clip_norm is not None:
    checks.positive("clip_norm", clip_norm)
  if max_norm is not None:
    checks.positive("max_norm", max_norm)
  if name.lower() == "adamw" and weight_decay_mode != "decoupled":
    raise ValueError(f"weight_decay_mode must be 'decoupled' for adamw, got {weight_decay_mode!r}; "
                     "use optimizer 'adam' for adam with an L2 term")

  hyper = dict(momentum=momentum, b1=b1, b2=b2, eps=eps, decay=decay)
  decays = checks.is_traced(weight_decay) or weight_decay > 0  # traced (a population): decay, exactly 0 for 0
  chain = []
  if clip_norm is not None:
    chain.append(optax.clip_by_global_norm(clip_norm))
  if decays and weight_decay_mode == "l2":
    chain.append(optax.masked(optax.add_decayed_weights(weight_decay), masks.weights_mask))
  chain.append(build(learning_rate, hyper))
  if decays and weight_decay_mode == "decoupled":
    chain.append(optax.masked(_decoupled_weight_decay(learning_rate, weight_decay), masks.weights_mask))
  if max_norm is not None:
    chain.append(optax.masked(max_norm_constraint(max_norm), masks.weights_mask))
  return optax.chain(*chain)


# ---------------------------------------------------------------------------------------------------------------
# Schedules. Each builder takes (learning_rate, steps_per_epoch, total_steps) plus its own keyword-only params;
# those keyword names are the params `schedule` accepts for it, and the ones without a default are required.

def _constant(lr, spe, total):
  return optax.constant_schedule(lr)


def _step(lr, spe, total, *, step_size, gamma=0.1):
  """lr * gamma ** floor(step / step_size)."""
  step_size = _check_steps("step_size", step_size)
  checks.in_range("gamma", gamma, 0.0, 1.0, low_open=True)
  return optax.exponential_decay(lr, transition_steps=step_size, decay_rate=gamma, staircase=True)


def _piecewise(lr, spe, total, *, boundaries, gamma=0.1):
  """lr * gamma ** (number of boundaries <= step)."""
  boundaries = [_check_steps("boundaries", b, allow_zero=True) for b in boundaries]
  if any(b1 >= b2 for b1, b2 in zip(boundaries, boundaries[1:])):
    raise ValueError(f"boundaries must be strictly increasing, got {boundaries!r}")
  checks.in_range("gamma", gamma, 0.0, 1.0, low_open=True)
  return optax.piecewise_constant_schedule(lr, {b: gamma for b in boundaries})


def _exponential(lr, spe, total, *, decay_rate=0.95, staircase=False):
  """lr * decay_rate ** epoch (epoch = step / steps_per_epoch, floored if staircase)."""
  checks.in_range("decay_rate", decay_rate, 0.0, 1.0, low_open=True)
  return optax.exponential_decay(lr, transition_steps=spe, decay_rate=decay_rate, staircase=bool(staircase))


def _inverse_time(lr, spe, total, *, decay):
  """lr / (1 + decay * epoch)."""
  checks.non_negative("decay", decay)
  return lambda count: lr / (1.0 + decay * (count / spe))


def _inverse_sqrt(lr, spe, total, *, warmup_steps):
  """Linear warmup 0 -> lr over warmup_steps, then lr * sqrt(warmup_steps / step) (Vaswani et al. 2017)."""
  w = float(_check_steps("warmup_steps", warmup_steps))
  def sched(count):
    t = jnp.asarray(count, jnp.float32)
    return lr * jnp.where(t < w, t / w, jnp.sqrt(w / jnp.maximum(t, w)))
  return sched


def _linear(lr, spe, total, *, final_fraction=0.01, decay_steps=None):
  """(1 - a) * lr + a * final_fraction * lr with a = step / decay_steps, constant after decay_steps (tau)."""
  checks.in_range("final_fraction", final_fraction, 0.0, 1.0)
  if decay_steps is None:
    if total is None:
      raise ValueError("schedule 'linear' needs decay_steps (tau) or total_steps")
    decay_steps = total
  decay_steps = _check_steps("decay_steps", decay_steps)
  return optax.linear_schedule(lr, final_fraction * lr, transition_steps=decay_steps)


def _warmup_cosine(lr, spe, total, *, warmup_steps=0, final_fraction=0.0):
  """Linear warmup 0 -> lr over warmup_steps, then cosine to final_fraction * lr at total_steps, constant after."""
  if total is None:
    raise ValueError("schedule 'warmup_cosine' needs total_steps")
  warmup_steps = _check_steps("warmup_steps", warmup_steps, allow_zero=True)
  if not warmup_steps < total:
    raise ValueError(f"warmup_steps must be < total_steps={total}, got {warmup_steps!r}")
  checks.in_range("final_fraction", final_fraction, 0.0, 1.0)
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warmup_steps, decay_steps=total,
                                            end_value=final_fraction * lr)


def _sgdr_periods(first_period: int, period_mult: float) -> tuple[int, int]:
  """Checked (first_period, period_mult) as ints: whole-step periods need a whole multiplier (as in PyTorch)."""
  first_period = _check_steps("first_period", first_period)
  checks.in_range("period_mult", period_mult, 1.0, math.inf)
  if period_mult != int(period_mult):
    raise ValueError(f"period_mult must be a whole number >= 1 (periods are whole steps), got {period_mult!r}")
  return first_period, int(period_mult)


def _sgdr(lr, spe, total, *, first_period, period_mult=1, min_fraction=0.0):
  """SGDR (Loshchilov & Hutter 2017): lr_t = lr * (f + (1 - f) * 0.5 * (1 + cos(pi * T_cur / T_i))), where cycle
  i lasts T_i = first_period * period_mult**i steps and T_cur counts steps since the last restart."""
  first_period, mult = _sgdr_periods(first_period, period_mult)
  checks.in_range("min_fraction", min_fraction, 0.0, 1.0)
  if mult == 1:
    cycle = lambda t: (t % first_period, jnp.full_like(t, first_period))
  else:
    # Cycle starts grow geometrically: under 32 of them reach int32's range, so look the cycle up in a table.
    starts, periods, start, period = [], [], 0, first_period
    while start < np.iinfo(np.int32).max:
      starts.append(start)
      periods.append(period)
      start, period = start + period, period * mult
    starts, periods = np.asarray(starts, np.int64), np.asarray(periods, np.float64)
    def cycle(t):
      i = jnp.searchsorted(jnp.asarray(starts, t.dtype), t, side="right") - 1
      return t - jnp.asarray(starts, t.dtype)[i], jnp.asarray(periods, jnp.float32)[i]
  def sched(count):
    t = jnp.asarray(count, jnp.int32)
    t_cur, t_i = cycle(t)
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * t_cur.astype(jnp.float32) / t_i.astype(jnp.float32)))
    return lr * (min_fraction + (1.0 - min_fraction) * cosine)
  return sched


def _check_steps(arg: str, value, *, allow_zero: bool = False) -> int:
  """Requires a whole number of steps, > 0 (or >= 0)."""
  if isinstance(value, bool) or not float(value).is_integer():
    raise ValueError(f"{arg} must be a whole number of steps, got {value!r}")
  (checks.non_negative if allow_zero else checks.positive)(arg, value)
  return int(value)


_SCHEDULES: dict[str, Callable[..., optax.Schedule]] = {
    "constant": _constant,
    "step": _step,
    "piecewise": _piecewise,
    "exponential": _exponential,
    "inverse_time": _inverse_time,
    "inverse_sqrt": _inverse_sqrt,
    "linear": _linear,
    "warmup_cosine": _warmup_cosine,
    "sgdr": _sgdr,
}

SCHEDULES: tuple[str, ...] = tuple(_SCHEDULES)


def schedule_params(name: str) -> dict[str, Any]:
  """The params schedule `name` accepts, mapped to their defaults (inspect.Parameter.empty: required)."""
  build = checks.lookup("schedule", _SCHEDULES, name)
  return {p.name: p.default for p in inspect.signature(build).parameters.values() if p.kind == p.KEYWORD_ONLY}


def schedule(name: str, learning_rate: float, *, steps_per_epoch: int = 1, total_steps: int | None = None,
             **params) -> optax.Schedule:
  """The learning-rate schedule called `name`, a function of the step count (0 for the first update).

  "epoch" in a formula is step / steps_per_epoch; every other length is in steps. Params by schedule:
    constant       -
    step           step_size (required), gamma=0.1                lr * gamma**floor(step / step_size)
    piecewise      boundaries (required, steps), gamma=0.1        lr * gamma**(#boundaries <= step)
    exponential    decay_rate=0.95, staircase=False               lr * decay_rate**epoch (floor(epoch) if staircase)
    inverse_time   decay (required, per epoch)                    lr / (1 + decay * epoch)
    inverse_sqrt   warmup_steps (required)                        lr * min(step / w, sqrt(w / step))
    linear         final_fraction=0.01, decay_steps=total_steps   lr -> final_fraction*lr linearly by step tau,
                                                                  then flat
    warmup_cosine  warmup_steps=0, final_fraction=0.0             0 -> lr linearly, cosine to final_fraction*lr at
                                                                  total_steps (required), then flat
    sgdr           first_period (required), period_mult=1,        cosine from lr to min_fraction*lr within each cycle;
                   min_fraction=0.0                               cycle i lasts first_period * period_mult**i steps
  Unknown or missing params raise a ValueError naming them and the allowed ones.
  """
  build = checks.lookup("schedule", _SCHEDULES, name)
  checks.positive("learning_rate", learning_rate)
  steps_per_epoch = _check_steps("steps_per_epoch", steps_per_epoch)
  if total_steps is not None:
    total_steps = _check_steps("total_steps", total_steps)
  allowed = schedule_params(name)
  listing = ", ".join(allowed) or "none"
  unknown = sorted(set(params) - set(allowed))
  if unknown:
    raise ValueError(f"unknown params {unknown} for schedule {name!r}; allowed: {listing}")
  missing = [p for p, default in allowed.items() if default is inspect.Parameter.empty and p not in params]
  if missing:
    raise ValueError(f"schedule {name!r} needs params {missing}; allowed: {listing}")
  return build(float(learning_rate), steps_per_epoch, total_steps, **params)


def sgdr_cycle_ends(first_period: int, period_mult: float, total_steps: int) -> list[int]:
  """The step counts (updates done) at which an SGDR cycle has just ended, up to total_steps: where a snapshot
  ensemble (Huang et al. 2017) takes its members. Cycle i lasts first_period * period_mult**i steps."""
  period, mult = _sgdr_periods(first_period, period_mult)
  total_steps = _check_steps("total_steps", total_steps)
  ends, end = [], 0
  while end + period <= total_steps:
    end += period
    ends.append(end)
    period *= mult
  return ends
