"""Initialisers against their closed forms: std/mean of large draws, exact values, orthogonality, LSUV."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dlcore import initializers, layers, models

DENSE = (256, 512)  # (fan_in, fan_out)
CONV = (5, 5, 16, 64)  # (kh, kw, c_in, c_out): fan_in = 5*5*16 = 400, fan_out = 5*5*64 = 1600
SHAPES = {"dense": DENSE, "conv": CONV}
GAIN = 2.5


def fans(shape):
  receptive = math.prod(shape[:-2])
  return receptive * shape[-2], receptive * shape[-1]


def draw(name, shape, scale=None, seed=0):
  return np.asarray(initializers.get(name, scale)(jax.random.key(seed), shape), dtype=np.float64)


# name -> (default scale, std(fan_in, fan_out, scale), half-width of the support or None when unbounded),
# written from the papers (LeCun 1998, Glorot & Bengio 2010, He et al. 2015), not from the module.
_LECUN = lambda fi, fo, s: s * math.sqrt(1.0 / fi)
_GLOROT = lambda fi, fo, s: s * math.sqrt(2.0 / (fi + fo))
_HE = lambda fi, fo, s: s * math.sqrt(2.0 / fi)
STD_FORMULAS = {
    "normal": (0.01, lambda fi, fo, s: s, None),
    "uniform": (0.05, lambda fi, fo, s: s / math.sqrt(3.0), lambda fi, fo, s: s),
    "lecun_normal": (1.0, _LECUN, None),
    "lecun_uniform": (1.0, _LECUN, lambda fi, fo, s: s * math.sqrt(3.0 / fi)),
    "glorot_normal": (1.0, _GLOROT, None),
    "glorot_uniform": (1.0, _GLOROT, lambda fi, fo, s: s * math.sqrt(6.0 / (fi + fo))),
    "xavier_normal": (1.0, _GLOROT, None),
    "xavier_uniform": (1.0, _GLOROT, lambda fi, fo, s: s * math.sqrt(6.0 / (fi + fo))),
    "he_normal": (1.0, _HE, None),
    "he_uniform": (1.0, _HE, lambda fi, fo, s: s * math.sqrt(6.0 / fi)),
    "kaiming_normal": (1.0, _HE, None),
    "kaiming_uniform": (1.0, _HE, lambda fi, fo, s: s * math.sqrt(6.0 / fi)),
    # orthogonal (fan_in, c_out) matrix: std from its shape (below); no entry exceeds the gain
    "orthogonal": (1.0, None, lambda fi, fo, s: s),
    "lsuv": (1.0, None, lambda fi, fo, s: s),
}
EXACT = {"zeros", "constant", "identity"}  # tested value by value below


def test_every_registry_name_is_covered():
  assert set(initializers.NAMES) == set(STD_FORMULAS) | EXACT


@pytest.mark.parametrize("shape_kind", sorted(SHAPES))
@pytest.mark.parametrize("gain", [None, GAIN], ids=["default", "gain"])
@pytest.mark.parametrize("name", sorted(STD_FORMULAS))
def test_std_and_mean_match_formula(name, gain, shape_kind):
  shape = SHAPES[shape_kind]
  fan_in, fan_out = fans(shape)
  default, std_fn, bound_fn = STD_FORMULAS[name]
  s = default if gain is None else gain
  w = draw(name, shape, gain)
  assert w.shape == shape
  if std_fn is None:
    # min(r, c) orthonormal rows/columns of an (r, c) matrix: mean square min(r, c) / (r c) = 1 / max(r, c)
    rows, cols = math.prod(shape[:-1]), shape[-1]
    expected_std = s / math.sqrt(max(rows, cols))
  else:
    expected_std = std_fn(fan_in, fan_out, s)
  n = w.size
  # relative standard error of a sample std ~ 1 / sqrt(2n) = 0.3-0.45% here: 3% is ~7 standard errors
  np.testing.assert_allclose(w.std(), expected_std, rtol=0.03)
  assert abs(w.mean()) < 6 * expected_std / math.sqrt(n)
  if bound_fn is not None:
    bound = bound_fn(fan_in, fan_out, s)
    assert np.abs(w).max() <= bound * (1 + 1e-6)
    if name not in ("orthogonal", "lsuv"):
      # uniform on [-a, a]: std a/sqrt(3) and the draw reaches close to both ends
      np.testing.assert_allclose(w.std(), bound / math.sqrt(3.0), rtol=0.03)
      assert w.max() > 0.99 * bound and w.min() < -0.99 * bound
  else:
    # a normal draw of this size has samples beyond 3 std
    assert np.abs(w).max() > 3 * expected_std


def test_normal_default_is_lectures_001_randn():
  w = draw("normal", DENSE)
  np.testing.assert_allclose(w.std(), 0.01, rtol=0.02)
  # exactly 0.01 * a standard-normal draw of the same key
  z = np.asarray(jax.random.normal(jax.random.key(0), DENSE), np.float64)
  np.testing.assert_allclose(w, 0.01 * z, rtol=1e-6, atol=0)


@pytest.mark.parametrize("alias,target", [("xavier_normal", "glorot_normal"), ("xavier_uniform", "glorot_uniform"),
                                          ("kaiming_normal", "he_normal"), ("kaiming_uniform", "he_uniform")])
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("shape_kind", sorted(SHAPES))
def test_aliases_are_bit_identical(alias, target, scale, shape_kind):
  shape = SHAPES[shape_kind]
  a = initializers.get(alias, scale)(jax.random.key(3), shape)
  b = initializers.get(target, scale)(jax.random.key(3), shape)
  assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["lecun_normal", "glorot_uniform", "he_normal", "he_uniform", "orthogonal"])
def test_scale_is_a_gain_on_the_same_draw(name):
  w1 = draw(name, CONV)
  w3 = draw(name, CONV, 3.0)
  np.testing.assert_allclose(w3, 3.0 * w1, rtol=1e-5, atol=1e-7)


def test_names_are_case_insensitive():
  a = initializers.get("He_Normal")(jax.random.key(0), DENSE)
  b = initializers.get("he_normal")(jax.random.key(0), DENSE)
  assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("shape_kind", sorted(SHAPES))
def test_zeros_and_constant_are_exact(shape_kind):
  shape = SHAPES[shape_kind]
  assert np.array_equal(draw("zeros", shape), np.zeros(shape))
  assert np.array_equal(draw("zeros", shape, 5.0), np.zeros(shape))  # scale does not apply to zeros
  assert np.array_equal(draw("constant", shape), np.zeros(shape))
  c = initializers.get("constant", 0.7)(jax.random.key(0), shape)
  assert c.dtype == jnp.float32
  assert np.array_equal(np.asarray(c), np.full(shape, np.float32(0.7)))


@pytest.mark.parametrize("shape", [(16, 16), (32, 8), DENSE, CONV, (1, 1, 8, 16)],
                         ids=["square", "tall", "wide", "conv_tall", "conv_wide"])
@pytest.mark.parametrize("name", ["orthogonal", "lsuv"])
@pytest.mark.parametrize("gain", [1.0, 1.7])
def test_orthogonal_has_orthonormal_rows_or_columns(shape, name, gain):
  w = draw(name, shape, gain).reshape(-1, shape[-1])  # (fan_in, c_out)
  rows, cols = w.shape
  gram = w.T @ w if rows >= cols else w @ w.T
  np.testing.assert_allclose(gram, gain**2 * np.eye(min(rows, cols)), atol=2e-5)


def test_orthogonal_draws_differ_by_key():
  a, b = draw("orthogonal", (16, 16), seed=0), draw("orthogonal", (16, 16), seed=1)
  assert not np.allclose(a, b)


@pytest.mark.parametrize("shape", [(5, 5), (4, 6), (6, 4)])
def test_identity_dense_is_eye(shape):
  assert np.array_equal(draw("identity", shape), np.eye(*shape))
  assert np.array_equal(draw("identity", shape, 0.5), 0.5 * np.eye(*shape))


@pytest.mark.parametrize("kernel", [(3, 3), (1, 1), (3, 5)])
def test_identity_conv_is_centred_delta(kernel):
  shape = (*kernel, 4, 4)
  w = draw("identity", shape)
  expected = np.zeros(shape)
  expected[kernel[0] // 2, kernel[1] // 2] = np.eye(4)
  assert np.array_equal(w, expected)


@pytest.mark.parametrize("kernel", [(3, 3), (5, 3)])
def test_identity_same_conv_is_identity_map(kernel):
  x = np.random.default_rng(1).normal(size=(2, 7, 6, 4)).astype(np.float32)
  unit = layers.Conv(features=4, kernel_size=kernel, padding="SAME", initializer="identity", use_bias=False)
  y = jax.jit(lambda x: unit.apply(unit.init(jax.random.key(0), x), x))(x)
  np.testing.assert_array_equal(np.asarray(y), x)


def test_identity_conv_more_outputs_copies_inputs_then_zeros():
  x = np.random.default_rng(1).normal(size=(2, 6, 6, 3)).astype(np.float32)
  conv = nn.Conv(5, (3, 3), padding="SAME", use_bias=False, kernel_init=initializers.get("identity"))
  y = np.asarray(jax.jit(lambda x: conv.apply(conv.init(jax.random.key(0), x), x))(x))
  np.testing.assert_array_equal(y[..., :3], x)
  np.testing.assert_array_equal(y[..., 3:], 0.0)


def _pre_variances(apply, variables, x):
  _, state = apply(variables, x)
  flat = traverse_util.flatten_dict(state["intermediates"])
  return {"/".join(path[:-1]): float(np.var(np.asarray(v[0], np.float64)))
          for path, v in flat.items() if path[-1] == "pre"}


@pytest.mark.parametrize("activation,use_bias", [("relu", True), ("tanh", False)])
def test_lsuv_mlp_unit_variance_at_every_layer(activation, use_bias):
  # off-scale, off-centre inputs so that plain orthogonal init is far from unit variance
  x = (3.0 * np.random.default_rng(1).normal(size=(256, 32)) + 0.5).astype(np.float32)
  # 11 layers, so that 'layer10' sorts before 'layer2': LSUV must go in call order, not name order
  model = models.MLP(hidden=(32,) * 11, num_classes=10, activation=activation, initializer="lsuv",
                     use_bias=use_bias)
  apply = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))
  before = _pre_variances(apply, models.init_variables(model, jax.random.key(0), x[:2]), x)
  assert max(abs(v - 1.0) for v in before.values()) > 0.5
  variables = models.init_variables(model, jax.random.key(0), x[:2], lsuv_batch=x)
  variances = _pre_variances(apply, variables, x)
  assert set(variances) == {f"layer{i}" for i in range(11)} | {"classifier"}
  for name, var in variances.items():
    assert abs(var - 1.0) < 0.01, (name, var)
  # LSUV only rescales: every kernel is still orthogonal up to a positive factor
  for path, leaf in traverse_util.flatten_dict(variables["params"]).items():
    if path[-1] == "kernel":
      w = np.asarray(leaf, np.float64)
      gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
      c = gram[0, 0]
      np.testing.assert_allclose(gram, c * np.eye(len(gram)), atol=1e-4 * c)
    else:
      assert np.all(np.asarray(leaf) == 0.0)  # biases untouched (zero at init)


def test_lsuv_convnet_unit_variance_at_every_layer():
  x = np.random.default_rng(1).uniform(0.0, 2.0, size=(32, 32, 32, 3)).astype(np.float32)
  model = models.get("cifar_convnet", initializer="lsuv")
  layers_ = ["conv1", "conv2", "conv3"]
  # init_variables(..., lsuv_batch=x) is init_variables then lsuv_rescale; the init is jitted here for speed
  variables = jax.jit(lambda k: models.init_variables(model, k, x[:2]))(jax.random.key(0))
  apply = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))
  assert max(abs(v - 1.0) for v in _pre_variances(apply, variables, x).values()) > 0.5
  variables = initializers.lsuv_rescale(model.apply, variables, x, train=False)
  variances = _pre_variances(apply, variables, x)
  assert set(variances) == set(layers_) | {"classifier"}
  for layer, var in variances.items():
    assert abs(var - 1.0) < 0.01, (layer, var)


def test_lsuv_needs_the_batch_and_the_name():
  x = np.random.default_rng(1).normal(size=(64, 32)).astype(np.float32)
  ortho = models.MLP(hidden=(32,), initializer="orthogonal")
  lsuv = models.MLP(hidden=(32,), initializer="lsuv")
  v_ortho = models.init_variables(ortho, jax.random.key(0), x[:2], lsuv_batch=x)
  v_plain = models.init_variables(lsuv, jax.random.key(0), x[:2])
  # without lsuv_batch, or with a data-independent name, the kernels are the plain orthogonal draw
  for a, b in zip(jax.tree.leaves(v_ortho), jax.tree.leaves(v_plain)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert initializers.is_data_dependent("lsuv") and initializers.is_data_dependent("LSUV")
  assert not any(initializers.is_data_dependent(n) for n in initializers.NAMES if n != "lsuv")


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError) as err:
    initializers.get("glorot_gaussian")
  message = str(err.value)
  assert "glorot_gaussian" in message
  for name in initializers.NAMES:
    assert name in message
  with pytest.raises(ValueError, match="valid names"):
    initializers.is_data_dependent("nope")


@pytest.mark.parametrize("name,arg", [("normal", "std"), ("uniform", "uniform")])
def test_negative_scale_names_the_argument(name, arg):
  with pytest.raises(ValueError, match=rf"init_scale.*{arg}.*-0\.1"):
    initializers.get(name, -0.1)


def test_kernel_needs_two_axes():
  with pytest.raises(ValueError, match="at least 2 axes"):
    initializers.get("he_normal")(jax.random.key(0), (10,))


def test_lsuv_rejects_bad_tol():
  with pytest.raises(ValueError, match="tol must be > 0"):
    initializers.lsuv_rescale(None, {}, None, tol=0.0)
