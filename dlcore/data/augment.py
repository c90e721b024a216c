"""Data augmentation on device: jittable JAX functions (key, images NHWC float) -> images, random per example.

Each function draws one independent setting per example from `key` (same key -> same output), keeps shape and
dtype, and does not clip: images may already be preprocessed (centred, whitened), and every op here is
well-defined on any real values. Photometric jitter is linear, so on mean-subtracted inputs it acts around the
mean. Settings are Python numbers, checked on the host; each op runs a jitted kernel that takes them as traced
values (crop's pad and padding are static), so eager calls compile once per shape and calls inside a jitted
train step inline. `make('flip,crop')` composes ops by name for the config key `data.augment`, splitting the key
once per op.

  flip        horizontal flip with probability p (0.5)
  crop        pad `pad` (4) pixels on each side ('zero' or 'reflect') and take a random crop of the input size
  brightness  x + delta, delta ~ U(-max_delta, max_delta) per image
  contrast    (x - m) * f + m, m the image's mean over pixels per channel, f ~ U(1 - max_delta, 1 + max_delta)
  saturation  g + f * (x - g), g the image's luma (ITU-R 601 weights; identity on 1 channel), f as contrast
  jitter      brightness, contrast, saturation in that order
  rotate      rotation by U(-max_degrees, max_degrees) about the image centre, bilinear, zeros outside
  none        identity
"""

from collections.abc import Callable, Sequence
import functools
import math

import jax
import jax.numpy as jnp

from dlcore import checks

__all__ = ["NAMES", "PADDING_MODES", "Augmentation", "brightness", "contrast", "crop", "flip", "identity", "jitter",
           "make", "rotate", "rotate_by", "saturation"]

Augmentation = Callable[[jax.Array, jax.Array], jax.Array]
PADDING_MODES = ("zero", "reflect")


def _per_example(mask: jax.Array, images: jax.Array) -> jax.Array:
  return mask.reshape((-1,) + (1,) * (images.ndim - 1))


# Each public op checks its Python-number settings, then calls a jitted kernel that takes them as traced
# arguments (only crop's pad and padding are static), so changing a setting does not recompile.


@jax.jit
def _flip(key, images, p):
  chosen = jax.random.bernoulli(key, p, (images.shape[0],))
  return jnp.where(_per_example(chosen, images), images[:, :, ::-1, :], images)


def flip(key: jax.Array, images: jax.Array, p: float = 0.5) -> jax.Array:
  """Mirrors each image left-right with probability p."""
  return _flip(key, images, checks.in_range("flip probability p", p, 0.0, 1.0))


@functools.partial(jax.jit, static_argnames=("pad", "padding"))
def _crop(key, images, pad, padding):
  n, h, w, c = images.shape
  widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  padded = jnp.pad(images, widths, mode="constant" if padding == "zero" else "reflect")
  offsets = jax.random.randint(key, (n, 2), 0, 2 * pad + 1)
  cut = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
  return jax.vmap(cut)(padded, offsets)


def crop(key: jax.Array, images: jax.Array, pad: int = 4, padding: str = "zero") -> jax.Array:
  """Pads H and W by `pad` on each side and takes a random crop of the original size from each image."""
  checks.non_negative("crop pad", pad)
  checks.one_of("crop padding", padding, PADDING_MODES)
  if pad == 0:
    return images
  h, w = images.shape[1:3]
  if padding == "reflect" and (pad >= h or pad >= w):
    raise ValueError(f"crop pad {pad} must be < the image size {h}x{w} for reflect padding")
  return _crop(key, images, int(pad), padding)


def _factors(key, images, max_delta):
  """Per-example factors f ~ U(1 - max_delta, 1 + max_delta), shaped to broadcast over images."""
  f = jax.random.uniform(key, (images.shape[0],), minval=1.0 - max_delta, maxval=1.0 + max_delta)
  return _per_example(f, images).astype(images.dtype)


@jax.jit
def _brightness(key, images, max_delta):
  delta = jax.random.uniform(key, (images.shape[0],), minval=-max_delta, maxval=max_delta)
  return images + _per_example(delta, images).astype(images.dtype)


@jax.jit
def _contrast(key, images, max_delta):
  mean = images.mean(axis=(1, 2), keepdims=True)
  return mean + _factors(key, images, max_delta) * (images - mean)


@jax.jit
def _saturation(key, images, max_delta):
  if images.shape[-1] != 3:
    return images
  grey = (images @ jnp.asarray([0.299, 0.587, 0.114], images.dtype))[..., None]
  return grey + _factors(key, images, max_delta) * (images - grey)


@jax.jit
def _jitter(key, images, max_delta):
  kb, kc, ks = jax.random.split(key, 3)
  return _saturation(ks, _contrast(kc, _brightness(kb, images, max_delta), max_delta), max_delta)


def _delta(arg, max_delta):
  return checks.in_range(arg, max_delta, 0.0, 1.0)


def brightness(key: jax.Array, images: jax.Array, max_delta: float = 0.2) -> jax.Array:
  """Adds delta ~ U(-max_delta, max_delta) to every pixel of each image."""
  return _brightness(key, images, _delta("brightness max_delta", max_delta))


