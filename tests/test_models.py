"""Models: output shapes, parameter counts, numpy float64 forward passes, recorded pre/post activations, the
registry and init_variables. Structure is checked with jax.eval_shape (no compilation), numbers on small inputs."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dlcore import activations, models

KEY = jax.random.key(0)
INPUTS = {"mlp": (2, 28, 28, 1), "lenet5": (2, 28, 28, 1), "lenet5_32": (2, 32, 32, 1),
          "cifar_convnet": (2, 32, 32, 3), "resnet8": (2, 32, 32, 3)}


def _model(case, **kwargs):
  return models.get("lenet5" if case == "lenet5_32" else case, **kwargs)


def _abstract_variables(model, shape):
  return jax.eval_shape(lambda: models.init_variables(model, KEY, jnp.zeros(shape)))


def _sizes(tree):
  return {"/".join(k): math.prod(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.mark.parametrize("num_classes", [10, 7])
@pytest.mark.parametrize("case", sorted(INPUTS))
def test_output_shapes(case, num_classes):
  model = _model(case, num_classes=num_classes)
  shape = INPUTS[case]
  variables = _abstract_variables(model, shape)
  batch = jax.ShapeDtypeStruct((5, *shape[1:]), jnp.float32)  # the batch size is not baked into the params
  for train in (False, True):
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=train, rngs={"dropout": KEY},
                                                  mutable=["batch_stats"] if train else False), variables, batch)
    logits = out[0] if train else out
    assert logits.shape == (5, num_classes) and logits.dtype == jnp.float32


def test_lenet5_parameter_count():
  # LeCun et al. 1998 with a dense C5 and 10 outputs, counted by hand (weights + biases):
  #   conv1 5*5*1*6 + 6     =    156
  #   conv2 5*5*6*16 + 16   =  2,416
  #   fc1   (5*5*16)*120 + 120 = 48,120
  #   fc2   120*84 + 84     = 10,164
  #   out   84*10 + 10      =    850     total 61,706
  for shape in ((1, 28, 28, 1), (1, 32, 32, 1)):  # 28x28 is zero-padded to 32x32, so the count is the same
    variables = _abstract_variables(models.get("lenet5"), shape)
    sizes = _sizes(variables["params"])
    assert sum(sizes.values()) == 61_706
    assert sizes == {"conv1/linear/kernel": 150, "conv1/linear/bias": 6, "conv2/linear/kernel": 2400,
                     "conv2/linear/bias": 16, "fc1/linear/kernel": 48000, "fc1/linear/bias": 120,
                     "fc2/linear/kernel": 10080, "fc2/linear/bias": 84, "classifier/linear/kernel": 840,
                     "classifier/linear/bias": 10}
    assert variables["batch_stats"] == {}


def test_cifar_convnet_parameter_count():
  # conv5x5x32 (3 in) + conv5x5x32 + conv5x5x64, then 32->16->8->4 spatially, 4*4*64 -> 10
  expected = (5 * 5 * 3 * 32 + 32) + (5 * 5 * 32 * 32 + 32) + (5 * 5 * 32 * 64 + 64) + (4 * 4 * 64 * 10 + 10)
  variables = _abstract_variables(models.get("cifar_convnet"), INPUTS["cifar_convnet"])
  assert sum(_sizes(variables["params"]).values()) == expected == 89_578


@pytest.mark.parametrize("name,n", [("resnet8", 1), ("resnet20", 3), ("resnet32", 5)])
def test_resnet_depth_is_6n_plus_2(name, n):
  model = models.get(name)
  assert model.blocks_per_stage == n
  variables = _abstract_variables(model, (1, 32, 32, 3))
  kernels = {k: v.shape for k, v in traverse_util.flatten_dict(variables["params"]).items() if k[-1] == "kernel"}
  n3x3 = sum(1 for s in kernels.values() if s[:2] == (3, 3))
  n1x1 = sum(1 for s in kernels.values() if s[:2] == (1, 1))
  dense = sum(1 for s in kernels.values() if len(s) == 2)
  assert (n3x3, n1x1, dense) == (6 * n + 1, 2, 1)  # 6n+1 convs + the classifier = 6n+2 layers, 2 projections
  assert n3x3 + dense == 6 * n + 2
  # conv-BN units have no conv bias; every BN has running mean and var
  assert not any(k[-1] == "bias" and k[-2] == "linear" and k[0] != "classifier"
                 for k in traverse_util.flatten_dict(variables["params"]))
  stats = traverse_util.flatten_dict(variables["batch_stats"])
  assert len(stats) == 2 * (6 * n + 1 + 2)


def _np_mlp(params, x, act):
  h = x.reshape(x.shape[0], -1).astype(np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  i = 0
  while f"layer{i}" in p:
    h = act(h @ p[f"layer{i}"]["linear"]["kernel"] + p[f"layer{i}"]["linear"]["bias"])
    i += 1
  return h @ p["classifier"]["linear"]["kernel"] + p["classifier"]["linear"]["bias"]


def _randomise(params, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (rng.normal(size=a.shape) / math.sqrt(a.shape[0])).astype(np.float32), params)


NP_ACT = {"relu": lambda z: np.maximum(z, 0.0), "tanh": np.tanh}


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_mlp_forward_matches_numpy_float64(activation):
  x = np.random.default_rng(1).normal(size=(5, 4, 3)).astype(np.float32)  # flattened to 12 features
  # keep_prob < 1 must not matter at test time (inverted dropout)
  model = models.MLP(hidden=(16, 8), num_classes=3, activation=activation, initializer="zeros", keep_prob=0.5)
  variables = models.init_variables(model, KEY, x)
  params = _randomise(variables["params"])
  assert set(params) == {"layer0", "layer1", "classifier"}
  out = model.apply({"params": params, "batch_stats": {}}, x, train=False)
  expected = _np_mlp(params, x, NP_ACT[activation])
  assert out.shape == (5, 3)
  np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["inverted", "original"])
def test_mlp_input_dropout_keeps_pixels_with_input_keep_prob(mode):
  # No hidden layer and no classifier: the output is the dropped-out flattened input itself.
  x = np.random.default_rng(5).uniform(0.5, 1.0, size=(50, 20, 20)).astype(np.float64)
  model = models.MLP(hidden=(), num_classes=0, input_keep_prob=0.8, dropout_mode=mode)
  train_out = np.asarray(model.apply({}, x.astype(np.float32), train=True, rngs={"dropout": KEY}), np.float64)
  flat = x.reshape(50, -1)
  kept = train_out != 0.0
  scale = 1 / 0.8 if mode == "inverted" else 1.0  # kept pixels: x / p (inverted) or x (original)
  np.testing.assert_allclose(train_out[kept], flat[kept] * scale, rtol=1e-6)
  n = kept.size  # 20000 Bernoulli(0.8) draws: the kept fraction within 5 binomial standard deviations
  assert abs(kept.mean() - 0.8) < 5 * math.sqrt(0.8 * 0.2 / n)
  test_out = np.asarray(model.apply({}, x.astype(np.float32), train=False), np.float64)
  np.testing.assert_allclose(test_out, flat * (1.0 if mode == "inverted" else 0.8), rtol=1e-6)


def test_mlp_input_dropout_leaves_hidden_dropout_masks_alone():
  # The input layer has its own name ('input_dropout'): the hidden layer draws the same mask with or without it
  # (the zeros of the output are the hidden mask's; the dropped-out input leaves no unit at exactly 0).
  x = np.random.default_rng(6).normal(size=(8, 12)).astype(np.float32)
  plain = models.MLP(hidden=(32,), num_classes=0, keep_prob=0.5, activation="identity")
  variables = models.init_variables(plain, KEY, x)
  with_input = models.MLP(hidden=(32,), num_classes=0, keep_prob=0.5, activation="identity", input_keep_prob=0.8)
  a = np.asarray(plain.apply(variables, x, train=True, rngs={"dropout": KEY}))
  b = np.asarray(with_input.apply(variables, x, train=True, rngs={"dropout": KEY}))
  assert not np.array_equal(a, b)  # the input was dropped
  np.testing.assert_array_equal(a == 0.0, b == 0.0)
  with pytest.raises(ValueError, match="input_keep_prob"):
    models.MLP(input_keep_prob=0.0)


def test_mlp_without_classifier_is_the_hidden_stack():
  x = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
  model = models.MLP(hidden=(5, 4), num_classes=0, activation="tanh", initializer="zeros")
  params = _randomise(models.init_variables(model, KEY, x)["params"])
  assert set(params) == {"layer0", "layer1"}
  out = np.asarray(model.apply({"params": params}, x), np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = np.tanh(x @ p["layer0"]["linear"]["kernel"] + p["layer0"]["linear"]["bias"])
  np.testing.assert_allclose(out, np.tanh(h @ p["layer1"]["linear"]["kernel"] + p["layer1"]["linear"]["bias"]),
                             rtol=1e-5, atol=1e-6)


def _conv_valid(x, w, b):
  kh, kw = w.shape[:2]
  oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out = sum(x[:, i:i + oh, j:j + ow, :] @ w[i, j] for i in range(kh) for j in range(kw))
  return out + b


def _avg_pool2(x):
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def test_lenet5_forward_matches_numpy_float64():
  x = np.random.default_rng(3).normal(size=(2, 28, 28, 1)).astype(np.float32)
  model = models.get("lenet5", activation="tanh", initializer="zeros")
  params = _randomise(models.init_variables(model, KEY, x)["params"])
  out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  lin = lambda name: (p[name]["linear"]["kernel"], p[name]["linear"]["bias"])
  h = np.pad(x.astype(np.float64), ((0, 0), (2, 2), (2, 2), (0, 0)))  # 28x28 -> 32x32
  h = _avg_pool2(np.tanh(_conv_valid(h, *lin("conv1"))))             # 28x28x6 -> 14x14x6
  h = _avg_pool2(np.tanh(_conv_valid(h, *lin("conv2"))))             # 10x10x16 -> 5x5x16
  h = h.reshape(2, -1)
  h = np.tanh(h @ lin("fc1")[0] + lin("fc1")[1])
  h = np.tanh(h @ lin("fc2")[0] + lin("fc2")[1])
  expected = h @ lin("classifier")[0] + lin("classifier")[1]
  np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=1e-5, atol=1e-5)


def _units(*names):
  """[(path..., 'pre'), (path..., 'post')] for each unit, in the given order."""
  return [k for n in names for k in ((*n.split("/"), "pre"), (*n.split("/"), "post"))]


EXPECTED_RECORDS = {
    "mlp": _units(*[f"layer{i}" for i in range(11)], "classifier"),  # 11: 'layer10' comes after 'layer9'
    "lenet5": _units("conv1", "conv2", "fc1", "fc2", "classifier"),
    "lenet5_32": _units("conv1", "conv2", "fc1", "fc2", "classifier"),
    "cifar_convnet": _units("conv1", "conv2", "conv3", "classifier"),
    "resnet8": _units("stem", "stage0_block0/conv1", "stage0_block0/conv2", "stage0_block0",
                      "stage1_block0/conv1", "stage1_block0/conv2", "stage1_block0/shortcut", "stage1_block0",
                      "stage2_block0/conv1", "stage2_block0/conv2", "stage2_block0/shortcut", "stage2_block0",
                      "classifier"),
}


@pytest.mark.parametrize("case", sorted(INPUTS))
def test_every_layer_records_pre_and_post_in_call_order(case):
  model = _model(case, hidden=(8,) * 11) if case == "mlp" else _model(case)
  shape = INPUTS[case]
  variables = _abstract_variables(model, shape)
  records = []

  def forward(v, x):
    y, state = model.apply(v, x, mutable=["intermediates"])
    # the order of the collection as model.apply returns it (jit/eval_shape outputs would sort the keys)
    records.extend((k, leaf[0].shape) for k, leaf in traverse_util.flatten_dict(state["intermediates"]).items())
    return y

  jax.eval_shape(forward, variables, jax.ShapeDtypeStruct(shape, jnp.float32))
  assert [k for k, _ in records] == EXPECTED_RECORDS[case]
  shapes = dict(records)
  for k, s in shapes.items():
    assert s == shapes[(*k[:-1], "pre")]  # post has the shape of pre
  assert shapes[("classifier", "pre")] == (shape[0], 10)


def test_recorded_post_is_activation_of_pre():
  x = np.random.default_rng(4).normal(size=(2, 28, 28, 1)).astype(np.float32)
  model = models.get("lenet5", activation="elu", initializer="zeros")
  variables = {"params": _randomise(models.init_variables(model, KEY, x)["params"], seed=5)}
  plain, (out, state) = jax.jit(lambda v: (model.apply(v, x), model.apply(v, x, mutable=["intermediates"])))(
      variables)
  assert np.array_equal(np.asarray(plain), np.asarray(out))  # recording changes nothing
  flat = traverse_util.flatten_dict(state["intermediates"])
  elu = activations.get("elu")
  for name in ("conv1", "conv2", "fc1", "fc2"):
    pre, post = np.asarray(flat[(name, "pre")][0]), np.asarray(flat[(name, "post")][0])
    np.testing.assert_array_equal(post, np.asarray(elu(pre)))
    assert (pre < 0).any() and (pre > 0).any()
  # the classifier's post is the output
  np.testing.assert_array_equal(np.asarray(flat[("classifier", "post")][0]), np.asarray(out))


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError) as err:
    models.get("nope")
  assert "unknown model 'nope'" in str(err.value)
  for name in models.NAMES:
    assert name in str(err.value)
  assert set(models.NAMES) >= {"mlp", "lenet5", "cifar_convnet", "resnet8", "resnet20", "resnet32"}


@pytest.mark.parametrize("case,kwargs,has_stats", [
    ("mlp", {}, False),
    ("mlp", {"batchnorm": "before"}, True),
    ("mlp", {"batchnorm": "after", "keep_prob": 0.5}, True),
    ("lenet5", {}, False),
    ("lenet5", {"batchnorm": "before"}, True),
    ("cifar_convnet", {"keep_prob": 0.5}, False),
    ("resnet8", {}, True),
])
def test_init_variables_keeps_params_and_batch_stats_only(case, kwargs, has_stats):
  model = _model(case, **kwargs)
  shape = INPUTS[case]
  variables = _abstract_variables(model, shape)
  assert set(variables) == {"params", "batch_stats"}
  stats = traverse_util.flatten_dict(variables["batch_stats"])
  if not has_stats:
    assert variables["batch_stats"] == {}
  else:
    assert stats and {k[-1] for k in stats} == {"mean", "var"}
    # one (mean, var) pair per BatchNorm, each matching a (scale, bias) pair in params
    bn_params = {k[:-1] for k in traverse_util.flatten_dict(variables["params"]) if k[-1] == "scale"}
    assert {k[:-1] for k in stats} == bn_params
  # the design's train call: batch_stats mutable, the same tree comes back
  _, updates = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, rngs={"dropout": KEY}, mutable=["batch_stats"]),
      variables, jax.ShapeDtypeStruct(shape, jnp.float32))
  assert jax.tree.structure(updates.get("batch_stats", {})) == jax.tree.structure(variables["batch_stats"])


def test_init_variables_is_deterministic_and_values_are_from_the_key():
  x = jnp.zeros((1, 6))
  model = models.MLP(hidden=(4,), num_classes=2, initializer="normal", init_scale=1.0)
  init = jax.jit(functools.partial(models.init_variables, model))
  a, b, c = init(KEY, x), init(KEY, x), init(jax.random.key(1), x)
  for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.array_equal(np.asarray(la), np.asarray(lb))
  assert not np.array_equal(np.asarray(a["params"]["layer0"]["linear"]["kernel"]),
                            np.asarray(c["params"]["layer0"]["linear"]["kernel"]))
  assert np.all(np.asarray(a["params"]["layer0"]["linear"]["bias"]) == 0.0)


def test_bad_model_hyperparameters_name_the_argument():
  x = jax.ShapeDtypeStruct((1, 6), jnp.float32)
  with pytest.raises(ValueError, match=r"hidden\[1\] \(width\) must be > 0"):
    jax.eval_shape(lambda x: models.init_variables(models.MLP(hidden=(4, 0)), KEY, x), x)
  with pytest.raises(ValueError, match="blocks_per_stage must be > 0"):
    jax.eval_shape(lambda x: models.init_variables(models.get("resnet", blocks_per_stage=0), KEY, x),
                   jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
  with pytest.raises(ValueError, match="keep_prob"):
    jax.eval_shape(lambda x: models.init_variables(models.MLP(keep_prob=0.0), KEY, x), x)


MIXED_CASES = {"mlp": {}, "mlp_bn": {"batchnorm": "before"}, "lenet5": {}, "cifar_convnet": {},
               "resnet8": {}}


@pytest.mark.parametrize("case", sorted(MIXED_CASES))
def test_bfloat16_compute_keeps_float32_params_statistics_and_logits(case):
  name = "mlp" if case == "mlp_bn" else case
  x = jnp.asarray(np.random.default_rng(6).normal(size=(8, *INPUTS[name][1:])), jnp.float32)
  full, mixed = (models.get(name, dtype=d, **MIXED_CASES[case]) for d in (None, models.compute_dtype("bfloat16")))
  variables = models.init_variables(full, KEY, x)
  mixed_variables = models.init_variables(mixed, KEY, x)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, variables, mixed_variables)))  # same initial params
  assert {a.dtype for a in jax.tree.leaves(mixed_variables)} == {jnp.dtype(jnp.float32)}

  def run(model):
    return jax.jit(lambda v: model.apply(v, x, train=True, rngs={"dropout": KEY},
                                         mutable=["batch_stats", "intermediates"]))(variables)
  (ref, ref_state), (out, state) = run(full), run(mixed)
  assert out.dtype == jnp.float32
  pre = [leaf[0] for k, leaf in traverse_util.flatten_dict(state["intermediates"]).items() if k[-1] == "pre"]
  assert pre and all(p.dtype == jnp.bfloat16 for p in pre)  # the layers really compute in bfloat16
  err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert 0 < err < 0.05, err  # bf16 has an 8-bit significand: ~0.4% per rounding, a few % after the net
  for a, b in zip(jax.tree.leaves(state["batch_stats"]), jax.tree.leaves(ref_state["batch_stats"])):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0.05, atol=0.02)


def test_unknown_compute_dtype_lists_valid_names():
  with pytest.raises(ValueError, match="unknown dtype 'float16'; valid names: bfloat16, float32"):
    models.compute_dtype("float16")
