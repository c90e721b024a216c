"""dlcore.optim against plain numpy float64 implementations of the lectures' update rules and schedule formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from dlcore import masks, optim

STEPS = 25
# Off the defaults, so a hyperparameter that is not wired through (or eps put inside the sqrt) shows.
HYPER = dict(momentum=0.8, b1=0.85, b2=0.99, eps=1e-3, decay=0.95)


# ---------------------------------------------------------------------------------------------------------------
# A small noisy quadratic: g = h * (x - x_star) + noise_t, on a params tree with weights, biases and BN params.

def _tree(rng, scale=1.0):
  return {"layer0": {"linear": {"kernel": scale * rng.normal(size=(3, 4)), "bias": scale * rng.normal(size=(4,))},
                     "bn_before": {"bn": {"scale": 1.0 + scale * rng.normal(size=(4,)),
                                          "bias": scale * rng.normal(size=(4,))}}}}


def _f32(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


def _problem(seed=0):
  """x0, curvature h, minimum x_star, per-step noise: float32 values (the numpy side reads them in float64)."""
  rng = np.random.default_rng(seed)
  x0 = _f32(_tree(rng))
  h = jax.tree.map(lambda a: np.abs(a).astype(np.float32) + 0.5, _f32(_tree(rng)))
  x_star = _f32(_tree(rng, 0.5))
  noise = _f32(jax.tree.map(lambda a: 0.3 * rng.normal(size=(STEPS,) + a.shape), x0))
  return x0, h, x_star, noise


def _grad(x, h, x_star, noise_t):
  return jax.tree.map(lambda x, h, s, n: h * (x - s) + n, x, h, x_star, noise_t)


def _run_optax(tx, x0, h, x_star, noise):
  """The trajectory x_1..x_STEPS (float32) of `tx` on the problem, run eagerly (compiling costs more here)."""
  x, state, traj = jax.tree.map(jnp.asarray, x0), tx.init(x0), []
  for t in range(STEPS):
    updates, state = tx.update(_grad(x, h, x_star, jax.tree.map(lambda n: n[t], noise)), state, x)
    x = optax.apply_updates(x, updates)
    traj.append(x)
  return traverse_util.flatten_dict(jax.tree.map(lambda *xs: np.stack(xs), *traj))


def _run_numpy(name, x0, h, x_star, noise, lr_fn, *, momentum=0.9, b1=0.9, b2=0.999, eps=1e-8, decay=0.9,
               weight_decay=0.0, mode="decoupled", clip_norm=None, max_norm=None):
  """The lectures' formulas in float64, one leaf at a time; weight decay only on leaves named 'kernel'.
  `momentum` may be a function of the step (mu_t); max_norm projects each kernel column of the new x to norm
  <= max_norm."""
  flat = lambda t: {k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(t).items()}
  x, h, x_star, noise = flat(x0), flat(h), flat(x_star), flat(noise)
  v = {k: np.zeros_like(a) for k, a in x.items()}  # velocity / first moment / rmsprop cache
  m = {k: np.zeros_like(a) for k, a in x.items()}  # adam first moment
  traj = {k: [] for k in x}
  for t in range(STEPS):
    g = {k: h[k] * (x[k] - x_star[k]) + noise[k][t] for k in x}
    if clip_norm is not None:
      norm = math.sqrt(sum(np.sum(a**2) for a in g.values()))
      if norm >= clip_norm:
        g = {k: a * clip_norm / norm for k, a in g.items()}
    is_weight = {k: k[-1] == "kernel" for k in x}
    if mode == "l2":
      g = {k: g[k] + weight_decay * x[k] * is_weight[k] for k in x}
    lr = lr_fn(t)
    mu = momentum(t) if callable(momentum) else momentum
    for k in x:
      x_old = x[k]
      if name == "sgd":
        x[k] = x[k] - lr * g[k]
      elif name == "momentum":
        v[k] = mu * v[k] - lr * g[k]
        x[k] = x[k] + v[k]
      elif name == "momentum_ema":
        v[k] = momentum * v[k] + (1 - momentum) * g[k]
        x[k] = x[k] - lr * v[k]
      elif name == "nesterov":
        v_prev = v[k]
        v[k] = mu * v[k] - lr * g[k]
        x[k] = x[k] - mu * v_prev + (1 + mu) * v[k]
      elif name == "rmsprop":
        v[k] = decay * v[k] + (1 - decay) * g[k]**2
        x[k] = x[k] - lr * g[k] / (np.sqrt(v[k]) + eps)
      elif name in ("adam", "adamw"):
        m[k] = b1 * m[k] + (1 - b1) * g[k]
        v[k] = b2 * v[k] + (1 - b2) * g[k]**2
        m_hat, v_hat = m[k] / (1 - b1**(t + 1)), v[k] / (1 - b2**(t + 1))
        x[k] = x[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
      else:
        raise AssertionError(name)
      if mode == "decoupled" and is_weight[k]:
        x[k] = x[k] - lr * weight_decay * x_old
      if max_norm is not None and is_weight[k]:
        norms = np.sqrt(np.sum(x[k]**2, axis=tuple(range(x[k].ndim - 1))))
        x[k] = x[k] * np.where(norms > max_norm, max_norm / norms, 1.0)
      traj[k].append(x[k].copy())
  return {k: np.stack(a) for k, a in traj.items()}


def _assert_close(actual, expected, rtol=1e-5, atol=1e-5):
  assert actual.keys() == expected.keys()
  for k in expected:
    np.testing.assert_allclose(actual[k], expected[k], rtol=rtol, atol=atol, err_msg=str(k))


# An oscillating, non-monotone learning rate: where lr_t moves, "lr inside the velocity" matters.
LR = 0.05
lr_schedule_jnp = lambda t: LR * (1.0 + 0.8 * jnp.sin(0.7 * t))
lr_schedule_np = lambda t: LR * (1.0 + 0.8 * math.sin(0.7 * t))


@pytest.mark.parametrize("lr_kind", ["constant", "schedule"])
@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_optimizer_matches_lecture_formulas(name, lr_kind):
  x0, h, x_star, noise = _problem()
  lr, lr_np = (LR, lambda t: LR) if lr_kind == "constant" else (lr_schedule_jnp, lr_schedule_np)
  got = _run_optax(optim.optimizer(name, lr, **HYPER), x0, h, x_star, noise)
  _assert_close(got, _run_numpy(name, x0, h, x_star, noise, lr_np, **HYPER))


def test_momentum_ramp_matches_closed_form():
  ramp = optim.momentum_ramp(0.5, 0.95, 40)
  for t in (0, 1, 7, 20, 39, 40, 41, 1000):
    np.testing.assert_allclose(float(ramp(t)), 0.5 + 0.45 * min(t / 40, 1.0), rtol=1e-6)


@pytest.mark.parametrize("name", ["momentum", "nesterov"])
def test_momentum_schedule_matches_lecture_formula(name):
  x0, h, x_star, noise = _problem()
  mu_np = lambda t: 0.5 + 0.45 * min(t / 10, 1.0)  # reaches 0.95 within the run, then flat
  got = _run_optax(optim.optimizer(name, lr_schedule_jnp, momentum=optim.momentum_ramp(0.5, 0.95, 10)),
                   x0, h, x_star, noise)
  _assert_close(got, _run_numpy(name, x0, h, x_star, noise, lr_schedule_np, momentum=mu_np))


def test_momentum_schedule_needs_a_classic_momentum_optimizer():
  with pytest.raises(ValueError, match="momentum schedule needs optimizer 'momentum' or 'nesterov'"):
    optim.optimizer("momentum_ema", 0.1, momentum=optim.momentum_ramp(0.5, 0.9, 5))


@pytest.mark.parametrize("name, weight_decay", [("momentum", 0.0), ("sgd", 0.0), ("adamw", 0.05)])
def test_max_norm_matches_reference(name, weight_decay):
  # The kernel's columns start at norms 0.9 to 1.6: c = 1 binds some of them and not others.
  x0, h, x_star, noise = _problem()
  got = _run_optax(optim.optimizer(name, LR, weight_decay=weight_decay, max_norm=1.0, **HYPER), x0, h, x_star, noise)
  expected = _run_numpy(name, x0, h, x_star, noise, lambda t: LR, weight_decay=weight_decay, max_norm=1.0, **HYPER)
  _assert_close(got, expected)
  kernel = got[("layer0", "linear", "kernel")]
  norms = np.linalg.norm(kernel, axis=1)  # (steps, 4): per step, each unit's incoming weight vector
  assert np.all(norms <= 1.0 + 1e-6)
  assert np.any(np.isclose(norms, 1.0, rtol=1e-6)) and np.any(norms < 0.9)
  unconstrained = _run_numpy(name, x0, h, x_star, noise, lambda t: LR, weight_decay=weight_decay, **HYPER)
  assert np.abs(unconstrained[("layer0", "linear", "kernel")] - kernel).max() > 1e-2  # the constraint did bind


def test_max_norm_projects_params_plus_updates_of_weights_only():
  rng = np.random.default_rng(3)
  params = {"conv": {"kernel": rng.normal(size=(2, 2, 3, 5)).astype(np.float32),
                     "bias": 10 * rng.normal(size=(5,)).astype(np.float32)},
            "bn": {"scale": 10 + rng.normal(size=(5,)).astype(np.float32)}}
  updates = jax.tree.map(lambda a: (0.5 * rng.normal(size=a.shape)).astype(np.float32), params)
  c = 3.5
  tx = optim.optimizer("sgd", 1.0, max_norm=c)  # sgd at lr 1 on -updates: the step before projection is `updates`
  out, _ = tx.update(jax.tree.map(lambda u: -u, updates), tx.init(params), params)
  new = np.asarray(params["conv"]["kernel"], np.float64) + updates["conv"]["kernel"]
  norms = np.sqrt((new**2).sum(axis=(0, 1, 2)))
  assert np.any(norms > c) and np.any(norms < c)
  expected = new * np.where(norms > c, c / norms, 1.0)
  np.testing.assert_allclose(params["conv"]["kernel"] + np.asarray(out["conv"]["kernel"]), expected, rtol=1e-5,
                             atol=1e-6)
  below = norms <= c  # units under the bound keep their update bit for bit
  np.testing.assert_array_equal(np.asarray(out["conv"]["kernel"])[..., below], updates["conv"]["kernel"][..., below])
  np.testing.assert_array_equal(out["conv"]["bias"], updates["conv"]["bias"])  # biases and BN: never projected
  np.testing.assert_array_equal(out["bn"]["scale"], updates["bn"]["scale"])


def test_max_norm_is_a_no_op_below_the_bound():
  rng = np.random.default_rng(4)
  params = {"kernel": rng.normal(size=(6, 4)).astype(np.float32)}
  updates = {"kernel": (0.1 * rng.normal(size=(6, 4))).astype(np.float32)}
  tx = optim.max_norm_constraint(100.0)
  out, _ = tx.update(updates, tx.init(params), params)
  np.testing.assert_array_equal(out["kernel"], updates["kernel"])
  with pytest.raises(ValueError, match="max_norm needs params"):
    tx.update(updates, tx.init(params))


def test_momentum_forms_differ_from_optax_sgd_only_under_a_schedule():
  """optax.sgd(momentum) is v = mu*v + g; x -= lr_t*v: equal to the classic form at constant lr, not otherwise."""
  x0, h, x_star, noise = _problem()
  classic_const = _run_numpy("momentum", x0, h, x_star, noise, lambda t: LR)
  _assert_close(_run_optax(optax.sgd(LR, momentum=0.9), x0, h, x_star, noise), classic_const)
  classic_sched = _run_numpy("momentum", x0, h, x_star, noise, lr_schedule_np)
  optax_sched = _run_optax(optax.sgd(lr_schedule_jnp, momentum=0.9), x0, h, x_star, noise)
  gap = max(np.max(np.abs(optax_sched[k] - classic_sched[k])) for k in classic_sched)
  assert gap > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# Weight decay.

@pytest.mark.parametrize("mode", optim.WEIGHT_DECAY_MODES)
@pytest.mark.parametrize("name", [n for n in optim.OPTIMIZERS if n != "adamw"])
def test_weight_decay_matches_reference(name, mode):
  x0, h, x_star, noise = _problem(1)
  tx = optim.optimizer(name, lr_schedule_jnp, weight_decay=0.1, weight_decay_mode=mode, **HYPER)
  want = _run_numpy(name, x0, h, x_star, noise, lr_schedule_np, weight_decay=0.1, mode=mode, **HYPER)
  _assert_close(_run_optax(tx, x0, h, x_star, noise), want)
  # ... and the decay is not a no-op: without it the kernel ends elsewhere.
  plain = _run_numpy(name, x0, h, x_star, noise, lr_schedule_np, **HYPER)
  kernel = ("layer0", "linear", "kernel")
  assert np.max(np.abs(plain[kernel][-1] - want[kernel][-1])) > 1e-3


def test_adamw_is_adam_with_decoupled_decay_and_optax_adamw():
  x0, h, x_star, noise = _problem(2)
  want = _run_numpy("adam", x0, h, x_star, noise, lr_schedule_np, weight_decay=0.1, mode="decoupled")
  _assert_close(_run_optax(optim.optimizer("adamw", lr_schedule_jnp, weight_decay=0.1), x0, h, x_star, noise), want)
  reference = optax.adamw(lr_schedule_jnp, weight_decay=0.1, mask=masks.weights_mask)
  _assert_close(_run_optax(reference, x0, h, x_star, noise), want)


def test_l2_mode_equals_penalty_in_the_loss():
  """weight_decay_mode='l2' == adding 0.5 * wd * ||kernels||^2 to the loss, through adam's scaling."""
  x0, h, x_star, noise = _problem(3)
  wd = 0.1
  penalty = lambda x: 0.5 * wd * sum(jnp.sum(w**2) for w in masks.weights(x))
  adam = optim.optimizer("adam", LR)
  def update(grads, state, x):
    return adam.update(jax.tree.map(jnp.add, grads, jax.grad(penalty)(x)), state, x)
  want = _run_optax(optax.GradientTransformation(adam.init, update), x0, h, x_star, noise)
  got = _run_optax(optim.optimizer("adam", LR, weight_decay=wd, weight_decay_mode="l2"), x0, h, x_star, noise)
  _assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_sgd_decay_modes_coincide():
  x0, h, x_star, noise = _problem(4)
  runs = [_run_optax(optim.optimizer("sgd", lr_schedule_jnp, weight_decay=0.1, weight_decay_mode=mode),
                     x0, h, x_star, noise) for mode in optim.WEIGHT_DECAY_MODES]
  _assert_close(runs[0], runs[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, mode", [("sgd", "l2"), ("sgd", "decoupled"), ("momentum", "l2"),
                                        ("momentum", "decoupled"), ("adamw", "decoupled")])
