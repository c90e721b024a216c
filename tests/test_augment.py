"""Augmentation: jittable, shape/dtype preserving, reproducible from the key, exact on the identity settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlcore.data import augment

IMAGES = jax.random.uniform(jax.random.key(0), (16, 8, 8, 3))
KEY, OTHER = jax.random.key(1), jax.random.key(2)


@pytest.mark.parametrize("names", ["flip", "crop", "brightness", "contrast", "saturation", "jitter", "rotate"])
def test_shape_dtype_reproducible_and_key_dependent(names):
  fn = augment.make(names)
  out = fn(KEY, IMAGES)
  assert out.shape == IMAGES.shape and out.dtype == IMAGES.dtype
  np.testing.assert_array_equal(out, fn(KEY, IMAGES))
  assert not np.array_equal(out, fn(OTHER, IMAGES))
  assert not np.array_equal(out, IMAGES)


def test_composition_is_jittable_reproducible_and_keeps_bfloat16():
  jitted = jax.jit(augment.make("flip,crop"))
  np.testing.assert_array_equal(jitted(KEY, IMAGES), jitted(KEY, IMAGES))
  everything = augment.make("flip,crop,jitter,rotate")
  out = everything(KEY, IMAGES)
  assert out.shape == IMAGES.shape and out.dtype == IMAGES.dtype
  np.testing.assert_array_equal(out, everything(KEY, IMAGES))
  assert not np.array_equal(out, everything(OTHER, IMAGES))
  assert augment.rotate(KEY, IMAGES.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_settings_are_drawn_per_example():
  out = augment.brightness(KEY, IMAGES)
  shifts = (out - IMAGES).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(out - IMAGES, shifts[:, None, None, None] * jnp.ones_like(IMAGES), atol=1e-6)
  assert len(np.unique(np.round(shifts, 6))) == len(IMAGES) and np.abs(shifts).max() <= 0.2


def test_flip_flips_exactly_the_chosen_examples():
  out = augment.flip(KEY, IMAGES)
  chosen = np.asarray(jax.random.bernoulli(KEY, 0.5, (16,)))
  assert 0 < chosen.sum() < 16
  for i in range(16):
    np.testing.assert_array_equal(out[i], IMAGES[i, :, ::-1] if chosen[i] else IMAGES[i])
  np.testing.assert_array_equal(augment.flip(KEY, IMAGES, p=0.0), IMAGES)
  np.testing.assert_array_equal(augment.flip(KEY, IMAGES, p=1.0), IMAGES[:, :, ::-1])


@pytest.mark.parametrize("padding", ["zero", "reflect"])
def test_crop_is_a_window_of_the_padded_image(padding):
  np.testing.assert_array_equal(augment.crop(KEY, IMAGES, pad=0), IMAGES)
  out = np.asarray(augment.crop(KEY, IMAGES, pad=4, padding=padding))
  padded = np.pad(np.asarray(IMAGES), ((0, 0), (4, 4), (4, 4), (0, 0)),
                  mode="constant" if padding == "zero" else "reflect")
  offsets = set()
  for i in range(16):
    match = [(dy, dx) for dy in range(9) for dx in range(9) if np.array_equal(out[i], padded[i, dy:dy + 8, dx:dx + 8])]
    assert match, f"example {i} is not a crop of its padded image"
    offsets.add(match[0])
  assert len(offsets) > 3


def test_rotation_by_zero_is_identity_and_by_90_degrees_is_a_quarter_turn():
  np.testing.assert_array_equal(augment.rotate(KEY, IMAGES, max_degrees=0.0), IMAGES)
  np.testing.assert_array_equal(augment.rotate_by(IMAGES, jnp.zeros(16)), IMAGES)
  quarter = augment.rotate_by(IMAGES, jnp.full(16, np.pi / 2))
  np.testing.assert_allclose(quarter, np.rot90(IMAGES, k=-1, axes=(1, 2)), atol=1e-5)  # clockwise as displayed
  small = augment.rotate(KEY, IMAGES, max_degrees=10.0)
  centre = (slice(None), slice(3, 5), slice(3, 5))  # near the centre a small rotation moves pixels little
  assert np.abs(small[centre] - IMAGES[centre]).mean() < np.abs(small - IMAGES).mean()


def test_photometric_jitter_properties():
  contrast = augment.contrast(KEY, IMAGES)
  np.testing.assert_allclose(contrast.mean(axis=(1, 2)), IMAGES.mean(axis=(1, 2)), atol=1e-5)
  grey = IMAGES[..., :1]
  np.testing.assert_array_equal(augment.saturation(KEY, grey), grey)  # one channel: nothing to saturate
  luma = IMAGES @ jnp.asarray([0.299, 0.587, 0.114])
  np.testing.assert_allclose(augment.saturation(KEY, IMAGES) @ jnp.asarray([0.299, 0.587, 0.114]), luma, atol=1e-5)


def test_make_by_names():
  assert augment.make("").names == () and augment.make("flip, crop").names == ("flip", "crop")
  np.testing.assert_array_equal(augment.make("none")(KEY, IMAGES), IMAGES)
  np.testing.assert_array_equal(augment.make(["crop"], pad=0)(KEY, IMAGES), IMAGES)
  with pytest.raises(ValueError, match="unknown augmentation 'mixup'; valid names: brightness, contrast, crop, "
                                       "flip, jitter, none, rotate, saturation"):
    augment.make("flip,mixup")
  with pytest.raises(ValueError, match="padding must be one of 'zero', 'reflect'; got 'wrap'"):
    augment.make("crop", padding="wrap")
  with pytest.raises(ValueError, match=r"max_degrees must be in \[0.0, 180.0\]"):
    augment.make("rotate", max_degrees=-5)
