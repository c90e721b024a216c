"""dlcore.ops.conv: oneDNN convolutions against float64 numpy convolutions, under jit, grad and vmap; the
dispatch in layers.Conv; the fallback to XLA when the extension is missing.

The extension is expected wherever its dependencies are pinned (x86_64 Linux) and always under CI: there a
missing extension FAILS the oneDNN tests (naming why it did not load) instead of skipping them.

Error bounds: a sum of K float32 products has error at most about K * eps32 * sum(|terms|) (recursive summation;
blocked and parallel sums do better), so each result is checked elementwise against 2 K eps32 times the same
convolution of the absolute values, computed in float64.
"""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
import pytest

from dlcore import layers, models, optim, parallel, state as state_lib, train
from dlcore.ops import conv

EXPECTED = bool(os.environ.get("CI")) or (sys.platform == "linux" and platform.machine() == "x86_64")
EPS32 = float(np.finfo(np.float32).eps)
DN = ("NHWC", "HWIO", "NHWC")


@pytest.fixture
def onednn(monkeypatch):
  """DLCORE_CPU_CONV=onednn, with the extension loaded: a failure where it is expected, else a skip."""
  if not conv.onednn_available():
    if EXPECTED:
      pytest.fail(f"the oneDNN extension should be built here (pip install -e .): {conv.onednn_status()}")
    pytest.skip(conv.onednn_status())
  monkeypatch.setenv(conv.ENV_VAR, "onednn")


# ------------------------------------------------------------------------------ float64 numpy references


def _windows(x, kh, kw, s, pads, out_hw):
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  return sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::s, ::s][:, :out_hw[0], :out_hw[1]]