def contrast(key: jax.Array, images: jax.Array, max_delta: float = 0.2) -> jax.Array:
  """Scales each image's deviation from its per-channel mean by f ~ U(1 - max_delta, 1 + max_delta)."""
  return _contrast(key, images, _delta("contrast max_delta", max_delta))


def saturation(key: jax.Array, images: jax.Array, max_delta: float = 0.2) -> jax.Array:
  """Blends each RGB image with its grey (luma) version: grey + f * (x - grey), f ~ U(1 -/+ max_delta). Images
  whose channel axis is not 3 are returned unchanged."""
  return _saturation(key, images, _delta("saturation max_delta", max_delta))


def jitter(key: jax.Array, images: jax.Array, max_delta: float = 0.2) -> jax.Array:
  """brightness, contrast and saturation in that order, each with `max_delta` and its own key."""
  return _jitter(key, images, _delta("jitter max_delta", max_delta))


@jax.jit
def rotate_by(images: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates image i by angles[i] radians about its centre (positive: clockwise as displayed, row 0 on top).

  Bilinear interpolation; points that come from outside the image are 0. Angle 0 is exactly the identity.
  """
  _, h, w, c = images.shape
  cy, cx = (h - 1) / 2, (w - 1) / 2
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")

  def one(image, angle):
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    # Inverse map: output pixel (y, x) samples the input at the point rotated back by -angle.
    src_y = cy + cos * (yy - cy) - sin * (xx - cx)
    src_x = cx + sin * (yy - cy) + cos * (xx - cx)
    y0, x0 = jnp.floor(src_y), jnp.floor(src_x)
    out = jnp.zeros((h, w, c), images.dtype)
    for dy in (0, 1):
      for dx in (0, 1):
        yi, xi = y0 + dy, x0 + dx
        weight = (1 - jnp.abs(src_y - yi)) * (1 - jnp.abs(src_x - xi))
        inside = (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
        pixel = image[jnp.clip(yi, 0, h - 1).astype(jnp.int32), jnp.clip(xi, 0, w - 1).astype(jnp.int32)]
        out = out + jnp.where(inside, weight, 0.0)[..., None].astype(images.dtype) * pixel
    return out

  return jax.vmap(one)(images, angles)


@jax.jit
def _rotate(key, images, max_degrees):
  degrees = jax.random.uniform(key, (images.shape[0],), minval=-max_degrees, maxval=max_degrees)
  return rotate_by(images, degrees * (math.pi / 180))


def rotate(key: jax.Array, images: jax.Array, max_degrees: float = 15.0) -> jax.Array:
  """Rotates each image by an angle ~ U(-max_degrees, max_degrees) degrees (bilinear, zeros outside)."""
  return _rotate(key, images, checks.in_range("rotate max_degrees", max_degrees, 0.0, 180.0))


def identity(key: jax.Array, images: jax.Array) -> jax.Array:
  """Returns `images` unchanged, ignoring `key`: the 'none' op."""
  del key
  return images


def _ops(*, flip_p, pad, padding, max_delta, max_degrees):
  return {
      "none": identity,
      "flip": functools.partial(flip, p=flip_p),
      "crop": functools.partial(crop, pad=pad, padding=padding),
      "brightness": functools.partial(brightness, max_delta=max_delta),
      "contrast": functools.partial(contrast, max_delta=max_delta),
      "saturation": functools.partial(saturation, max_delta=max_delta),
      "jitter": functools.partial(jitter, max_delta=max_delta),
      "rotate": functools.partial(rotate, max_degrees=max_degrees),
  }


NAMES = tuple(sorted(_ops(flip_p=0.5, pad=4, padding="zero", max_delta=0.2, max_degrees=15.0)))


def make(names: str | Sequence[str], *, flip_p: float = 0.5, pad: int = 4, padding: str = "zero",
         max_delta: float = 0.2, max_degrees: float = 15.0) -> Augmentation:
  """The composition, in the order given, of the ops named in `names` ('flip,crop' or ['flip', 'crop']).

  '' and 'none' give the identity. Unknown names raise ValueError listing NAMES. The options go to the ops
  that take them (flip_p: flip; pad, padding: crop; max_delta: brightness/contrast/saturation/jitter;
  max_degrees: rotate) and are checked here, so a bad flag fails before anything is traced.
  """
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",")]
  names = [n.lower() for n in names if n]
  checks.in_range("flip_p", flip_p, 0.0, 1.0)
  checks.non_negative("pad", pad)
  checks.one_of("padding", padding, PADDING_MODES)
  checks.in_range("max_delta", max_delta, 0.0, 1.0)
  checks.in_range("max_degrees", max_degrees, 0.0, 180.0)
  table = _ops(flip_p=flip_p, pad=pad, padding=padding, max_delta=max_delta, max_degrees=max_degrees)
  ops = [checks.lookup("augmentation", table, n) for n in names]
  ops = [op for op, n in zip(ops, names) if n != "none"]

  def augment(key: jax.Array, images: jax.Array) -> jax.Array:
    if not ops:
      return images
    for op, k in zip(ops, jax.random.split(key, len(ops))):
      images = op(k, images)
    return images

  augment.names = tuple(names)
  return augment
