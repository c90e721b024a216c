"""Preprocessing: statistics from train only, whitening gives identity covariance, checked against numpy."""

import numpy as np
import pytest

from dlcore import data
from dlcore.data import preprocess


def correlated_images(n, seed, shape=(4, 4, 2)):
  """Correlated Gaussian 'images' with a non-zero mean, float32 NHWC (the same mixing for every seed)."""
  d = int(np.prod(shape))
  mixing = np.random.default_rng(0).normal(size=(d, d)) / np.sqrt(d)
  x = np.random.default_rng(seed).normal(size=(n, d)) @ mixing + np.linspace(0.2, 0.8, d)
  return x.reshape((n, *shape)).astype(np.float32)


TRAIN, TEST = correlated_images(3000, 1), correlated_images(500, 2)


def flat(x):
  return x.reshape(len(x), -1).astype(np.float64)


def covariance(x):
  x = flat(x)
  x = x - x.mean(0)
  return x.T @ x / len(x)


def lecture_whitening(train, eps):
  """The lectures' recipe in numpy: X -= mean; cov = X^T X / N; U, S, V = svd(cov); Xrot = X U; / sqrt(S + eps)."""
  x = flat(train)
  mean = x.mean(0)
  u, s, _ = np.linalg.svd((x - mean).T @ (x - mean) / len(x))
  pca = lambda y: (flat(y) - mean) @ u / np.sqrt(s + eps)
  zca = lambda y: pca(y) @ u.T
  return pca, zca


@pytest.mark.parametrize("method", ["pca_whiten", "zca_whiten"])
def test_whitened_training_data_has_identity_covariance(method):
  out = preprocess.fit(method, TRAIN, epsilon=0.0)(TRAIN)
  assert out.shape == TRAIN.shape and out.dtype == np.float32
  np.testing.assert_allclose(covariance(out), np.eye(32), atol=2e-4)
  np.testing.assert_allclose(flat(out).mean(0), 0, atol=1e-5)


def test_epsilon_shrinks_the_covariance_to_s_over_s_plus_eps():
  params = preprocess.fit_params("pca_whiten", TRAIN, epsilon=0.1)
  s = params["eigenvalues"]
  assert np.all(np.diff(s) <= 0)  # descending
  out = preprocess.apply("pca_whiten", params, TRAIN)
  np.testing.assert_allclose(covariance(out), np.diag(s / (s + 0.1)), atol=2e-4)


@pytest.mark.parametrize("eps", [0.0, 1e-2])
def test_test_split_uses_train_statistics(eps):
  pca_np, zca_np = lecture_whitening(TRAIN, eps)
  zca = preprocess.fit("zca_whiten", TRAIN, epsilon=eps)
  np.testing.assert_allclose(flat(zca(TEST)), zca_np(TEST), atol=2e-5)
  pca = preprocess.fit("pca_whiten", TRAIN, epsilon=eps)(TEST)
  expected = pca_np(TEST)
  signs = np.sign((flat(pca) * expected).sum(0))  # eigenvectors are defined up to sign
  np.testing.assert_allclose(flat(pca) * signs, expected, atol=2e-5)
  # Fitting on the test split would give something else: statistics really come from train.
  refit = preprocess.fit("zca_whiten", TEST, epsilon=eps)(TEST)
  assert np.abs(flat(refit) - zca_np(TEST)).max() > 0.01


def test_zca_is_symmetric_and_the_whitening_closest_to_the_data():
  params = preprocess.fit_params("zca_whiten", TRAIN, epsilon=0.0)
  np.testing.assert_allclose(params["matrix"], params["matrix"].T, atol=1e-9)
  centred = flat(TRAIN) - flat(TRAIN).mean(0)
  zca = flat(preprocess.apply("zca_whiten", params, TRAIN))
  pca = flat(preprocess.fit("pca_whiten", TRAIN, epsilon=0.0)(TRAIN))
  rotation, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(32, 32)))
  distance = lambda y: np.linalg.norm(y - centred)
  assert distance(zca) < distance(pca) and distance(zca) < distance(zca @ rotation)


def test_mean_and_standardize_methods_match_numpy():
  x, t = flat(TRAIN), flat(TEST)
  mean_image = preprocess.fit("mean_image", TRAIN)(TEST)
  np.testing.assert_allclose(flat(mean_image), t - x.mean(0), atol=1e-5)
  channel = preprocess.fit("channel_mean", TRAIN)
  np.testing.assert_allclose(channel.params["mean"], TRAIN.astype(np.float64).mean(axis=(0, 1, 2)), atol=1e-10)
  np.testing.assert_allclose(channel(TEST), TEST - TRAIN.astype(np.float64).mean(axis=(0, 1, 2)), atol=1e-5)
  standard = preprocess.fit("standardize", TRAIN, epsilon=1e-3)
  np.testing.assert_allclose(flat(standard(TEST)), (t - x.mean(0)) / np.sqrt(x.var(0) + 1e-3), atol=1e-5)
  train_out = flat(preprocess.fit("standardize", TRAIN, epsilon=0.0)(TRAIN))
  np.testing.assert_allclose(train_out.std(0), 1, atol=1e-5)
  np.testing.assert_array_equal(preprocess.fit("none", TRAIN)(TEST), TEST)


def test_preprocess_dataset_fits_on_train_and_transforms_every_split():
  ds = data.synthetic(image_shape=(4, 4, 1), train_size=300, test_size=50, validation_size=60)
  out, transform = preprocess.preprocess_dataset(ds, "zca_whiten", epsilon=1e-2)
  reference = preprocess.fit("zca_whiten", ds.train.images, epsilon=1e-2)
  for name in ("train", "validation", "test"):
    np.testing.assert_array_equal(out.split(name).images, reference(ds.split(name).images))
    np.testing.assert_array_equal(out.split(name).labels, ds.split(name).labels)
  assert transform.method == "zca_whiten" and out.source == ds.source


def test_errors():
  with pytest.raises(ValueError, match="unknown preprocessing method 'whiten'; valid names: channel_mean, "
                                       "mean_image, none, pca_whiten, standardize, zca_whiten"):
    preprocess.fit("whiten", TRAIN)
  with pytest.raises(ValueError, match="epsilon must be >= 0"):
    preprocess.fit("standardize", TRAIN, epsilon=-1.0)
  with pytest.raises(ValueError, match=r"fitted on shape \(4, 4, 2\)"):
    preprocess.fit("mean_image", TRAIN)(np.zeros((2, 4, 2, 2), np.float32))
  with pytest.raises(ValueError, match="fitted on 2"):
    preprocess.fit("channel_mean", TRAIN)(np.zeros((2, 4, 4, 3), np.float32))
