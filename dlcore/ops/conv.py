"""2-D convolution with a oneDNN backend on CPU: `conv_general_dilated` is a drop-in for
`lax.conv_general_dilated` that `layers.Conv` uses.

Backend: the environment variable DLCORE_CPU_CONV, read when a convolution is traced: 'onednn' (the default:
oneDNN's direct forward, backward-data and backward-weights kernels, through the C++ extension
`dlcore.ops._onednn` that `pip install -e .` builds, as XLA FFI custom calls; a whole training step of the conv
nets is faster than on XLA:CPU, benchmarks/results/throughput_cpu_onednn.md) or 'xla' (`lax.conv_general_dilated`
everywhere). oneDNN is used for what it covers: the CPU backend, float32 image and kernel, NHWC/HWIO/NHWC, no
dilation, non-negative padding, batch_group_count 1; anything else (GPU, TPU, bf16, float64 gradient checks) goes
to `lax.conv_general_dilated`. When the extension or libdnnl cannot be loaded, every convolution on CPU runs on
XLA and the reason is logged once (`onednn_status()` says it too).

Transformations: `grad` (a `custom_vjp` whose backward pass is oneDNN's two backward kernels; reverse mode only,
no `jax.jvp` and no second derivatives), `jit`, and `vmap` (a batching rule per kernel: a vmapped axis of the
images alone folds into the batch, one of the kernels alone into the output features or the groups, both into
the groups; never a sequential loop). The custom calls have no partitioning rule yet: under a sharded `jit` each
device would convolve the whole batch, so `dlcore.parallel` and `dlcore.population` trace their sharded steps
(more than one device) with `use_backend('xla')`, except bn_stats='local', which runs under `shard_map`, where
each device convolves its own shard with oneDNN.
"""

from collections.abc import Iterator, Sequence
import contextlib
import contextvars
import functools
import logging
import os

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from dlcore import checks

__all__ = ["BACKENDS", "ENV_VAR", "backend", "conv_general_dilated", "onednn_available", "onednn_conv",
           "onednn_status", "use_backend"]

ENV_VAR = "DLCORE_CPU_CONV"
BACKENDS = ("xla", "onednn")
_TARGET = "dlcore_onednn_conv_{}"
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
_LOG = logging.getLogger(__name__)
_OVERRIDE = contextvars.ContextVar("dlcore_cpu_conv_override", default=None)


def backend() -> str:
  """The CPU convolution backend asked for: that of an enclosing `use_backend`, else DLCORE_CPU_CONV ('onednn'
  when unset); another value fails naming it."""
  name = _OVERRIDE.get() or os.environ.get(ENV_VAR, "onednn")
  checks.one_of(ENV_VAR, name, BACKENDS)
  return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
  """Convolutions traced inside the block use backend `name` ('xla' or 'onednn'), whatever DLCORE_CPU_CONV says."""
  checks.one_of("backend", name, BACKENDS)
  token = _OVERRIDE.set(name)
  try:
    yield
  finally:
    _OVERRIDE.reset(token)


def _preload_libdnnl() -> None:
  """Loads the libdnnl that the pip package onednn-cpu-gomp installed (outside the loader's search path) with
  RTLD_GLOBAL, so that the extension's dependency on libdnnl.so.3 resolves to it."""
  import ctypes
  from importlib import metadata
  try:
    files = metadata.distribution("onednn-cpu-gomp").files or []
  except metadata.PackageNotFoundError:
    return  # the extension may still find a system libdnnl
  for f in files:
    if f.name == "libdnnl.so.3":
      ctypes.CDLL(str(f.locate()), mode=ctypes.RTLD_GLOBAL)
      return


@functools.cache
def _load() -> tuple[bool, str]:
  """(available, status): loads the extension and registers its handlers with XLA once."""
  try:
    _preload_libdnnl()
    from dlcore.ops import _onednn  # pylint: disable=import-outside-toplevel
  except (ImportError, OSError) as e:
    return False, f"oneDNN convolutions unavailable ({type(e).__name__}: {e})"
  for name, capsule in _onednn.handlers().items():
    jax.ffi.register_ffi_target(_TARGET.format(name), capsule, platform="cpu")
  return True, "oneDNN {}.{}.{} loaded".format(*_onednn.version())