def _np_forward(x, w, s, pads, g):
  kh, kw, i, o = w.shape
  out_hw = [(x.shape[1 + a] + sum(pads[a]) - w.shape[a]) // s + 1 for a in (0, 1)]
  win, og = _windows(x, kh, kw, s, pads, out_hw), o // g
  return np.concatenate([np.einsum("nhwcab,abco->nhwo", win[:, :, :, k * i:(k + 1) * i],
                                   w[..., k * og:(k + 1) * og]) for k in range(g)], -1)


def _np_backward_weights(x, dy, s, pads, g, kernel_hw):
  kh, kw = kernel_hw
  win, i, og = _windows(x, kh, kw, s, pads, dy.shape[1:3]), x.shape[-1] // g, dy.shape[-1] // g
  return np.concatenate([np.einsum("nhwcab,nhwo->abco", win[:, :, :, k * i:(k + 1) * i],
                                   dy[..., k * og:(k + 1) * og]) for k in range(g)], -1)


def _np_backward_data(dy, w, s, pads, g, image_hw):
  (pt, pb), (pl, pr) = pads
  kh, kw, i, o = w.shape
  n, oh, ow, _ = dy.shape
  dxp, og = np.zeros((n, image_hw[0] + pt + pb, image_hw[1] + pl + pr, i * g)), o // g
  for a in range(kh):
    for b in range(kw):
      for k in range(g):
        dxp[:, a:a + s * (oh - 1) + 1:s, b:b + s * (ow - 1) + 1:s, k * i:(k + 1) * i] += np.einsum(
            "nhwo,co->nhwc", dy[..., k * og:(k + 1) * og], w[a, b, :, k * og:(k + 1) * og])
  return dxp[:, pt:pt + image_hw[0], pl:pl + image_hw[1]]


def _check(got, exact, magnitude, terms):
  err = np.abs(np.asarray(got, np.float64) - exact)
  bound = 2 * terms * EPS32 * magnitude + 1e-30
  assert got.shape == exact.shape and np.all(err <= bound), (
      f"max error {err.max():.3g}, worst error/bound {np.max(err / bound):.3g}")


def _pads(shape, kernel, s, padding):
  return tuple(lax.padtype_to_pads(shape[1:3], kernel[:2], (s, s), padding))


# Every convolution of lenet5, cifar_convnet and resnet8/20/32 (image, kernel, stride, padding), then kernels
# 1/3/5 x strides 1/2 x SAME/VALID on odd sizes, and grouped convolutions.
MODEL_SHAPES = [
    ((1, 32, 32, 1), (5, 5, 1, 6), 1, "VALID"), ((3, 14, 14, 6), (5, 5, 6, 16), 1, "VALID"),  # lenet5
    ((1, 32, 32, 3), (5, 5, 3, 32), 1, "SAME"), ((3, 16, 16, 32), (5, 5, 32, 32), 1, "SAME"),  # cifar_convnet
    ((1, 8, 8, 32), (5, 5, 32, 64), 1, "SAME"),
    ((3, 32, 32, 3), (3, 3, 3, 16), 1, "SAME"), ((1, 32, 32, 16), (3, 3, 16, 16), 1, "SAME"),  # resnets
    ((3, 32, 32, 16), (3, 3, 16, 32), 2, "SAME"), ((1, 32, 32, 16), (1, 1, 16, 32), 2, "SAME"),
    ((3, 16, 16, 32), (3, 3, 32, 32), 1, "SAME"), ((1, 16, 16, 32), (3, 3, 32, 64), 2, "SAME"),
    ((3, 16, 16, 32), (1, 1, 32, 64), 2, "SAME"), ((1, 8, 8, 64), (3, 3, 64, 64), 1, "SAME"),
]
GRID = [((n, 9, 7, 5), (k, k, 5, 4), s, p) for n, k in ((1, 1), (3, 3), (5, 5)) for s in (1, 2)
        for p in ("SAME", "VALID")]
GROUPED = [((3, 9, 9, 6), (3, 3, 3, 4), 2, "SAME", 2), ((2, 8, 8, 6), (1, 1, 2, 6), 1, "VALID", 3)]
CASES = [c + (1,) for c in MODEL_SHAPES + GRID] + GROUPED


@pytest.mark.parametrize("x_shape,w_shape,s,padding,g", CASES, ids=[f"{c[0]}*{c[1]}/{c[2]}{c[3]}g{c[4]}"
                                                                     for c in CASES])
def test_forward_and_both_gradients_match_float64(onednn, x_shape, w_shape, s, padding, g):
  rng = np.random.default_rng(sum(x_shape) + sum(w_shape) + s)
  x = rng.standard_normal(x_shape).astype(np.float32)
  w = rng.standard_normal(w_shape).astype(np.float32)
  f = lambda x, w: conv.conv_general_dilated(x, w, (s, s), padding, dimension_numbers=DN, feature_group_count=g)
  y, vjp = jax.vjp(jax.jit(f), x, w)
  assert "dlcore_onednn_conv_forward" in jax.jit(f).lower(x, w).as_text()
  dy = rng.standard_normal(y.shape).astype(np.float32)
  dx, dw = jax.jit(vjp)(dy)
  pads = _pads(x_shape, w_shape, s, padding)
  x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
  kh, kw, i, o = w_shape
  _check(y, _np_forward(x64, w64, s, pads, g), _np_forward(abs(x64), abs(w64), s, pads, g), kh * kw * i)
  _check(dx, _np_backward_data(dy64, w64, s, pads, g, x_shape[1:3]),
         _np_backward_data(abs(dy64), abs(w64), s, pads, g, x_shape[1:3]), kh * kw * o // g)
  _check(dw, _np_backward_weights(x64, dy64, s, pads, g, (kh, kw)),
         _np_backward_weights(abs(x64), abs(dy64), s, pads, g, (kh, kw)), y.shape[0] * y.shape[1] * y.shape[2])


@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("batched", ["both", "images", "kernels"])
def test_vmap_folds_members_into_one_call_and_matches_each_member(onednn, batched, g):
  rng = np.random.default_rng(0)
  b, s, padding = 3, 2, "SAME"
  x = rng.standard_normal((b if batched != "kernels" else 1, 3, 9, 7, 4)).astype(np.float32)
  w = rng.standard_normal((b if batched != "images" else 1, 3, 3, 4 // g, 6)).astype(np.float32)
  x, w = (x if batched != "kernels" else x[0]), (w if batched != "images" else w[0])
  f = lambda x, w: conv.conv_general_dilated(x, w, (s, s), padding, dimension_numbers=DN, feature_group_count=g)
  loss = lambda x, w: jnp.sum(f(x, w) ** 2)
  axes = (0 if batched != "kernels" else None, 0 if batched != "images" else None)
  step = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1)), in_axes=axes))
  hlo = step.lower(x, w).as_text()
  assert "while" not in hlo and hlo.count("dlcore_onednn_conv_") == 3  # one call per kernel, no loop
  value, (dx, dw) = step(x, w)
  for k in range(b):
    xk, wk = (x[k] if axes[0] == 0 else x), (w[k] if axes[1] == 0 else w)
    ref_f = lambda x, w: lax.conv_general_dilated(x, w, (s, s), padding, dimension_numbers=DN,
                                                  feature_group_count=g, precision="highest")
    ref_value, (ref_dx, ref_dw) = jax.value_and_grad(lambda x, w: jnp.sum(ref_f(x, w) ** 2), (0, 1))(xk, wk)
    np.testing.assert_allclose(value[k], ref_value, rtol=1e-5)
    np.testing.assert_allclose(dx[k], ref_dx, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dw[k], ref_dw, rtol=1e-4, atol=1e-3)