def test_weight_decay_leaves_biases_and_batchnorm_alone(name, mode):
  x = _f32(_tree(np.random.default_rng(5)))
  zero = jax.tree.map(np.zeros_like, x)
  lr, wd = 0.1, 0.2
  tx = optim.optimizer(name, lr, weight_decay=wd, weight_decay_mode=mode)
  updates, _ = tx.update(zero, tx.init(x), x)
  new = traverse_util.flatten_dict(optax.apply_updates(x, updates))
  old = traverse_util.flatten_dict(x)
  for path in old:
    if path[-1] == "kernel":
      # First step, zero gradient, zero state: every case here gives x - lr * wd * x (adam's own step is 0/eps).
      np.testing.assert_allclose(new[path], (1 - lr * wd) * old[path], rtol=1e-6)
    else:
      np.testing.assert_array_equal(new[path], old[path])
  kernel = ("layer0", "linear", "kernel")
  assert np.all(np.abs(new[kernel]) < np.abs(old[kernel]))


# ---------------------------------------------------------------------------------------------------------------
# Clipping.

def _norm10_grads(x):
  """Gradient with global norm 10 spread over two leaves (6 and 8), zero elsewhere."""
  g = jax.tree.map(np.zeros_like, x)
  g["layer0"]["linear"]["kernel"][0, 0] = 6.0
  g["layer0"]["bn_before"]["bn"]["bias"][1] = 8.0
  return g