def onednn_available() -> bool:
  """Whether the oneDNN extension and libdnnl load (and their FFI handlers are registered)."""
  return _load()[0]


def onednn_status() -> str:
  """One line: the loaded oneDNN version, or why the extension is unavailable."""
  return _load()[1]


@functools.cache
def _warn_unavailable(status: str) -> None:
  _LOG.warning("%s=onednn: %s; convolutions run on XLA", ENV_VAR, status)


# ------------------------------------------------------------------------------------------- the FFI calls


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(int(a) for a in v)


def _ffi(kind: str, shape, a, b, strides, padding, groups):
  (pt, pb), (pl, pr) = padding
  call = jax.ffi.ffi_call(_TARGET.format(kind), jax.ShapeDtypeStruct(shape, jnp.float32))
  i64 = np.int64
  return call(a, b, stride_h=i64(strides[0]), stride_w=i64(strides[1]), pad_top=i64(pt), pad_bottom=i64(pb),
              pad_left=i64(pl), pad_right=i64(pr), groups=i64(groups))


def _out_size(size: int, k: int, s: int, pads: tuple[int, int]) -> int:
  return (size + pads[0] + pads[1] - k) // s + 1


# Batching rules. Operands come with the vmapped axis first; `b` is its size. Moving it next to the channels
# and merging it into them makes member b's channels (and, for kernels, its output features) the b-th block of
# groups; G > 1 with only one operand vmapped broadcasts the other first.


def _to_channels(a):
  """(B, N, H, W, C) -> (N, H, W, B*C)."""
  return jnp.moveaxis(a, 0, 3).reshape(a.shape[1:4] + (-1,))


def _kernel_to_features(w):
  """(B, KH, KW, I, O) -> (KH, KW, I, B*O)."""
  return jnp.moveaxis(w, 0, 3).reshape(w.shape[1:4] + (-1,))


def _from_last(y, b):
  """(..., B*K) -> (B, ..., K)."""
  return jnp.moveaxis(y.reshape(y.shape[:-1] + (b, -1)), -2, 0)


def _fold_batch(a):
  return a.reshape((-1,) + a.shape[2:])


def _broadcast(a, b):
  return jnp.broadcast_to(a, (b,) + a.shape)


@functools.cache
def _forward_op(strides, padding, groups):
  @jax.custom_batching.custom_vmap
  def forward(x, w):
    n, h, wd, _ = x.shape
    kh, kw, _, o = w.shape
    shape = (n, _out_size(h, kh, strides[0], padding[0]), _out_size(wd, kw, strides[1], padding[1]), o)
    return _ffi("forward", shape, x, w, strides, padding, groups)

  @forward.def_vmap
  def rule(b, in_batched, x, w):
    xb, wb = in_batched
    if xb and not wb:
      y = _forward_op(strides, padding, groups)(_fold_batch(x), w)
      return y.reshape((b, -1) + y.shape[1:]), True
    if wb and not xb and groups == 1:
      return _from_last(_forward_op(strides, padding, 1)(x, _kernel_to_features(w)), b), True
    x, w = (x if xb else _broadcast(x, b)), (w if wb else _broadcast(w, b))
    return _from_last(_forward_op(strides, padding, b * groups)(_to_channels(x), _kernel_to_features(w)), b), True

  return forward


@functools.cache
def _backward_data_op(strides, padding, groups, image_hw):
  @jax.custom_batching.custom_vmap
  def backward_data(dy, w):
    return _ffi("backward_data", (dy.shape[0],) + image_hw + (w.shape[2] * groups,), dy, w, strides, padding, groups)

  @backward_data.def_vmap
  def rule(b, in_batched, dy, w):
    yb, wb = in_batched
    if yb and not wb:
      dx = _backward_data_op(strides, padding, groups, image_hw)(_fold_batch(dy), w)
      return dx.reshape((b, -1) + dx.shape[1:]), True
    if wb and not yb and groups == 1:  # member b's kernel as input channels b*I..(b+1)*I of one kernel
      w = jnp.moveaxis(w, 0, 2).reshape(w.shape[1:3] + (-1, w.shape[-1]))
      return _from_last(_backward_data_op(strides, padding, 1, image_hw)(dy, w), b), True
    dy, w = (dy if yb else _broadcast(dy, b)), (w if wb else _broadcast(w, b))
    dx = _backward_data_op(strides, padding, b * groups, image_hw)(_to_channels(dy), _kernel_to_features(w))
    return _from_last(dx, b), True

  return backward_data