def test_nested_vmap_matches_xla(onednn, monkeypatch):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 3, 2, 8, 8, 3)).astype(np.float32)
  w = rng.standard_normal((2, 3, 3, 3, 3, 5)).astype(np.float32)
  f = lambda x, w: conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
  run = lambda: jax.jit(jax.vmap(jax.vmap(jax.grad(lambda x, w: jnp.sum(jnp.tanh(f(x, w))), (0, 1)))))(x, w)
  got = run()
  monkeypatch.setenv(conv.ENV_VAR, "xla")
  for a, b in zip(got, run()):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_uncovered_convolutions_go_to_xla(onednn):
  x = jnp.ones((2, 8, 8, 3))
  w = jnp.ones((3, 3, 3, 4))
  lowered = lambda *a, **k: jax.jit(lambda x, w: conv.conv_general_dilated(x, w, *a, **k)).lower(x, w).as_text()
  assert "dlcore_onednn" in lowered((1, 1), "SAME", dimension_numbers=DN)
  assert "dlcore_onednn" not in lowered((1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DN)
  assert "dlcore_onednn" not in lowered((1, 1), ((-1, 0), (0, 0)), dimension_numbers=DN)
  assert "dlcore_onednn" not in jax.jit(lambda x, w: conv.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=DN)).lower(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).as_text()


def test_backend_rejects_unknown_names(monkeypatch):
  monkeypatch.setenv(conv.ENV_VAR, "mkl")
  with pytest.raises(ValueError, match="DLCORE_CPU_CONV.*mkl"):
    conv.backend()
  monkeypatch.delenv(conv.ENV_VAR)
  assert conv.backend() == "onednn"  # the default


def test_resnet20_trains_as_on_xla(onednn, monkeypatch):
  """20 steps fitting one batch. Both sides compile as dlcore.parallel does on CPU (XLA's own convolutions,
  not YNNPACK's): ResNet-20's gradient at this batch of 8 moves by a few percent between the two XLA:CPU
  convolution libraries, so comparing across them would measure that, not oneDNN."""
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((8, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 10, 8).astype(np.int32)}
  model = models.get("resnet20", num_classes=10)

  def losses():
    state = state_lib.create(model, optim.optimizer("momentum", 0.01), batch["image"], 0)
    step, out = jax.jit(train.make_train_step(), compiler_options=parallel.CPU_COMPILER_OPTIONS), []
    for _ in range(20):
      state, metrics = step(state, batch)
      out.append(float(metrics["loss"]))
    return np.array(out)

  onednn_losses = losses()
  monkeypatch.setenv(conv.ENV_VAR, "xla")
  xla_losses = losses()
  assert xla_losses[-1] < 0.1 * xla_losses[0]  # it fits the batch, so the comparison covers real updates
  np.testing.assert_allclose(onednn_losses, xla_losses, atol=1e-4, rtol=0)


def test_layers_conv_uses_onednn_by_default_and_xla_when_asked(onednn, monkeypatch):
  unit = layers.Conv(4, 3, strides=2)
  x = jnp.ones((1, 8, 8, 3))
  params = unit.init(jax.random.key(0), x)
  monkeypatch.delenv(conv.ENV_VAR, raising=False)
  assert "dlcore_onednn" in jax.jit(unit.apply).lower(params, x).as_text()
  monkeypatch.setenv(conv.ENV_VAR, "xla")
  assert "dlcore_onednn" not in jax.jit(unit.apply).lower(params, x).as_text()


FALLBACK = """
import logging, sys
sys.modules["dlcore.ops._onednn"] = None  # as if the extension had not been built
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from dlcore.ops import conv
logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
x, w = jnp.arange(2 * 6 * 6 * 3.0).reshape(2, 6, 6, 3) / 100, jnp.ones((3, 3, 3, 4)) / 10
f = lambda x, w: conv.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
g = lambda x, w: lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
for _ in range(2):
  np.testing.assert_array_equal(jax.jit(jax.grad(lambda x, w: f(x, w).sum(), (0, 1)))(x, w)[1],
                                jax.jit(jax.grad(lambda x, w: g(x, w).sum(), (0, 1)))(x, w)[1])
print("AVAILABLE", conv.onednn_available())
"""


def test_missing_extension_falls_back_to_xla_and_says_so_once():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("DLCORE_CPU_CONV", None)  # the default backend, oneDNN
  out = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, env=env, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr
  logs = [line for line in out.stderr.splitlines() if line.startswith("LOG ")]
  assert len(logs) == 1 and "DLCORE_CPU_CONV=onednn" in logs[0] and "run on XLA" in logs[0], out.stderr
  assert "AVAILABLE False" in out.stdout