@pytest.mark.parametrize("clip_norm, factor", [(1.0, 0.1), (2.5, 0.25), (10.0, 1.0), (20.0, 1.0)])
def test_clip_by_global_norm(clip_norm, factor):
  x = _f32(_tree(np.random.default_rng(6)))
  g = _norm10_grads(x)
  tx = optim.optimizer("sgd", 1.0, clip_norm=clip_norm)
  updates, _ = tx.update(g, tx.init(x), x)
  for u, gg in zip(jax.tree.leaves(updates), jax.tree.leaves(g)):
    np.testing.assert_allclose(u, -factor * gg, rtol=1e-6, atol=1e-7)
  assert math.isclose(float(optax.tree.norm(updates)), min(clip_norm, 10.0), rel_tol=1e-6)


def test_clipping_comes_before_l2_term():
  x = _f32(_tree(np.random.default_rng(7)))
  g = _norm10_grads(x)
  lr, wd = 0.5, 0.1
  tx = optim.optimizer("sgd", lr, clip_norm=1.0, weight_decay=wd, weight_decay_mode="l2")
  updates = traverse_util.flatten_dict(tx.update(g, tx.init(x), x)[0])
  for path, gg in traverse_util.flatten_dict(g).items():
    w = traverse_util.flatten_dict(x)[path]
    want = -lr * (gg / 10.0 + (wd * w if path[-1] == "kernel" else 0.0))
    np.testing.assert_allclose(updates[path], want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Schedules.

T = np.arange(60)


def _sgdr_np(t, lr, first, mult, f):
  start, period = 0, first
  while t >= start + period:
    start, period = start + period, period * mult
  return lr * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * (t - start) / period)))