@functools.cache
def _backward_weights_op(strides, padding, groups, kernel_hw):
  @jax.custom_batching.custom_vmap
  def backward_weights(x, dy):
    shape = kernel_hw + (x.shape[-1] // groups, dy.shape[-1])
    return _ffi("backward_weights", shape, x, dy, strides, padding, groups)

  @backward_weights.def_vmap
  def rule(b, in_batched, x, dy):
    xb, yb = in_batched
    if groups == 1 and xb and not yb:  # member b's images as input channels b*C..(b+1)*C
      dw = _backward_weights_op(strides, padding, 1, kernel_hw)(_to_channels(x), dy)
      return jnp.moveaxis(dw.reshape(kernel_hw + (b, -1, dw.shape[-1])), 2, 0), True
    if groups == 1 and yb and not xb:  # member b's output gradients as output features b*O..(b+1)*O
      return _from_last(_backward_weights_op(strides, padding, 1, kernel_hw)(x, _to_channels(dy)), b), True
    x, dy = (x if xb else _broadcast(x, b)), (dy if yb else _broadcast(dy, b))
    return _from_last(_backward_weights_op(strides, padding, b * groups, kernel_hw)(_to_channels(x),
                                                                                    _to_channels(dy)), b), True

  return backward_weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, groups):
  return _forward_op(strides, padding, groups)(x, w)


def _conv_fwd(x, w, strides, padding, groups):
  return _conv(x, w, strides, padding, groups), (x, w)


def _conv_bwd(strides, padding, groups, residuals, dy):
  x, w = residuals
  dx = _backward_data_op(strides, padding, groups, x.shape[1:3])(dy, w)
  dw = _backward_weights_op(strides, padding, groups, w.shape[:2])(x, dy)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def onednn_conv(x: jax.Array, w: jax.Array, strides: int | Sequence[int] = 1,
                padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)), groups: int = 1) -> jax.Array:
  """oneDNN's convolution of NHWC float32 images `x` (N, H, W, C) with an HWIO kernel `w` (KH, KW, C / groups,
  O): `lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  feature_group_count=groups)` computed by oneDNN, forward and backward. Explicit non-negative padding
  ((top, bottom), (left, right)). Needs the extension (`onednn_available()`); no dispatch, no fallback."""
  if not onednn_available():
    raise RuntimeError(onednn_status())
  padding = tuple(_pair(p) for p in padding)
  return _conv(x, w, _pair(strides), padding, int(groups))


# ------------------------------------------------------------------------------------------------ dispatch


def _onednn_padding(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                    feature_group_count, batch_group_count, preferred_element_type):
  """The explicit padding when oneDNN covers this convolution, else None."""
  if (lhs.ndim != 4 or rhs.ndim != 4 or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32
      or batch_group_count != 1 or preferred_element_type not in (None, jnp.float32)
      or any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ()))
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != _NHWC
      or jax.default_backend() != "cpu"):
    return None
  strides = _pair(window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  padding = tuple(_pair(p) for p in padding)
  if min(min(p) for p in padding) < 0 or 0 in lhs.shape or 0 in rhs.shape:
    return None
  if any(_out_size(lhs.shape[1 + i], rhs.shape[i], strides[i], padding[i]) < 1 for i in (0, 1)):
    return None
  return padding


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
  """`lax.conv_general_dilated` (same arguments), computed by oneDNN on CPU when DLCORE_CPU_CONV is 'onednn' (the
  default), the extension loads and the convolution is one oneDNN covers (module docstring); by
  `lax.conv_general_dilated` otherwise."""
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
          batch_group_count, precision, preferred_element_type)
  if backend() == "onednn" and jax.default_backend() == "cpu":
    if not onednn_available():
      _warn_unavailable(onednn_status())
    else:
      pads = _onednn_padding(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                             feature_group_count, batch_group_count, preferred_element_type)
      if pads is not None:
        return _conv(lhs, rhs, _pair(window_strides), pads, int(feature_group_count))
  return lax.conv_general_dilated(*args)
