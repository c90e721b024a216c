"""PCA against the closed form of data with known principal axes; t-SNE's affinities against their perplexity and
its embedding of well-separated clusters."""

import numpy as np
import pytest

from dlcore import embedding


def _known_axes(n=300, features=12, scales=(3.0, 2.0, 1.0), seed=0):
  """Rank-3 data: orthonormal centred scores u times `scales` along orthonormal directions, plus an offset."""
  rng = np.random.default_rng(seed)
  m = rng.standard_normal((n, len(scales)))
  u, _ = np.linalg.qr(m - m.mean(axis=0))  # centred: the columns span a subspace orthogonal to the ones vector
  directions, _ = np.linalg.qr(rng.standard_normal((features, len(scales))))
  return u * scales @ directions.T + rng.standard_normal(features), u * scales


def test_pca_finds_the_known_axes_and_their_share_of_the_variance():
  x, scores = _known_axes()
  points, explained = embedding.pca(x, 2)
  np.testing.assert_allclose(explained, [9 / 14, 4 / 14], rtol=1e-10)  # variances 3^2 : 2^2 : 1^2
  for k in range(2):  # each projection is the known score, up to the axis's sign
    sign = np.sign(points[:, k] @ scores[:, k])
    np.testing.assert_allclose(sign * points[:, k], scores[:, k], atol=1e-10)
  covariance = np.cov(x, rowvar=False, bias=True)  # the eigenvalues of the covariance, independently
  eigenvalues = np.sort(np.linalg.eigvalsh(covariance))[::-1]
  np.testing.assert_allclose(explained, eigenvalues[:2] / eigenvalues.sum(), rtol=1e-8)


def test_pca_refuses_what_it_cannot_embed():
  with pytest.raises(ValueError, match="at least 2 points"):
    embedding.pca(np.ones(5))
  with pytest.raises(ValueError, match="no variance"):
    embedding.pca(np.ones((4, 3)))
  with pytest.raises(ValueError, match="dims"):
    embedding.pca(np.zeros((10, 1)), 2)


def _clusters(k=4, per=30, features=10, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(0.0, 10.0, (k, features))
  labels = np.repeat(np.arange(k), per)
  return centres[labels] + rng.standard_normal((k * per, features)), labels


def test_affinities_have_the_asked_perplexity():
  x, _ = _clusters()
  p = embedding.conditional_affinities(x, 10.0)
  assert np.all(np.diag(p) == 0)
  np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
  entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
  np.testing.assert_allclose(np.exp(entropy), 10.0, rtol=1e-3)
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  assert np.all(p[np.arange(len(x)), d.argmin(axis=1)] == p.max(axis=1))  # the nearest point weighs most
  with pytest.raises(ValueError, match="perplexity"):
    embedding.conditional_affinities(x, len(x) - 1.0)


def test_tsne_keeps_separated_clusters_apart_and_repeats_itself():
  x, labels = _clusters()
  y = embedding.tsne(x, perplexity=10.0)
  assert y.shape == (len(x), 2) and np.all(np.isfinite(y))
  d = ((y[:, None] - y[None]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  neighbours = np.argsort(d, axis=1)[:, :10]
  assert np.all(labels[neighbours] == labels[:, None])  # every point's 10 nearest are of its own cluster
  same = labels[:, None] == labels[None]
  assert np.sqrt(d[~same].min()) > 2 * np.sqrt(d[same & np.isfinite(d)].max())  # gaps wider than the clusters
  np.testing.assert_array_equal(embedding.tsne(x, perplexity=10.0), y)