def _warmup_cosine_np(t, lr, w, total, f):
  if t < w:
    return lr * t / w
  tt = min(t - w, total - w)
  return lr * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * tt / (total - w))))


SCHEDULE_CASES = [
    ("constant", {}, lambda t: 0.3),
    ("step", dict(step_size=7, gamma=0.5), lambda t: 0.3 * 0.5**(t // 7)),
    ("step", dict(step_size=10), lambda t: 0.3 * 0.1**(t // 10)),
    ("piecewise", dict(boundaries=[5, 20, 21, 40], gamma=0.3),
     lambda t: 0.3 * 0.3**sum(t >= b for b in (5, 20, 21, 40))),
    ("exponential", dict(steps_per_epoch=5), lambda t: 0.3 * 0.95**(t / 5)),
    ("exponential", dict(steps_per_epoch=5, decay_rate=0.8, staircase=True), lambda t: 0.3 * 0.8**(t // 5)),
    ("inverse_time", dict(steps_per_epoch=4, decay=0.5), lambda t: 0.3 / (1 + 0.5 * t / 4)),
    ("inverse_sqrt", dict(warmup_steps=10), lambda t: 0.3 * t / 10 if t < 10 else 0.3 * math.sqrt(10 / t)),
    ("linear", dict(decay_steps=30), lambda t: (1 - min(t / 30, 1)) * 0.3 + min(t / 30, 1) * 0.01 * 0.3),
    ("linear", dict(total_steps=45, final_fraction=0.2),
     lambda t: (1 - min(t / 45, 1)) * 0.3 + min(t / 45, 1) * 0.2 * 0.3),
    ("warmup_cosine", dict(total_steps=50, warmup_steps=10, final_fraction=0.1),
     lambda t: _warmup_cosine_np(t, 0.3, 10, 50, 0.1)),
    ("warmup_cosine", dict(total_steps=40), lambda t: _warmup_cosine_np(t, 0.3, 0, 40, 0.0)),
    ("sgdr", dict(first_period=8), lambda t: _sgdr_np(t, 0.3, 8, 1, 0.0)),
    ("sgdr", dict(first_period=5, period_mult=2, min_fraction=0.1), lambda t: _sgdr_np(t, 0.3, 5, 2, 0.1)),
    ("sgdr", dict(first_period=3, period_mult=3.0), lambda t: _sgdr_np(t, 0.3, 3, 3, 0.0)),
]


@pytest.fixture(scope="module")
def schedule_values():
  """Every case's values at steps T, from one jitted program over an int32 step array (as optax passes it)."""
  scheds = [optim.schedule(name, 0.3, **params) for name, params, _ in SCHEDULE_CASES]
  return jax.jit(lambda t: [jax.vmap(s)(t) for s in scheds])(jnp.asarray(T, jnp.int32))


@pytest.mark.parametrize("case", range(len(SCHEDULE_CASES)),
                         ids=[f"{n}-{'-'.join(map(str, p.values()))}" for n, p, _ in SCHEDULE_CASES])
def test_schedule_matches_formula(case, schedule_values):
  name, params, formula = SCHEDULE_CASES[case]
  want = np.array([formula(int(t)) for t in T])
  np.testing.assert_allclose(np.asarray(schedule_values[case]), want, rtol=1e-5, atol=1e-7)


def test_every_schedule_has_a_case():
  assert {n for n, _, _ in SCHEDULE_CASES} == set(optim.SCHEDULES)


@pytest.mark.parametrize("first, mult, total, ends", [(10, 2, 70, [10, 30, 70]), (10, 2, 69, [10, 30]),
                                                      (10, 1, 45, [10, 20, 30, 40]), (3, 3, 40, [3, 12, 39])])
def test_sgdr_cycle_ends(first, mult, total, ends):
  assert optim.sgdr_cycle_ends(first, mult, total) == ends
  sched = optim.schedule("sgdr", 0.3, first_period=first, period_mult=mult, min_fraction=0.1)
  for end in ends:  # the step after a cycle ends restarts at the full rate; the last step of it is near the floor
    assert math.isclose(float(sched(end)), 0.3, rel_tol=1e-6)
    assert float(sched(end - 1)) < 0.3 * 0.1 + 0.3 * 0.9 * 0.5 * (1 - math.cos(math.pi / first)) + 1e-6


def test_schedule_drives_optimizer_step_count():
  """The optimiser reads the schedule at t = 0, 1, ...: sgd's t-th update is -schedule(t) * g."""
  sched = optim.schedule("step", 1.0, step_size=2, gamma=0.5)
  tx = optim.optimizer("sgd", sched)
  x = {"w": {"kernel": jnp.ones(3)}}
  state = tx.init(x)
  for t in range(6):
    updates, state = tx.update(x, state, x)
    np.testing.assert_allclose(updates["w"]["kernel"], -(0.5**(t // 2)) * np.ones(3))


# ---------------------------------------------------------------------------------------------------------------
# Bad input.

def test_unknown_optimizer_lists_valid_names():
  with pytest.raises(ValueError, match="unknown optimizer 'adagrad'") as err:
    optim.optimizer("adagrad", 0.1)
  for name in optim.OPTIMIZERS:
    assert name in str(err.value)


def test_unknown_schedule_lists_valid_names():
  with pytest.raises(ValueError, match="unknown schedule 'cyclic'") as err:
    optim.schedule("cyclic", 0.1)
  for name in optim.SCHEDULES:
    assert name in str(err.value)


@pytest.mark.parametrize("kwargs, arg", [
    (dict(learning_rate=-0.1), "learning_rate"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(momentum=1.0), "momentum"),
    (dict(momentum=-0.1), "momentum"),
    (dict(b1=1.0), "b1"),
    (dict(b2=1.5), "b2"),
    (dict(eps=-1e-8), "eps"),
    (dict(decay=1.0), "decay"),
    (dict(weight_decay=-1e-4), "weight_decay"),
    (dict(weight_decay_mode="coupled"), "weight_decay_mode"),
    (dict(clip_norm=0.0), "clip_norm"),
    (dict(max_norm=0.0), "max_norm"),
    (dict(max_norm=-1.0), "max_norm"),
])
def test_bad_optimizer_hyperparameters_name_the_argument(kwargs, arg):
  kwargs = {"learning_rate": 0.1, **kwargs}
  with pytest.raises(ValueError, match=arg):
    optim.optimizer("momentum", **kwargs)


def test_adamw_rejects_l2_mode():
  with pytest.raises(ValueError, match="weight_decay_mode"):
    optim.optimizer("adamw", 0.1, weight_decay=0.1, weight_decay_mode="l2")


@pytest.mark.parametrize("name, lr, kwargs, pattern", [
    ("constant", -0.1, {}, "learning_rate"),
    ("step", 0.1, dict(step_size=5, gama=0.5), r"unknown params \['gama'\].*allowed: step_size, gamma"),
    ("constant", 0.1, dict(gamma=0.5), r"unknown params \['gamma'\].*allowed: none"),
    ("sgdr", 0.1, dict(first_period=5, t_mult=2), r"unknown params \['t_mult'\].*period_mult"),
    ("step", 0.1, {}, r"needs params \['step_size'\]"),
    ("step", 0.1, dict(step_size=0), "step_size"),
    ("step", 0.1, dict(step_size=2.5), "step_size"),
    ("step", 0.1, dict(step_size=5, gamma=0.0), "gamma"),
    ("piecewise", 0.1, dict(boundaries=[10, 5]), "boundaries"),
    ("exponential", 0.1, dict(decay_rate=1.5), "decay_rate"),
    ("exponential", 0.1, dict(steps_per_epoch=0), "steps_per_epoch"),
    ("inverse_time", 0.1, dict(decay=-1.0), "decay"),
    ("inverse_sqrt", 0.1, dict(warmup_steps=0), "warmup_steps"),
    ("linear", 0.1, {}, "decay_steps"),
    ("linear", 0.1, dict(decay_steps=10, final_fraction=1.5), "final_fraction"),
    ("warmup_cosine", 0.1, dict(warmup_steps=5), "total_steps"),
    ("warmup_cosine", 0.1, dict(warmup_steps=50, total_steps=50), "warmup_steps"),
    ("sgdr", 0.1, dict(first_period=5, period_mult=1.5), "period_mult"),
    ("sgdr", 0.1, dict(first_period=5, period_mult=0.5), "period_mult"),
    ("sgdr", 0.1, dict(first_period=5, min_fraction=-0.1), "min_fraction"),
])
def test_bad_schedule_arguments_name_the_argument(name, lr, kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    optim.schedule(name, lr, **kwargs)


def test_bad_sgdr_cycle_ends_arguments():
  with pytest.raises(ValueError, match="first_period"):
    optim.sgdr_cycle_ends(0, 2, 100)
  with pytest.raises(ValueError, match="period_mult"):
    optim.sgdr_cycle_ends(10, 1.5, 100)
